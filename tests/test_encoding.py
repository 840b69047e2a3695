"""POST /v1/audio/speech formats: every container and codec, streaming, speed."""

from __future__ import annotations

import base64
import io
import json

import av
import numpy as np
import pytest

import pocket_tts_server as srv
from tests.helpers import (
    CODEC_SLACK,
    CONTENT_TYPES,
    decode,
    dominant_freq,
    duration,
    expected_seconds,
    make_server,
    speech,
)
from tools.offline_model import SR


class TestSpeechFormats:
    @pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
    @pytest.mark.parametrize("stream", [False, True])
    def test_every_format_decodes_to_the_right_duration(self, client, server, stub, fmt, stream):
        text = "Hello world. This is a test."
        r = speech(client, input=text, response_format=fmt, stream=stream)
        assert r.status_code == 200, r.data
        assert r.headers["Content-Type"] == CONTENT_TYPES[fmt]
        assert ("Content-Length" in r.headers) is not stream
        want = expected_seconds(stub, server.engine, text)
        got = duration(r.data, fmt)
        assert want - 0.002 <= got <= want + CODEC_SLACK[fmt], (got, want)
        samples, rate = decode(r.data, fmt)
        assert abs(dominant_freq(samples, rate) - 300) < 5  # the default voice, alba

    def test_default_format_is_mp3(self, client):
        r = speech(client)
        assert r.headers["Content-Type"] == "audio/mpeg"
        with av.open(io.BytesIO(r.data)) as c:
            assert c.streams.audio[0].codec_context.name.startswith("mp3")

    def test_containers_are_what_the_content_type_says(self, client):
        magic = {
            "mp3": (b"ID3", b"\xff\xf3", b"\xff\xfb"),
            "opus": (b"OggS",),
            "aac": (b"\xff\xf1", b"\xff\xf9"),
            "flac": (b"fLaC",),
            "wav": (b"RIFF",),
        }
        for fmt, prefixes in magic.items():
            assert speech(client, response_format=fmt).data.startswith(prefixes), fmt
        with av.open(io.BytesIO(speech(client, response_format="opus").data)) as c:
            assert c.streams.audio[0].codec_context.name == "opus"

    def test_wav_and_flac_state_their_real_length_when_not_streamed(self, client):
        wav = speech(client, response_format="wav").data
        assert int.from_bytes(wav[4:8], "little") == len(wav) - 8
        assert int.from_bytes(wav[40:44], "little") == len(wav) - 44
        flac = speech(client, response_format="flac").data
        total_samples = int.from_bytes(flac[21:26], "big") & ((1 << 36) - 1)  # STREAMINFO
        assert total_samples == decode(flac)[0].size

    def test_streamed_wav_uses_placeholder_sizes(self, client):
        wav = speech(client, response_format="wav", stream=True).data
        assert wav[4:8] == b"\xff\xff\xff\xff" and wav[40:44] == b"\xff\xff\xff\xff"
        assert duration(wav) > 0.5

    def test_pcm_is_raw_s16le_mono_24k(self, client, stub, server):
        r = speech(client, response_format="pcm", input="Hello world.")
        samples = np.frombuffer(r.data, "<i2")
        assert samples.size == round(expected_seconds(stub, server.engine, "Hello world.") * SR)
        assert 0.4 < np.abs(samples).max() / 32767 <= 0.5

    def test_server_stream_default_and_request_override(self, stub):
        client = make_server(stub, stream=True).app.test_client()
        streamed = speech(client)
        assert "Content-Length" not in streamed.headers
        streamed.close()  # as a WSGI server does: frees the worker the stream holds
        buffered = speech(client, stream=False)
        assert buffered.status_code == 200 and "Content-Length" in buffered.headers

    @pytest.mark.parametrize("speed", [0.25, 0.5, 1.5, 2.0, 4.0])
    @pytest.mark.parametrize("fmt,stream", [("wav", False), ("mp3", True), ("pcm", True)])
    def test_speed_changes_duration_not_pitch(self, client, server, stub, speed, fmt, stream):
        text = "Hello world. This is a test."
        r = speech(client, input=text, speed=speed, response_format=fmt, stream=stream)
        assert r.status_code == 200
        want = expected_seconds(stub, server.engine, text) / speed
        samples, rate = decode(r.data, fmt)
        assert abs(samples.size / rate - want) < 0.03 + CODEC_SLACK[fmt], (
            samples.size / rate,
            want,
        )
        assert abs(dominant_freq(samples, rate) - 300) < 6

    def test_sse_stream(self, client, server, stub):
        text = "Hello world. This is a test."
        r = speech(client, input=text, stream_format="sse", response_format="wav")
        assert r.status_code == 200 and r.mimetype == "text/event-stream"
        events = [line[6:] for line in r.data.decode().split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        deltas = [json.loads(e) for e in events[:-2]]
        assert len(deltas) > 1 and {d["type"] for d in deltas} == {"speech.audio.delta"}
        audio = b"".join(base64.b64decode(d["audio"]) for d in deltas)
        assert abs(duration(audio) - expected_seconds(stub, server.engine, text)) < 0.002
        done = json.loads(events[-2])
        assert done["type"] == "speech.audio.done"
        usage = done["usage"]
        assert usage["input_tokens"] == len(stub.tokenizer.encode(text))
        assert usage["output_tokens"] == sum(stub.expected_frames(c) for c in stub.generated)
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    def test_openai_fields_and_extras_are_accepted(self, client):
        r = speech(
            client,
            model="tts-1-hd",
            instructions="Speak calmly.",
            voice="alloy",
            unknown_field={"x": 1},
            stream_format="audio",
            speed=1,
        )
        assert r.status_code == 200

    def test_long_input_is_chunked_and_nothing_is_dropped(self, client, stub, server):
        sentences = [
            f"Sentence number {i} is here, and it says something rather long." for i in range(12)
        ]
        text = " ".join(sentences)
        r = speech(client, input=text, response_format="wav")
        assert len(stub.generated) > 1
        spoken = " ".join(stub.generated).split()
        assert spoken == srv.normalize_text(text).split()
        assert abs(duration(r.data) - expected_seconds(stub, server.engine, text)) < 0.002

    def test_chunk_boundaries_are_click_free(self, client, stub):
        text = "Hello world. " * 40
        samples, _ = decode(speech(client, input=text, response_format="wav").data)
        lengths = [stub.expected_frames(c) * 1920 for c in stub.generated]
        assert len(lengths) > 1
        for boundary in np.cumsum(lengths)[:-1]:
            # The stub's sine (0.5 at 300 Hz) steps at most 0.04 a sample; a click jumps ~0.5.
            assert abs(samples[boundary - 1]) < 0.01 and abs(samples[boundary]) < 0.01, boundary
            assert np.abs(np.diff(samples[boundary - 240 : boundary + 240])).max() < 0.045
        assert np.abs(samples[lengths[0] // 2 :][:480]).max() > 0.45  # mid-chunk is untouched

    def test_normalize_false_passes_text_verbatim(self, client, stub):
        speech(client, input="Hello \u201cworld\u201d.", normalize=False)
        assert stub.generated == ["Hello \u201cworld\u201d."]
        speech(client, input="Hello \u201cworld\u201d.")
        assert stub.generated[-1] == 'Hello "world".'
