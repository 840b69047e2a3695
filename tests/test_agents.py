"""Voice agents: streaming text in over WebSocket (Gradium's and ElevenLabs' protocols),
driven by Pipecat, LiveKit's plugins and the vendors' own SDKs.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pocket_tts_server as srv
from tests.helpers import LONG_TEXT, library_seconds, stub_agents, ws_messages
from tools.offline_model import CORPUS


@pytest.fixture(scope="module")
def agents(real):
    """The voice-agent WebSocket server (--ws_port) on the real model, as main() starts it."""
    server = srv.AgentServer(real.service, "127.0.0.1", 0)
    yield SimpleNamespace(url=f"ws://127.0.0.1:{server.port}", http=f"http://127.0.0.1:{server.port}",
                          server=server, real=real)  # fmt: skip
    server.close()


def agent_seconds(model, units: list[str]) -> float:
    """What the Engine makes of each unit, spoken one after the other (EOS off)."""
    return sum(library_seconds(model, unit) for unit in units)


def pcm16_seconds(chunks: list[bytes], rate: int) -> float:
    return sum(len(c) for c in chunks) / 2 / rate


class TestAgentText:
    """How streamed text becomes units of speech, and how their words are timed."""

    def test_units_at_sentence_ends_flushes_and_the_chunk_schedule(self):
        text = srv.TextIn(1000)
        assert text.add("Hello wor") == [] and text.add("ld. How are") == ["Hello world."]
        assert text.flush() == ["How are"] and text.flush() == []
        assert text.add("Pi is 3.") == [] and text.add("14. Yes") == ["Pi is 3.14."]
        assert text.add(" indeed.") == ["Yes indeed."]  # Pipecat: a sentence, no space after
        scheduled = srv.TextIn(1000, (10, 20))
        assert scheduled.add("one two three four") == ["one two three"]  # cut at a space
        assert scheduled.add(" five six seven eight") == ["four five six seven"]
        with pytest.raises(srv.TextTooLong):
            srv.TextIn(5).add("Hello world.")

    @settings(max_examples=60, deadline=None)
    @given(words=st.lists(st.text("abcdefghij.,!?'", min_size=1, max_size=12), min_size=1,
                          max_size=40), start=st.floats(0, 100), length=st.floats(0.08, 30))  # fmt: skip
    def test_word_timings_rise_cover_every_word_once_and_end_with_the_audio(
        self, words, start, length
    ):
        spans = srv.word_spans(" ".join(words), start, start + length)
        assert [w for w, _, _ in spans] == " ".join(words).split()
        assert all(a <= b for _, a, b in spans)
        assert all(spans[i][2] == pytest.approx(spans[i + 1][1], abs=1e-3)
                   for i in range(len(spans) - 1))  # fmt: skip
        assert spans[0][1] == pytest.approx(start, abs=1e-3)
        assert spans[-1][2] == pytest.approx(start + length, abs=1e-3)
        align = srv.char_alignment(" ".join(words) + " ", length)
        ends = [
            s + d for s, d in zip(align["charStartTimesMs"], align["charDurationsMs"], strict=True)
        ]
        assert (
            len(align["chars"]) == len(" ".join(words)) + 1 and min(align["charDurationsMs"]) >= 0
        )
        assert ends[-1] == round(length * 1000) and align["charStartTimesMs"] == sorted(
            align["charStartTimesMs"]
        )

    @pytest.mark.parametrize(
        "name,codec,rate",
        [("pcm", "pcm", 48000), ("pcm_16000", "pcm", 16000), ("mp3_22050_32", "mp3", 22050),
         ("mp3_44100_128", "mp3", 44100), ("ulaw_8000", "ulaw", 8000), ("opus", "opus", 48000),
         ("wav", "wav", 48000)],
    )  # fmt: skip
    def test_output_formats(self, name, codec, rate):
        wire = srv.wire_format(name, 48000)
        assert (wire.fmt.name, wire.rate) == (codec, rate)
        for bad in ("pcm_12345", "opus_44100", "flac_8000", "ulaw_16000", None, 3):
            with pytest.raises(ValueError):
                srv.wire_format(bad, 48000)


class TestGradiumProtocol:
    """Gradium's TTS WebSocket (gradium-ai/gradium-py docs/websocket_tts_description.md)."""

    def test_setup_ready_text_timings_end_of_stream(self, agents):
        """Text streamed in pieces; each sentence's audio leaves before the end is sent, at
        48 kHz; its words are timed; end_of_stream is echoed, then the socket closes (1000)."""
        from websockets.asyncio.client import connect

        units = ["Hello world.", "This is a test of streamed text."]

        async def run():
            async with connect(f"{agents.url}/api/speech/tts") as ws:
                await ws.send(json.dumps({"type": "setup", "model_name": "default",
                                          "voice_id": "ref", "output_format": "pcm"}))  # fmt: skip
                ready = json.loads(await ws.recv())
                for piece in ["Hello ", "world. This is a "]:
                    await ws.send(json.dumps({"type": "text", "text": piece}))
                first = json.loads(await ws.recv())  # before the last text chunk is sent
                await ws.send(json.dumps({"type": "text", "text": "test of streamed text."}))
                await ws.send(json.dumps({"type": "end_of_stream"}))
                rest = await ws_messages(ws)
                return ready, [first, *rest], ws.close_code

        ready, messages, code = asyncio.run(run())
        assert ready["type"] == "ready" and ready["sample_rate"] == 48000 and ready["request_id"]
        assert messages[0]["type"] == "audio" and messages[-1] == {"type": "end_of_stream"}
        assert code == 1000
        audio = [base64.b64decode(m["audio"]) for m in messages if m["type"] == "audio"]
        want = agent_seconds(agents.real.model, units)
        assert abs(pcm16_seconds(audio, 48000) - want) < 1e-3
        words = [m for m in messages if m["type"] == "text"]
        assert [w["text"] for w in words] == " ".join(units).split()
        assert all(a["stop_s"] <= b["start_s"] + 1e-3 for a, b in itertools.pairwise(words))
        assert abs(words[-1]["stop_s"] - want) < 1 / 12.5  # within one frame of the audio's end


