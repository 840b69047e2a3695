"""Wyoming (Home Assistant's voice pipelines), driven by the `wyoming` library."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pocket_tts_server as srv
from tests.helpers import JSON_VALUES, post_json, wait_for
from tools.offline_model import CORPUS, SR


class Wyoming:
    """A wyoming AsyncTcpClient session against the live Wyoming port (helpers for the tests)."""

    def __init__(self, port: int):
        from wyoming.client import AsyncTcpClient

        self.client = AsyncTcpClient("127.0.0.1", port)

    async def __aenter__(self):
        await self.client.connect()
        return self

    async def __aexit__(self, *exc):
        await self.client.disconnect()

    async def send(self, eventable):
        await self.client.write_event(eventable.event())

    async def audio(self) -> list[tuple[str, bytes]]:
        """Events until audio-stop or error: [(type, payload)]."""
        events = []
        while True:
            event = await asyncio.wait_for(self.client.read_event(), 60)
            events.append((event.type, event.payload or b"", event.data))
            if event.type in ("audio-stop", "error"):
                return events


def pcm_seconds(events) -> float:
    return sum(len(p) for kind, p, _ in events if kind == "audio-chunk") / 2 / SR


class TestWyoming:
    """Issue #11: the Wyoming protocol beside HTTP, on the real model, with the wyoming client."""

    @pytest.fixture(scope="class")
    def port(self, real):
        wyoming = srv.WyomingServer(real.service, "127.0.0.1", 0)
        yield wyoming.port
        wyoming.close()

    def http_pcm_seconds(self, real, text: str) -> float:
        r = post_json(real.url, {"input": text, "response_format": "pcm"})
        return len(r.content) / 2 / SR

    def test_describe(self, port):
        from wyoming.info import Describe, Info

        async def run():
            async with Wyoming(port) as w:
                await w.send(Describe())
                return Info.from_event(await w.client.read_event())

        program = asyncio.run(run()).tts[0]
        assert program.name == "pocket-tts-server" and program.installed
        assert program.supports_synthesize_streaming and program.attribution.name == "Kyutai"
        voices = {v.name: v for v in program.voices}
        assert voices["ref"].languages == ["en"] and "default voice" in voices["ref"].description

    def test_synthesize_matches_http(self, real, port):
        from wyoming.tts import Synthesize, SynthesizeVoice

        text = "Hello world. This is a test of the speech server."

        async def run():
            async with Wyoming(port) as w:
                await w.send(Synthesize(text=text, voice=SynthesizeVoice(name="ref")))
                return await w.audio()

        events = asyncio.run(run())
        assert events[0][0] == "audio-start" and events[0][2]["rate"] == SR
        assert events[0][2]["width"] == 2 and events[0][2]["channels"] == 1
        assert sum(kind == "audio-chunk" for kind, *_ in events) > 2  # as generated, not at once
        assert pcm_seconds(events) == pytest.approx(self.http_pcm_seconds(real, text), abs=1e-3)

    def test_streamed_text_is_spoken_sentence_by_sentence(self, real, port):
        from wyoming.tts import (
            Synthesize,
            SynthesizeChunk,
            SynthesizeStart,
            SynthesizeStop,
            SynthesizeVoice,  # fmt: skip
        )

        sentences = ["Hello world.", "This is a test of the speech server.", "It ends here."]
        pieces = [
            "Hel",
            "lo wor",
            "ld. This is a te",
            "st of the spe",
            "ech server. It e",
            "nds here.",
        ]

        async def run():
            async with Wyoming(port) as w:
                await w.send(SynthesizeStart(voice=SynthesizeVoice(name="ref")))
                for piece in pieces[:-1]:
                    await w.send(SynthesizeChunk(text=piece))
                first = await asyncio.wait_for(w.client.read_event(), 30)  # before the last piece
                await w.send(SynthesizeChunk(text=pieces[-1]))
                await w.send(Synthesize(text="".join(pieces)))  # compatibility copy: ignored
                await w.send(SynthesizeStop())
                events = [(first.type, first.payload or b"", first.data)]
                while events[-1][0] != "synthesize-stopped":
                    event = await asyncio.wait_for(w.client.read_event(), 60)
                    events.append((event.type, event.payload or b"", event.data))
                return events

        events = asyncio.run(run())
        assert events[0][0] == "audio-start"  # the first sentence spoke before the text ended
        spoken, current = [], []
        for kind, payload, _ in events:
            if kind == "audio-chunk":
                current.append((kind, payload, None))
            elif kind == "audio-stop":
                spoken.append(pcm_seconds(current))
                current = []
        want = [self.http_pcm_seconds(real, s) for s in sentences]
        assert spoken == pytest.approx(want, abs=1e-3)  # each sentence once, in order

    def test_unknown_voice_is_an_error_event(self, port):
        from wyoming.tts import Synthesize, SynthesizeVoice

        async def run():
            async with Wyoming(port) as w:
                await w.send(Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")))
                return await w.audio()

        (kind, _, data), *_ = asyncio.run(run())
        assert kind == "error" and data["code"] == "voice_not_found" and "alloy" in data["text"]

    def test_wordless_text_is_a_short_silence(self, port):
        from wyoming.tts import Synthesize

        async def run():
            async with Wyoming(port) as w:
                await w.send(Synthesize(text="..."))
                return await w.audio()

        events = asyncio.run(run())
        assert [e[0] for e in events][0 :: len(events) - 1] == ["audio-start", "audio-stop"]
        assert pcm_seconds(events) == pytest.approx(srv.WORDLESS_SILENCE_SECONDS, abs=1e-3)

    def test_a_disconnect_frees_the_stream_at_once(self, real, port):
        from wyoming.tts import Synthesize

        async def leave_early():
            async with Wyoming(port) as w:
                await w.send(Synthesize(text=" ".join(CORPUS * 4)))
                while (await w.client.read_event()).type != "audio-chunk":
                    pass

        asyncio.run(leave_early())
        engine = real.server.engine
        assert wait_for(lambda: engine.active == 0 and engine.scheduler.stats()["batch_size"] == 0,
                        timeout=3)  # fmt: skip
        t0 = time.monotonic()
        self.test_describe(port)
        assert time.monotonic() - t0 < 1

    @pytest.mark.parametrize(
        "raw",
        [b"not json\n", b'{"type": "synthesize"}\n', b'{"type": "synthesize", "data": {"text": 5}}\n',
         b'{"type": "synthesize-chunk", "data": {"text": "x"}}\n',
         b'{"type": "synthesize-start", "data": {"voice": "alba"}}\n{"type": "synthesize-stop"}\n',
         b'{"type": "audio-chunk", "data": {}, "payload_length": 99999999}\n',
         b'{"type": "describe", "data_length": -5}\n', b"\xff\xfe\n" * 10, b"{" * 100000 + b"\n"],
    )  # fmt: skip
    def test_malformed_events_never_crash_the_server(self, port, raw):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(raw)
            sock.settimeout(2)
            with contextlib.suppress(OSError):
                sock.recv(65536)
        self.test_describe(port)  # the server still answers

    @staticmethod
    async def raw_events(port: int, data: bytes, until: str) -> list:
        """Send `data` in one write; read events until one of type `until` (or an error)."""
        from wyoming.event import async_read_event

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            events = []
            while not events or events[-1].type not in (until, "error"):
                event = await asyncio.wait_for(async_read_event(reader), 60)
                assert event is not None, [e.type for e in events]
                events.append(event)
            return events
        finally:
            writer.close()

    def test_start_chunks_and_stop_in_one_write_are_spoken(self, real, port):
        """Issue #19: Home Assistant can send a short streamed reply in one burst; the stream's
        task used to read the voice after the stop had ended the stream, and answered `error`."""
        lines = [{"type": "synthesize-start", "data": {"voice": {"name": "ref"}}},
                 {"type": "synthesize-chunk", "data": {"text": "Hello world. "}},
                 {"type": "synthesize-chunk", "data": {"text": "It ends here."}},
                 {"type": "synthesize-stop"}]  # fmt: skip
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        events = asyncio.run(self.raw_events(port, data, "synthesize-stopped"))
        kinds = [e.type for e in events]
        assert "error" not in kinds and kinds[-1] == "synthesize-stopped"
        spoken = sum(len(e.payload or b"") for e in events if e.type == "audio-chunk") / 2 / SR
        want = sum(self.http_pcm_seconds(real, t) for t in ("Hello world.", "It ends here."))
        assert spoken == pytest.approx(want, abs=1e-3)

    def test_the_input_limit_and_request_timeout_hold_over_wyoming(self, real, port, monkeypatch):
        """Issue #19: Wyoming used to accept any length and run past --request_timeout."""
        from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart

        monkeypatch.setattr(real.service.settings, "max_input_chars", 40)

        async def run(*eventables):
            async with Wyoming(port) as w:
                for eventable in eventables:
                    await w.send(eventable)
                return await w.audio()

        (kind, _, data), *_ = asyncio.run(run(Synthesize(text="Hello world. " * 4)))
        assert kind == "error" and data["code"] == "too_long" and "40" in data["text"]
        chunks = [SynthesizeChunk(text="Hello world, ") for _ in range(4)]
        (kind, _, data), *_ = asyncio.run(run(SynthesizeStart(), *chunks))
        assert kind == "error" and data["code"] == "too_long"
        monkeypatch.setattr(real.service.settings, "max_input_chars", 4096)
        text = " ".join(CORPUS * 3)
        whole = self.http_pcm_seconds(real, text)
        monkeypatch.setattr(real.service.settings, "request_timeout", 0.5)
        t0 = time.monotonic()
        events = asyncio.run(run(Synthesize(text=text)))
        assert events[-1][0] == "audio-stop" and time.monotonic() - t0 < 5
        assert 0 < pcm_seconds(events) < whole / 2

    def test_a_client_that_stops_reading_frees_its_place(self, real, port, monkeypatch):
        """Issue #19: a Wyoming client that never reads held its stream's place for minutes.
        Its place is freed at --request_timeout (writes are bounded by it too)."""
        monkeypatch.setattr(real.service.settings, "request_timeout", 1.0)
        engine = real.server.engine
        event = {"type": "synthesize", "data": {"text": " ".join(CORPUS * 15)}}  # ~2 min
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(json.dumps(event).encode() + b"\n")  # and never reads
            assert wait_for(lambda: engine.active == 1, timeout=10)
            assert wait_for(lambda: engine.active == 0, timeout=10)  # it took ~20 s to speak
        self.test_describe(port)  # the server still answers

    def test_connections_are_bounded_in_size_number_and_idle_time(self, real, port,
                                                                   monkeypatch):  # fmt: skip
        """Issue #19: a declared payload of 1e12 bytes was buffered without limit, idle
        connections were never closed and their number never capped."""
        from wyoming.event import async_read_event

        async def answer(data: bytes):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(data)
                await writer.drain()
                event = await asyncio.wait_for(async_read_event(reader), 10)
                closed = await asyncio.wait_for(reader.read(), 10) == b""
                return event, closed
            finally:
                writer.close()

        huge = json.dumps({"type": "synthesize", "payload_length": 10**12}).encode() + b"\n"
        event, closed = asyncio.run(answer(huge + b"x" * 1000))
        assert event.type == "error" and event.data["code"] == "too_large" and closed
        endless = b"{" + b" " * 100_000  # a header with no line end
        event, closed = asyncio.run(answer(endless))
        assert event.type == "error" and event.data["code"] == "too_large" and closed
        monkeypatch.setattr(real.service.settings, "idle_timeout", 1)
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.settimeout(10)
            assert idle.recv(1) == b""  # closed by the server
        assert 0.9 < time.monotonic() - t0 < 5
        monkeypatch.setattr(real.service.settings, "idle_timeout", 30)
        monkeypatch.setattr(real.service.settings, "max_connections", 2)
        with socket.create_connection(("127.0.0.1", port)), \
                socket.create_connection(("127.0.0.1", port)):  # fmt: skip
            time.sleep(0.2)
            describe = json.dumps({"type": "describe"}).encode() + b"\n"
            event, closed = asyncio.run(answer(describe))
            assert event.type == "error" and event.data["code"] == "busy" and closed
        time.sleep(0.2)
        self.test_describe(port)  # a place again

    def test_restarting_a_stream_leaves_no_task_behind(self, real, port, caplog):
        """Issue #19: 100k `synthesize-start` on one connection wrote ~97k "Task was destroyed
        but it is pending!" lines: each start left the stream before it running."""
        lines = [{"type": "synthesize-start"}] * 2000 + [{"type": "describe"}]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        with caplog.at_level(logging.ERROR):
            events = asyncio.run(self.raw_events(port, data, "info"))
            gc.collect()
        assert events[-1].type == "info" and "Task was destroyed" not in caplog.text

    def test_a_log_flood_is_cut_to_a_burst_with_a_count(self):
        flood, kept = srv.LogFlood(burst=5, seconds=0.2), []

        def emit(i):
            record = logging.LogRecord("x", logging.WARNING, __file__, 1, "same %s", (i,), None)
            if flood.filter(record):
                kept.append(record.getMessage())

        for i in range(1000):
            emit(i)
        assert kept == [f"same {i}" for i in range(5)]
        time.sleep(0.25)
        emit(1000)
        assert kept[-1] == "same 1000 [995 more like it were left out]"

    def test_a_failed_synthesis_leaves_the_connection_usable(self, real, port, monkeypatch):
        """Issue #19: a failure while speaking set the session's stop flag for good, so the next
        `synthesize` on that connection got audio-start, audio-stop and no audio."""
        from wyoming.tts import Synthesize

        steps, calls = real.server.engine.steps, []
        original = steps.step

        def fail_once(*args):
            if not calls:
                calls.append(1)
                raise RuntimeError("injected step failure")
            return original(*args)

        monkeypatch.setattr(steps, "step", fail_once)

        async def run():
            async with Wyoming(port) as w:
                await w.send(Synthesize(text="Hello world."))
                failed = await w.audio()
                await w.send(Synthesize(text="Hello world."))
                return failed, await w.audio()

        failed, spoken = asyncio.run(run())
        assert failed[-1][0] == "error" and failed[-1][2]["code"] == "synthesis_failed"
        assert spoken[-1][0] == "audio-stop"
        assert pcm_seconds(spoken) == pytest.approx(self.http_pcm_seconds(real, "Hello world."))

    def test_a_port_that_cannot_be_bound_fails_at_once(self, real):
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            t0 = time.monotonic()
            with pytest.raises(srv.WyomingError, match="cannot be opened"):
                srv.WyomingServer(real.service, "127.0.0.1", held.getsockname()[1])
        assert time.monotonic() - t0 < 10

    def test_a_full_server_answers_busy(self, real, port, monkeypatch):
        from wyoming.tts import Synthesize

        admission = real.server.engine.admission
        monkeypatch.setattr(admission, "max_queue", 0)
        monkeypatch.setattr(admission, "active", admission.capacity.value)  # every place taken

        async def run():
            async with Wyoming(port) as w:
                await w.send(Synthesize(text="Hello."))
                return await w.audio()

        (kind, _, data), *_ = asyncio.run(run())
        assert kind == "error" and data["code"] == "busy"

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(events=st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["describe", "synthesize", "synthesize-start", "synthesize-chunk",
                                  "synthesize-stop", "audio-chunk", "x"]) | st.text(max_size=8),
         "data": JSON_VALUES}), min_size=1, max_size=4))  # fmt: skip
    def test_fuzzed_events(self, port, events):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"".join(json.dumps(e).encode() + b"\n" for e in events))
            sock.settimeout(0.5)
            with contextlib.suppress(OSError):
                sock.recv(1 << 20)
        self.test_describe(port)

    def test_streamed_text_without_sentence_ends_costs_linear_time(self):
        """Issue #19: 1,000 pieces of 1 KB with no sentence end took 25 s on the event loop."""
        pending, t0 = "", time.monotonic()
        for _ in range(2000):
            finished, pending = srv.split_finished(pending + "word " * 100, len(pending))
            assert not finished
        assert time.monotonic() - t0 < 2 and len(pending) == 2000 * 500

    def test_zeroconf_announcement(self):
        info = srv.wyoming_service_info(10200, "192.168.1.5", "kitchen")
        assert info.type == "_wyoming._tcp.local." and info.port == 10200
        assert info.name == "kitchen._wyoming._tcp.local."
        assert socket.inet_ntoa(info.addresses[0]) == "192.168.1.5"

    @pytest.mark.parametrize(
        "text,finished,rest",
        [("Hello world. How", ["Hello world."], "How"), ("One! Two? Thr", ["One!", "Two?"], "Thr"),
         ('He said "stop." Then', ['He said "stop."'], "Then"), ("No end yet", [], "No end yet"),
         ("Pi is 3.14 and", [], "Pi is 3.14 and")],
    )  # fmt: skip
    def test_streamed_text_waits_for_a_sentence_end(self, text, finished, rest):
        assert srv.split_finished(text) == (finished, rest)
        for cut in range(len(text) + 1):  # streamed in two pieces: the same sentences
            first, pending = srv.split_finished(text[:cut])
            more, rest_after = srv.split_finished(pending + text[cut:], len(pending))
            assert ([*first, *more], rest_after) == (finished, rest)
