"""The HTTP API: endpoints and OpenAI's error objects, real HTTP (chunked streaming,
disconnects), OpenAI compatibility, and the clients' own requests replayed from their source.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import socket
import time
from types import SimpleNamespace

import av
import numpy as np
import pytest
import requests

import pocket_tts_server as srv
from tests.helpers import (
    CODEC_SLACK,
    CONTENT_TYPES,
    LiveServer,
    assert_openai_error,
    decode,
    dominant_freq,
    duration,
    expected_seconds,
    make_server,
    speech,
    spoken_freq,
    wav_bytes,
)
from tools.offline_model import SR, tone, write_audio


class TestEndpointsAndErrors:
    def test_health(self, client):
        h = client.get("/health").json
        assert h["status"] == "ok" and h["sample_rate"] == SR and h["device"] == "cpu"
        assert h["voices"] == len(client.get("/v1/voices").json["data"])

    def test_models(self, client):
        models = client.get("/v1/models").json
        assert models["object"] == "list"
        assert {"id", "object", "created", "owned_by"} <= set(models["data"][0])
        assert "tts-1" in [m["id"] for m in models["data"]]
        assert client.get("/v1/audio/models").json["models"][0] == {"id": "pocket-tts"}

    @pytest.mark.parametrize(
        "body,param",
        [
            ({}, "input"),
            ({"input": ""}, "input"),
            ({"input": "   \n"}, "input"),
            ({"input": 42}, "input"),
            ({"input": ["a"]}, "input"),
            ({"input": "x" * 4097}, "input"),
            ({"input": "hi", "response_format": "ogg"}, "response_format"),
            ({"input": "hi", "response_format": 3}, "response_format"),
            ({"input": "hi", "response_format": [None]}, "response_format"),  # found by the fuzzer
            ({"input": "hi", "stream_format": ["sse"]}, "stream_format"),
            ({"input": "hi", "speed": 0.2}, "speed"),
            ({"input": "hi", "speed": 4.5}, "speed"),
            ({"input": "hi", "speed": "fast"}, "speed"),
            ({"input": "hi", "speed": True}, "speed"),
            ({"input": "hi", "stream": "yes"}, "stream"),
            ({"input": "hi", "stream_format": "chunks"}, "stream_format"),
            ({"input": "hi", "voice": 7}, "voice"),
            ({"input": "hi", "voice": {"name": "alloy"}}, "voice"),
            ({"input": "hi", "voice": {"id": 3}}, "voice"),
            ({"input": "hi", "voice": "nobody"}, "voice"),
            ({"input": "hi", "model": {"x": 1}}, "model"),
            ({"input": "hi", "normalize": "no"}, "normalize"),
        ],
    )
    def test_bad_fields_name_their_param(self, client, body, param):
        err = assert_openai_error(client.post("/v1/audio/speech", json=body), 400, param)
        assert err["type"] == "invalid_request_error"

    def test_input_at_the_limit_is_accepted(self, stub):
        client = make_server(stub, max_input_chars=20).app.test_client()
        assert speech(client, input="a" * 20).status_code == 200
        assert_openai_error(speech(client, input="a" * 21), 400, "input")

    @pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe"])
    def test_bad_json_bodies(self, client, raw):
        r = client.post("/v1/audio/speech", data=raw, content_type="application/json")
        assert_openai_error(r, 400)

    def test_unknown_route_and_method_are_json(self, client):
        assert_openai_error(client.get("/v1/nothing"), 404)
        err = assert_openai_error(client.get("/v1/audio/speech"), 405)
        assert "GET" in err["message"]
        assert "POST" in client.get("/v1/audio/speech").headers["Allow"]

    def test_internal_fault_is_500_json_without_traceback(self, client, stub, caplog):
        stub.fail_after_frames = 2
        err = assert_openai_error(speech(client, response_format="wav"), 500)
        assert err["type"] == "server_error" and "stub generation failure" not in err["message"]
        assert "stub generation failure" in caplog.text  # logged server-side

    def test_failure_after_streaming_began_ends_the_stream_cleanly(self, client, stub, caplog):
        stub.fail_after_frames = 5
        r = speech(client, response_format="wav", stream=True)
        assert r.status_code == 200
        assert 0.3 < duration(r.data) < 0.5  # 5 frames, then a clean end of file
        assert "after the response started" in caplog.text

    def test_api_key(self, stub):
        client = make_server(stub, api_key="s3cret").app.test_client()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.post("/v1/audio/speech", json={"input": "hi"}, headers=headers)
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        guarded = [client.get("/v1/voices/alba"), client.post("/v1/voices"),
                   client.post("/v1/audio/voices"), client.delete("/v1/voices/x"),
                   client.delete("/v1/audio/voices/x")]  # fmt: skip
        for r in guarded:  # every write, and a voice's details, still need the key
            assert_openai_error(r, 401)
        ok = client.post(
            "/v1/audio/speech", json={"input": "hi"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/pocket-tts-logo.png").status_code == 200

    def test_authorization_header_is_ignored_without_api_key(self, client):
        r = client.post(
            "/v1/audio/speech", json={"input": "hi"}, headers={"Authorization": "Bearer anything"}
        )
        assert r.status_code == 200


class TestLiveHttp:
    def test_streaming_is_chunked_and_starts_before_generation_ends(self, live, stub):
        stub.frame_delay = 0.02  # ~4x real time
        t0 = time.monotonic()
        with requests.post(
            f"{live.url}/v1/audio/speech",
            stream=True,
            json={
                "input": "Hello world. This is a test.",
                "response_format": "pcm",
                "stream": True,
            },
        ) as r:
            assert r.headers.get("Transfer-Encoding") == "chunked"
            assert "Content-Length" not in r.headers
            chunks = r.iter_content(chunk_size=None)
            first = next(chunks)
            t_first = time.monotonic() - t0
            rest = b"".join(chunks)
        total = time.monotonic() - t0
        assert first and t_first < total / 3, (t_first, total)
        assert len(first + rest) > 0

    def test_non_streaming_has_content_length(self, live):
        r = requests.post(
            f"{live.url}/v1/audio/speech", json={"input": "Hi.", "response_format": "flac"}
        )
        assert int(r.headers["Content-Length"]) == len(r.content) > 0

    def test_disconnect_stops_generation(self, live, stub):
        stub.frame_delay = 0.02
        long_text = "This sentence is spoken many times over. " * 20
        with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as sock:
            body = json.dumps({"input": long_text, "response_format": "pcm", "stream": True})
            sock.sendall(
                f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            assert sock.recv(4096)
        deadline = time.monotonic() + 5
        while not stub.stopped and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stub.stopped == [True]
        assert len(stub.generated) < 3  # the rest of the text was never generated

    @pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
    def test_openai_sdk_every_format(self, live, stub, server, fmt):
        import openai

        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
        text = "Hello world. This is a test."
        want = expected_seconds(stub, server.engine, text)
        audio = client.audio.speech.create(
            model="tts-1", voice="alloy", input=text, response_format=fmt
        )
        assert abs(duration(audio.content, fmt) - want) <= CODEC_SLACK[fmt] + 0.002
        with client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="marius", input=text, response_format=fmt, speed=2.0
        ) as response:
            data = b"".join(response.iter_bytes())
        assert abs(duration(data, fmt) - want / 2) <= CODEC_SLACK[fmt] + 0.03

    def test_openai_sdk_raises_bad_request_with_param(self, live):
        import openai

        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.audio.speech.create(model="tts-1", voice="nobody", input="hi")
        assert info.value.body["param"] == "voice"


WORDLESS = [
    ".",
    "...",
    "\u2026",
    "---",
    "**",
    ")",
    "?!",
    "\U0001f60a",
    '"..."',
    "\u2013 \U0001f600 ...",
]


def joined_mp3_seconds(*parts: bytes) -> float:
    """Decode MP3 responses joined byte for byte, as one file; PyAV raises on a broken join."""
    with av.open(io.BytesIO(b"".join(parts)), format="mp3") as container:
        return sum(frame.samples for frame in container.decode(audio=0)) / SR


def sse_events(data: bytes) -> list:
    lines = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


class TestOpenAICompatibility:
    @pytest.mark.parametrize("text", WORDLESS)
    @pytest.mark.parametrize("fmt", ["mp3", "wav", "pcm"])
    @pytest.mark.parametrize("stream", [False, True])
    def test_wordless_input_is_a_short_silence(self, client, stub, text, fmt, stream):
        r = speech(client, input=text, response_format=fmt, stream=stream)
        assert r.status_code == 200, r.data
        assert r.content_type == CONTENT_TYPES[fmt]
        samples, _ = decode(r.data, fmt)
        seconds = samples.size / SR
        assert srv.WORDLESS_SILENCE_SECONDS <= seconds <= srv.WORDLESS_SILENCE_SECONDS + 0.1
        assert np.abs(samples).max() < 1e-3
        assert stub.generated == []  # the model was never asked

    @pytest.mark.parametrize("fmt", ["opus", "aac", "flac"])
    def test_wordless_input_in_every_format(self, client, fmt):
        r = speech(client, input="...", response_format=fmt)
        assert r.status_code == 200 and duration(r.data) >= srv.WORDLESS_SILENCE_SECONDS

    def test_wordless_sse_still_ends_with_done(self, client):
        r = speech(client, input="\U0001f60a", stream_format="sse", response_format="pcm")
        assert r.status_code == 200 and r.mimetype == "text/event-stream"
        events = sse_events(r.data)
        assert events[-1] == "[DONE]" and events[-2]["type"] == "speech.audio.done"
        assert events[-2]["usage"]["input_tokens"] == 0
        audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-2])
        assert len(audio) == 2 * round(srv.WORDLESS_SILENCE_SECONDS * SR)

    def test_unknown_voice_is_voice_not_found_even_for_wordless_input(self, client):
        for text in ("Hello.", "."):
            err = assert_openai_error(speech(client, input=text, voice="nobody"), 400, "voice")
            assert err["code"] == "voice_not_found"
            assert "alloy" in err["message"] and "alba" in err["message"]

    def test_voice_object_is_accepted(self, client):
        assert spoken_freq(client, voice={"id": "marius"}) == pytest.approx(400, abs=2)
        assert spoken_freq(client, voice={"id": "nova"}) == spoken_freq(client, voice="nova")

    def test_model_names_the_voice_when_voice_is_missing(self, stub, voices_dir):
        write_audio(voices_dir / "Speaker Two.wav", tone(320, 2.0))
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        assert spoken_freq(client, model="Speaker Two") == pytest.approx(320, abs=3)
        assert spoken_freq(client, model="estelle") == pytest.approx(500, abs=2)
        # A model id, or a model that names nothing, leaves the default voice.
        for model in ("tts-1", "some-other-model"):
            assert spoken_freq(client, model=model) == pytest.approx(300, abs=2)
        # An explicit voice wins over the model.
        assert spoken_freq(client, model="estelle", voice="marius") == pytest.approx(400, abs=2)

    def test_custom_voice_routes(self, stub, voices_dir):
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        form = {"audio_sample": (io.BytesIO(wav_bytes(360)), "sample.wav"),
                "name": "Narrator", "consent": "cons_123"}  # fmt: skip
        r = client.post("/v1/audio/voices", data=form, content_type="multipart/form-data")
        assert r.status_code == 200, r.data
        assert set(r.json) == {"id", "object", "name", "created_at", "type"}
        assert r.json["object"] == "audio.voice" and r.json["type"] == "audio_sample"
        assert r.json["id"] == r.json["name"] == "Narrator"
        assert abs(r.json["created_at"] - time.time()) < 60
        assert stub.encodes == ["alba", "clone"]  # latents computed at upload
        assert spoken_freq(client, voice={"id": "Narrator"}) == pytest.approx(360, abs=3)
        r = client.delete("/v1/audio/voices/Narrator")
        assert r.json == {"id": "Narrator", "object": "audio.voice.deleted", "deleted": True}
        err = assert_openai_error(client.delete("/v1/audio/voices/Narrator"), 404, "name")
        assert err["code"] == "voice_not_found"

    @pytest.mark.parametrize(
        "form,param",
        [
            ({"name": "x", "consent": "c"}, "audio_sample"),
            ({"name": "x", "audio_sample": (io.BytesIO(b"text"), "notes.txt")}, "audio_sample"),
            ({"name": "x", "audio_sample": (io.BytesIO(b"\0" * 99), "a.wav")}, "audio_sample"),
            ({"name": "-bad", "audio_sample": (io.BytesIO(b"x"), "a.wav")}, "name"),
            ({"name": "alloy", "audio_sample": (io.BytesIO(b"x"), "a.wav")}, "name"),
            ({"name": "x", "type": "prompt", "prompt": "a deep voice"}, "type"),
        ],
    )
    def test_custom_voice_errors_name_their_param(self, client, form, param):
        r = client.post("/v1/audio/voices", data=form, content_type="multipart/form-data")
        assert_openai_error(r, 409 if form.get("name") == "alloy" else 400, param)

    def test_every_response_has_a_unique_request_id_that_is_logged(self, client, caplog):
        caplog.set_level(logging.INFO, logger="pocket_tts_server")
        responses = [client.get("/health"), client.get("/v1/models"), speech(client),
                     client.get("/nowhere"), speech(client, speed=9)]  # fmt: skip
        ids = [r.headers["x-request-id"] for r in responses]
        assert len(set(ids)) == len(ids) and all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids)
        for request_id, r in zip(ids, responses, strict=True):
            line = next(m for m in caplog.messages if request_id in m)
            assert str(r.status_code) in line

    @pytest.mark.parametrize("stream", [False, True])
    def test_mp3_responses_join_into_one_stream(self, client, stream):
        texts = ["Hello world.", "This is a test.", "\U0001f60a"]
        parts = [speech(client, input=t, stream=stream).data for t in texts]
        for part in parts:
            assert part[0] == 0xFF and part[1] & 0xE0 == 0xE0  # starts on an MPEG frame sync
            assert b"Xing" not in part[:2048] and b"Info" not in part[:2048]
        alone = [joined_mp3_seconds(p) for p in parts]
        assert joined_mp3_seconds(*parts) == pytest.approx(sum(alone), abs=1e-6)

    def test_default_voice_may_be_a_relative_path(self, stub, tmp_path, monkeypatch):
        (tmp_path / "voices").mkdir()
        write_audio(tmp_path / "voices" / "me.wav", tone(280, 2.0))
        monkeypatch.chdir(tmp_path)
        server = make_server(stub, default_voice="voices/me.wav")
        assert server.voices.default.ref == str(tmp_path / "voices" / "me.wav")
        assert spoken_freq(server.app.test_client()) == pytest.approx(280, abs=3)

    def test_a_default_given_as_a_path_answers_to_its_listed_name(self, stub, reference):
        """GET /v1/voices says `"default": "ref"`; a client that sends that name gets that voice."""
        client = make_server(stub, default_voice=str(reference)).app.test_client()
        listed = client.get("/v1/voices").json["default"]
        assert listed == reference.stem
        assert spoken_freq(client, voice=listed) == pytest.approx(spoken_freq(client), abs=1)
        assert_openai_error(speech(client, voice="nobody-here"), 400, "voice")

    def test_pauses_insert_silence(self, client, server, stub):
        plain = expected_seconds(stub, server.engine, "Hello world.")
        cases = {
            "Hello world. [pause:1.5] Hello world.": 2 * plain + 1.5,
            '<speak>Hello world.<break time="500ms"/>Hello world.</speak>': 2 * plain + 0.5,
            'Hello world. <break time="2s"/>': plain + 2.0,
            "[pause:99] Hello world.": plain + srv.MAX_PAUSE_SECONDS,
            "[pause:1.5]": 1.5,
        }
        for text, want in cases.items():
            r = speech(client, input=text, response_format="pcm")
            assert duration(r.data, "pcm") == pytest.approx(want, abs=0.002), text
        r = speech(client, input="Hello world. [pause:1.5]", response_format="pcm")
        samples, _ = decode(r.data, "pcm")
        assert np.abs(samples[-int(1.4 * SR) :]).max() < 1e-3  # the pause is silent

    def test_tags_are_not_read_aloud(self, client, stub):
        speech(client, input='<speak><prosody rate="slow">Hello <emphasis>world</emphasis>.'
                             "</prosody></speak>")  # fmt: skip
        assert stub.generated == ["Hello world."]
        speech(client, input="Hello <b>world</b>.", normalize=False)
        assert stub.generated[-1] == "Hello <b>world</b>."  # normalize: false reads it verbatim


@pytest.fixture
def keyed(stub, voices_dir):
    """A live server as the README starts it for clients: an API key and a voices folder."""
    write_audio(voices_dir / "Speaker Two.wav", tone(320, 2.0))
    live = LiveServer(
        make_server(stub, api_key="sk-local", voices_dir=str(voices_dir)).app, threads=6
    )
    yield SimpleNamespace(url=live.url, auth={"Authorization": "Bearer sk-local"})
    live.close()


class TestClients:
    def test_home_assistant_openai_tts(self, keyed):
        """sfortis/openai_tts: custom_components/openai_tts/api_validation.py (setup probe, 10 s,
        only a 2xx passes), voice_listing.py (GET <speech url minus /speech>/voices?limit=100 with
        the key; reads items/data/voices of {id, name}), and tts.py, which joins per-sentence MP3s.
        """
        url = f"{keyed.url}/v1/audio/speech"
        headers = {"Content-Type": "application/json", **keyed.auth}
        probe = {"model": "tts-1", "input": ".", "voice": "alloy", "response_format": "mp3"}
        r = requests.post(url, json=probe, headers=headers, timeout=10)
        assert 200 <= r.status_code < 300 and r.headers["Content-Type"] == "audio/mpeg"
        assert joined_mp3_seconds(r.content) >= srv.WORDLESS_SILENCE_SECONDS
        voices = requests.get(
            url.rsplit("/", 1)[0] + "/voices", params={"limit": 100}, headers=keyed.auth, timeout=8
        ).json()["voices"]
        assert {"alloy", "alba", "Speaker Two"} <= {v["id"] for v in voices}
        assert all(v["name"] for v in voices)
        sentences = ["Good morning.", "The kitchen light is on.", "It is ten degrees outside."]
        parts = [
            requests.post(url, headers=headers, timeout=30,
                          json={**probe, "input": s, "voice": "Speaker Two"}).content
            for s in sentences
        ]  # fmt: skip
        assert joined_mp3_seconds(*parts) == pytest.approx(
            sum(joined_mp3_seconds(p) for p in parts), abs=1e-6
        )
        r = requests.post(url, json={**probe, "input": "Hi.", "voice": "ghost"}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_found"

    def test_sillytavern(self, keyed):
        """SillyTavern: public/scripts/extensions/tts/openai-compatible.js posts {model, input,
        voice, response_format: 'mp3', speed} to its server, and src/endpoints/openai.js
        (/custom/generate-voice) forwards that body to the provider endpoint with the key.
        Narration arrives as quoted ellipses; a non-2xx is shown as a failure toast.
        """
        for text in ['"..."', '*She smiles.* "Welcome back, traveller."']:
            body = {"model": "tts-1", "input": text, "voice": "nova",
                    "response_format": "mp3", "speed": 1}  # fmt: skip
            r = requests.post(f"{keyed.url}/v1/audio/speech", json=body, headers=keyed.auth)
            assert r.status_code == 200 and r.headers["Content-Type"] == "audio/mpeg"
            assert duration(r.content) > 0.2

    def test_librechat_openai_and_localai_providers(self, keyed):
        """LibreChat: api/server/services/Files/Audio/TTSService.js. openAIProvider sends
        {input, model, voice}; localAIProvider sends {input, model: <voice>} with no voice field.
        streamAudio pipes one response per sentence into a single audio/mpeg stream.
        """
        url = f"{keyed.url}/v1/audio/speech"
        sentences = ["Here is the answer.", "It has two parts.", "\U0001f60a"]
        parts = []
        for text in sentences:
            r = requests.post(url, json={"input": text, "model": "tts-1", "voice": "echo"},
                              headers={"Content-Type": "application/json", **keyed.auth})  # fmt: skip
            assert r.status_code == 200 and r.headers["Content-Type"] == "audio/mpeg"
            parts.append(r.content)
        assert joined_mp3_seconds(*parts) > 2 * srv.WORDLESS_SILENCE_SECONDS
        r = requests.post(url, json={"input": "Hello world.", "model": "Speaker Two"},
                          headers=keyed.auth)  # fmt: skip
        assert r.status_code == 200
        assert dominant_freq(*decode(r.content)) == pytest.approx(320, abs=5)

    def test_open_webui(self, keyed):
        """Open WebUI: backend/open_webui/routers/audio.py. get_available_voices and
        get_available_models GET {base}/audio/voices and {base}/audio/models with no
        Authorization header and read data["voices"] as [{id, name}] / data["models"]; on any
        error they fall back to six stock names. Speech posts the page's {input, voice} with the
        configured model and key, and caches the bytes as .mp3.
        """
        voices = requests.get(f"{keyed.url}/v1/audio/voices")
        assert voices.status_code == 200
        listed = {v["id"]: v["name"] for v in voices.json()["voices"]}
        assert "Speaker Two" in listed and "alloy" in listed
        models = requests.get(f"{keyed.url}/v1/audio/models").json()["models"]
        assert "tts-1" in [m["id"] for m in models]
        body = {"input": "Hello from the chat.", "voice": "Speaker Two", "model": "tts-1"}
        r = requests.post(f"{keyed.url}/v1/audio/speech", json=body, headers=keyed.auth)
        assert r.status_code == 200 and duration(r.content) > 0.5
        r = requests.post(f"{keyed.url}/v1/audio/speech", json=body)  # no key: refused
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    def test_openai_python_sdk(self, keyed, tmp_path):
        """The openai package itself: resources/audio/voices.py (create: multipart audio_sample,
        consent, name; delete), resources/audio/speech.py (voice may be {"id": ...};
        stream_format="sse")."""
        import openai

        client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-local")
        sample = write_audio(tmp_path / "me.wav", tone(260, 3.0))
        with sample.open("rb") as f:
            voice = client.audio.voices.create(name="Me", audio_sample=f, consent="cons_1")
        assert (voice.id, voice.object, voice.type) == ("Me", "audio.voice", "audio_sample")
        audio = client.audio.speech.create(
            model="gpt-4o-mini-tts", voice={"id": voice.id}, input="Hello world.",
            response_format="wav",
        )  # fmt: skip
        assert dominant_freq(*decode(audio.content)) == pytest.approx(260, abs=5)
        with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Hello world.", response_format="pcm",
            stream_format="sse",
        ) as response:  # fmt: skip
            events = sse_events(response.read())
        assert [e["type"] for e in events[:-1]][-1] == "speech.audio.done"
        deleted = client.audio.voices.delete(voice.id)
        assert deleted.deleted and deleted.object == "audio.voice.deleted"
        with pytest.raises(openai.NotFoundError):
            client.audio.voices.delete(voice.id)
        with pytest.raises(openai.BadRequestError) as bad:
            client.audio.speech.create(model="tts-1", voice={"id": "Me"}, input="Hi.")
        assert bad.value.code == "voice_not_found"

    def test_pipecat_streams_pcm_without_asking(self, stub):
        """Pipecat: src/pipecat/services/openai/tts.py runs AsyncOpenAI
        audio.speech.with_streaming_response.create(input, model, voice, response_format="pcm")
        and reads r.iter_bytes(chunk_size) as 24 kHz PCM; it never sends stream: true, so the
        server needs --stream for the first audio to leave early.
        """

        import openai

        stub.frame_delay = 0.02
        live = LiveServer(make_server(stub, stream=True).app, threads=4)
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused")

        async def run():
            t0, times, data = time.monotonic(), [], b""
            async with client.audio.speech.with_streaming_response.create(
                input="Hello world. This is a test of the voice agent.", model="tts-1",
                voice="alloy", response_format="pcm",
            ) as r:  # fmt: skip
                assert r.status_code == 200
                async for chunk in r.iter_bytes(4096):
                    times.append(time.monotonic() - t0)
                    data += chunk
            return times, data

        try:
            times, data = asyncio.run(run())
        finally:
            live.close()
        assert len(data) % 2 == 0 and len(data) / 2 / SR > 1.0
        assert times[0] < times[-1] / 3  # first audio long before the last