def pipecat_run(service, frames: list, sample_rate: int = 24000) -> list:
    """Run a Pipecat pipeline [service, collector] on `frames`; return the audio frames."""
    from pipecat.frames.frames import EndFrame, TTSAudioRawFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    class Collect(FrameProcessor):
        def __init__(self):
            super().__init__()
            self.audio = []

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                self.audio.append(frame)
            await self.push_frame(frame, direction)

    async def run():
        collect = Collect()
        worker = PipelineWorker(Pipeline([service, collect]),
                                params=PipelineParams(audio_out_sample_rate=sample_rate))  # fmt: skip
        await worker.queue_frames([*frames, EndFrame()])
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await asyncio.wait_for(runner.run(), 120)
        return collect.audio

    return asyncio.run(run())


def llm_reply(text: str) -> list:
    """An LLM's streamed reply as Pipecat frames: the words as tokens, in order."""
    from pipecat.frames.frames import (
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
    )

    tokens = [w + " " for w in text.split()]
    return [LLMFullResponseStartFrame(), *map(LLMTextFrame, tokens), LLMFullResponseEndFrame()]


def livekit_stream(tts_factory, text: str) -> tuple[bytes, int, list]:
    """LiveKit's streaming API: a word at a time into `stream()`; the audio and its rate, and the
    timed words the plugin reported."""
    import aiohttp

    async def run():
        async with aiohttp.ClientSession() as session:
            tts = tts_factory(session)
            stream = tts.stream()
            for word in text.split():
                stream.push_text(word + " ")
            stream.end_input()
            frames = [event.frame async for event in stream]
            await stream.aclose()
            await tts.aclose()
        audio = b"".join(bytes(f.data) for f in frames)
        return audio, frames[0].sample_rate, frames

    return asyncio.run(asyncio.wait_for(run(), 120))


class TestAgentClients:
    """The voice-agent clients as their users run them, with only their URL changed."""

    UNITS = ["Hello world.", "This is a test of streamed text."]

    def want(self, agents) -> float:
        return agent_seconds(agents.real.model, self.UNITS)

    def test_gradium_sdk(self, agents):
        """gradium-py gradium/client.py GradiumClient(base_url=...).tts: setup, every text
        message and end_of_stream sent without waiting for `ready`; it returns when the server
        closes the socket (any close but 1000 is an error there)."""
        import gradium

        async def run():
            client = gradium.client.GradiumClient(base_url=f"{agents.http}/api/", api_key="k")
            setup = {"model_name": "default", "voice_id": "ref", "output_format": "pcm"}
            return await client.tts(
                setup, ["Hello ", "world. This is a ", "test of streamed text."]
            )

        result = asyncio.run(asyncio.wait_for(run(), 120))
        assert result.sample_rate == 48000
        assert abs(result.pcm16().size / 48000 - self.want(agents)) < 1e-3
        words = [t.text for t in result.text_with_timestamps]
        assert words == " ".join(self.UNITS).split()

    def test_pipecat_gradium(self, agents):
        """pipecat/services/gradium/tts.py: one socket for every turn; setup with a
        client_req_id and close_ws_on_eos false; audio kept only when it echoes that id."""
        from pipecat.services.gradium.tts import GradiumTTSService

        service = GradiumTTSService(api_key="k", url=f"{agents.url}/api/speech/tts",
                                    settings=GradiumTTSService.Settings(voice="ref"))  # fmt: skip
        turns = [*llm_reply(" ".join(self.UNITS)), *llm_reply("Hello world.")]  # two turns
        audio = pipecat_run(service, turns, 48000)
        assert audio and all(f.sample_rate == 48000 for f in audio)
        assert len({f.context_id for f in audio}) == 2  # a client_req_id each, one socket
        seconds = sum(len(f.audio) for f in audio) / 2 / 48000
        want = self.want(agents) + agent_seconds(agents.real.model, ["Hello world."])
        assert abs(seconds - want) < 1e-3

    def test_pipecat_elevenlabs(self, agents):
        """pipecat/services/elevenlabs/tts.py: {url}/v1/text-to-speech/{voice}/
        multi-stream-input?...&output_format=pcm_24000&auto_mode=true with xi-api-key; per turn
        {"text": " "}, the text, then flush and close_context back to back; isFinal ends it."""
        from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

        service = ElevenLabsTTSService(api_key="k", url=agents.url,
                                       settings=ElevenLabsTTSService.Settings(voice="ref"))  # fmt: skip
        audio = pipecat_run(service, llm_reply(" ".join(self.UNITS)), 24000)
        seconds = sum(len(f.audio) for f in audio) / 2 / 24000
        assert abs(seconds - self.want(agents)) < 1e-3

    def test_livekit_gradium(self, agents):
        """livekit-plugins-gradium livekit/plugins/gradium/tts.py: model_endpoint used as
        given; stream() sends one text message per word, then end_of_stream."""
        from livekit.plugins import gradium

        audio, rate, _ = livekit_stream(
            lambda session: gradium.TTS(api_key="k", model_endpoint=f"{agents.url}/api/speech/tts",
                                        voice_id="ref", http_session=session), " ".join(self.UNITS))  # fmt: skip
        assert rate == 48000 and abs(len(audio) / 2 / rate - self.want(agents)) < 1e-3

    def test_livekit_elevenlabs(self, agents):
        """livekit-plugins-elevenlabs livekit/plugins/elevenlabs/tts.py: base_url + /text-to-
        speech/{id}/multi-stream-input?...&sync_alignment=true; the default encoding
        mp3_22050_32; each sentence with flush, then {"text": "", "flush": true}, then
        close_context; it needs isFinal."""
        from livekit.plugins import elevenlabs

        audio, rate, _ = livekit_stream(
            lambda session: elevenlabs.TTS(api_key="k", base_url=f"{agents.http}/v1", voice_id="ref",
                                           http_session=session), " ".join(self.UNITS))  # fmt: skip
        assert rate == 22050  # decoded from MP3 by the plugin
        assert abs(len(audio) / 2 / rate - self.want(agents)) < 0.1  # MP3's padding


async def until(ws, predicate, timeout: float = 60.0) -> list:
    """Messages up to and including the first that `predicate` accepts."""
    out = []
    while True:
        out.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
        if predicate(out[-1]):
            return out


class TestElevenLabsProtocol:
    """ElevenLabs' multi-stream-input and stream-input, as the clients above use them."""

    def test_contexts_alignment_telephony_and_close_context_stops_unflushed_text(self, agents):
        """Two contexts on one socket, in μ-law at 8 kHz: one closed while it speaks (its
        unflushed text stops within a step; isFinal follows), the other flushed and spoken in
        full; each unit's alignment covers its characters and spans its audio."""
        from websockets.asyncio.client import connect

        url = f"{agents.url}/v1/text-to-speech/ref/multi-stream-input?output_format=ulaw_8000"

        async def run():
            async with connect(url, additional_headers={"xi-api-key": "k"}) as ws:
                send = lambda m: ws.send(json.dumps(m))  # noqa: E731
                await send({"text": ""})  # Pipecat's keep-alive, before any context: ignored
                await send({"text": " ", "context_id": "long"})
                await send({"text": " ".join(CORPUS) + " ", "context_id": "long"})
                await until(ws, lambda m: m.get("contextId") == "long" and m.get("audio"))
                await send({"text": "Hello world. ", "context_id": "short", "flush": True})
                await send({"context_id": "short", "close_context": True})  # flushed: spoken
                closed = time.monotonic()
                await send({"context_id": "long", "close_context": True})
                got = await until(ws, lambda m: m.get("isFinal") and m["contextId"] == "long")
                stopped = time.monotonic() - closed
                got += await until(ws, lambda m: m.get("isFinal") and m["contextId"] == "short")
                await send({"close_socket": True})
                return got, stopped, await ws_messages(ws), ws.close_code

        got, stopped, rest, code = asyncio.run(run())
        assert stopped < 1.0, stopped  # a step or two, on a loaded 2-core machine
        assert rest == [] and code == 1000
        short = [m for m in got if m.get("contextId") == "short"]
        audio = b"".join(base64.b64decode(m["audio"]) for m in short if m.get("audio"))
        want = agent_seconds(agents.real.model, ["Hello world."])
        assert abs(len(audio) / 8000 - want) < 1e-3  # one byte a sample
        [aligned] = [m for m in short if m.get("alignment")]
        chars = aligned["alignment"]["chars"]
        assert "".join(chars) == "Hello world. "
        ends = (
            aligned["alignment"]["charStartTimesMs"][-1]
            + aligned["alignment"]["charDurationsMs"][-1]
        )
        assert abs(ends / 1000 - want) < 2e-3
        assert "".join(aligned["normalizedAlignment"]["chars"]) == "Hello world. "

    def test_errors_in_the_protocols_own_words(self, agents):
        """Unknown voice, bad output format, malformed JSON and oversized messages each get
        the protocol's error message (never a silent drop); Gradium without setup is 1008."""
        from websockets.asyncio.client import connect

        base = f"{agents.url}/v1/text-to-speech"

        async def run():
            found = {}
            async with connect(f"{base}/nobody/multi-stream-input") as ws:
                await ws.send(json.dumps({"text": "Hello. ", "context_id": "c"}))
                found["voice"] = json.loads(await ws.recv())
                await ws.send("{not json")
                found["json"] = json.loads(await ws.recv())
                await ws.send(json.dumps({"text": "x" * (1024 * 1024 + 1), "context_id": "c"}))
                found["big"] = json.loads(await ws.recv())
                await ws_messages(ws)
                found["big_code"] = ws.close_code
            async with connect(f"{base}/ref/stream-input?output_format=wav_1") as ws:
                found["format"] = json.loads(await ws.recv())
                await ws_messages(ws)
                found["format_code"] = ws.close_code
            async with connect(f"{agents.url}/api/speech/tts") as ws:
                await ws.send(json.dumps({"type": "text", "text": "Hello."}))
                found["setup"] = json.loads(await ws.recv())
                await ws_messages(ws)
                found["setup_code"] = ws.close_code
            async with connect(f"{agents.url}/api/speech/tts") as ws:
                await ws.send(json.dumps({"type": "setup", "output_format": "flac"}))
                found["bad_setup"] = json.loads(await ws.recv())
            return found

        found = asyncio.run(run())
        assert found["voice"]["error"] == "voice_not_found" and found["voice"]["contextId"] == "c"
        assert "nobody" in found["voice"]["message"]
        assert found["json"]["error"] == "bad_message"
        assert found["big"]["error"] == "too_large" and found["big_code"] == 1009
        assert found["format"]["error"] == "invalid_output_format"
        assert found["format_code"] == 1008
        assert found["setup"] == {"type": "error", "code": 1008,
                                  "message": "Send a setup message first (for this client_req_id)."}  # fmt: skip
        assert found["setup_code"] == 1008
        assert found["bad_setup"]["code"] == 1008 and "flac" in found["bad_setup"]["message"]

    def test_connection_limit_idle_sockets_and_unknown_paths(self, stub):
        """HTTP's limits hold: --max_connections (a 503 before the upgrade), --idle_timeout
        (an idle socket is closed, 1000), and a path no protocol serves is a 404."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        with stub_agents(stub, max_connections=1, idle_timeout=1) as agents:

            async def run():
                url = f"{agents.url}/api/speech/tts"
                async with connect(url) as first:
                    with pytest.raises(InvalidStatus) as full:
                        async with connect(url):
                            pass
                    started = time.monotonic()
                    await ws_messages(first)  # nothing sent: closed when idle
                    idle = time.monotonic() - started, first.close_code
                with pytest.raises(InvalidStatus) as unknown:
                    async with connect(f"{agents.url}/v1/somewhere"):
                        pass
                return full.value.response.status_code, idle, unknown.value.response.status_code

            full, (seconds, code), unknown = asyncio.run(run())
            assert full == 503 and code == 1000 and 0.5 < seconds < 5 and unknown == 404

    def test_busy_key_and_a_disconnect_that_frees_its_place(self, stub):
        """With one place and no queue, a second context is told `busy` while the first speaks
        on; the API key is checked before the upgrade (xi-api-key and x-api-key both work); a
        client that leaves mid-stream frees its place within a second."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        stub.frame_delay = 0.01
        with stub_agents(stub, max_batch=1, max_queue=0, api_key="s3cret") as agents:
            url = agents.url
            multi = f"{url}/v1/text-to-speech/alba/multi-stream-input?output_format=pcm_24000"

            async def run():
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(multi):
                        pass
                assert refused.value.response.status_code == 401
                async with connect(multi, additional_headers={"xi-api-key": "s3cret"}) as ws:
                    await ws.send(json.dumps({"text": LONG_TEXT + " ", "context_id": "a"}))
                    await until(ws, lambda m: m.get("audio"))
                    await ws.send(json.dumps({"text": "Hello. ", "context_id": "b",
                                              "flush": True}))  # fmt: skip
                    busy = await until(ws, lambda m: m.get("error"))
                    more = await until(ws, lambda m: m.get("audio") and m["contextId"] == "a")
                assert agents.engine.active == 1
                left = time.monotonic()  # the client left mid-stream: its place is free at once
                while agents.engine.active and time.monotonic() - left < 1.0:
                    await asyncio.sleep(0.01)
                assert agents.engine.active == 0
                gradium = f"{url}/api/speech/tts"
                async with connect(gradium, additional_headers={"x-api-key": "s3cret"}) as ws:
                    await ws.send(json.dumps({"type": "setup", "voice_id": "alba"}))
                    ready = json.loads(await ws.recv())
                return busy[-1], more[-1], ready

            busy, more, ready = asyncio.run(run())
            assert busy["error"] == "busy" and busy["contextId"] == "b"
            assert more["contextId"] == "a"  # the first context speaks on
            assert ready["type"] == "ready"

    def test_a_fault_in_the_engine_is_an_error_within_a_second_and_the_next_speaks(self, stub):
        """The model raising mid-step: the context's client gets Gradium's error (1011) within
        a second, other sockets go on, and the next request speaks in full."""
        from websockets.asyncio.client import connect

        stub.frame_delay = 0.005
        with stub_agents(stub, max_batch=2) as agents:
            url = f"{agents.url}/api/speech/tts"

            async def speak(text: str):
                async with connect(url) as ws:
                    await ws.send(json.dumps({"type": "setup", "voice_id": "alba"}))
                    await ws.send(json.dumps({"type": "text", "text": text}))
                    await ws.send(json.dumps({"type": "end_of_stream"}))
                    started = time.monotonic()
                    return await ws_messages(ws), time.monotonic() - started, ws.close_code

            stub.fail_after_frames = 5
            messages, seconds, code = asyncio.run(speak("Hello world."))
            assert messages[-1]["type"] == "error" and messages[-1]["code"] == 1011 == code
            assert seconds < 1.0
            stub.fail_after_frames = None
            messages, _, code = asyncio.run(speak("Hello world."))
            assert messages[-1] == {"type": "end_of_stream"} and code == 1000
            assert sum(m["type"] == "audio" for m in messages) > 0

    def test_elevenlabs_sdk_over_tls(self, agents, tmp_path, monkeypatch):
        """elevenlabs/realtime_tts.py convert_realtime: wss:// only, on stream-input; it
        sends {"text": " "} with a chunk schedule, text chunks, then {"text": ""}; a close other
        than 1000 is an error there."""
        from elevenlabs.client import ElevenLabs

        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                       capture_output=True)  # fmt: skip
        tls = srv.agent_tls(srv.Settings(ws_tls_cert=str(cert), ws_tls_key=str(key)))
        server = srv.AgentServer(agents.real.service, "127.0.0.1", 0, tls)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        try:
            client = ElevenLabs(api_key="k", base_url=f"https://127.0.0.1:{server.port}")
            chunks = client.text_to_speech.convert_realtime(
                voice_id="ref", text=iter(["Hello ", "world. This is a ", "test of streamed text."]),
                output_format="pcm_24000")  # fmt: skip
            audio = b"".join(chunks)
        finally:
            server.close()
        want = agent_seconds(agents.real.model, TestAgentClients.UNITS)
        assert abs(len(audio) / 2 / 24000 - want) < 1e-3
