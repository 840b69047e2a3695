"""Voices: built-ins, cloning from a recording, the voices folder, the voice map, cached
latents and the voice management API.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pocket_tts.models.model_state import _import_model_state, export_model_state
from pocket_tts.utils.config import CONFIGS_DIR

import pocket_tts_server as srv
from tests.helpers import (
    StubModel,
    assert_openai_error,
    decode,
    dominant_freq,
    make_server,
    speech,
    spoken_freq,
    upload,
    wav_bytes,
)
from tools.offline_model import SR, tone, write_audio


class TestVoices:
    def spoken_freq(self, client, **body) -> float:
        r = speech(client, response_format="wav", **body)
        assert r.status_code == 200, r.data
        return dominant_freq(*decode(r.data))

    def test_builtin_names(self, client):
        assert abs(self.spoken_freq(client, voice="marius") - 400) < 5
        assert abs(self.spoken_freq(client, voice="Marius") - 400) < 5

    def test_a_recording_whose_tags_are_not_utf8_is_a_voice(self, tmp_path):
        """Phones and old tools write tags in other encodings; PyAV < 19 raised on them."""
        wav = write_audio(tmp_path / "ref.wav", tone(200, 2.0)).read_bytes()
        title = b"INAM" + struct.pack("<I", 6) + b"\xff\xfe\xc3(ok"
        info = b"LIST" + struct.pack("<I", 4 + len(title)) + b"INFO" + title
        at = wav.index(b"data")
        tagged = wav[:4] + struct.pack("<I", len(wav) + len(info) - 8) + wav[8:at] + info + wav[at:]
        (tmp_path / "tagged.wav").write_bytes(tagged)
        audio = srv.decode_reference(tagged, SR)
        assert abs(audio.size / SR - 2.0) < 0.01 and abs(dominant_freq(audio, SR) - 200) < 5
        assert srv.audio_seconds(tmp_path / "tagged.wav") == pytest.approx(2.0, abs=0.01)

    @pytest.mark.parametrize("name", list(srv.OPENAI_VOICE_MAP))
    def test_openai_names_never_fail(self, client, name):
        assert speech(client, voice=name, response_format="wav").status_code == 200

    def test_openai_name_maps_to_builtin(self, client):
        assert abs(self.spoken_freq(client, voice="alloy") - 300) < 5  # alloy -> alba

    def test_openai_name_whose_builtin_fails_uses_default(self, stub, tmp_path):
        voice_map = tmp_path / "map.json"
        voice_map.write_text('{"ash": "javert"}')  # a real name the stub cannot load, like
        server = make_server(stub, voice_map=str(voice_map))  # an unreachable hub would
        assert abs(self.spoken_freq(server.app.test_client(), voice="ash") - 300) < 5

    def test_openai_names_without_builtins_use_default_voice(self, tokenizer_path, reference):
        stub = StubModel(tokenizer_path, origin=Path("/somewhere/custom.yaml"))
        client = make_server(stub, default_voice=str(reference)).app.test_client()
        assert abs(self.spoken_freq(client, voice="nova") - 250) < 5
        voices = client.get("/v1/voices").json
        assert {v["kind"] for v in voices["data"]} == {"openai"}
        assert voices["default"] == "ref"
        r = speech(client, voice="alba")
        assert r.status_code == 400 and r.json["error"]["param"] == "voice"

    def test_model_without_builtins_needs_a_default_voice(self, tokenizer_path):
        stub = StubModel(tokenizer_path, origin=Path("/somewhere/custom.yaml"))
        with pytest.raises(srv.VoiceError, match="--default_voice"):
            make_server(stub)

    def test_language_default_voice(self, tokenizer_path):
        stub = StubModel(tokenizer_path, origin=CONFIGS_DIR / "french.yaml")
        client = make_server(stub).app.test_client()
        assert client.get("/health").json["default_voice"] == "estelle"

    def test_absolute_path_clones_and_is_cached(self, client, stub, reference):
        assert abs(self.spoken_freq(client, voice=str(reference)) - 250) < 5
        assert abs(self.spoken_freq(client, voice=str(reference)) - 250) < 5
        assert stub.encodes.count("clone") == 1

    @pytest.mark.parametrize("suffix,rate,channels", [(".flac", 48000, 2), (".mp3", 44100, 1)])
    def test_reference_formats_are_resampled_and_downmixed(
        self, client, tmp_path, suffix, rate, channels
    ):
        audio = np.stack([tone(350, 2.0, rate)] * channels)
        ref = write_audio(tmp_path / f"voice{suffix}", audio, rate)
        assert abs(self.spoken_freq(client, voice=str(ref)) - 350) < 5

    def test_bad_voices_are_400_naming_voice(self, client, tmp_path, reference):
        (tmp_path / "notes.txt").write_text("secret contents")
        (tmp_path / "noise.wav").write_bytes(os.urandom(4000))
        (tmp_path / "empty.wav").write_bytes(b"")
        (tmp_path / "dir.wav").mkdir()
        write_audio(tmp_path / "short.wav", tone(200, 0.2))
        write_audio(tmp_path / "silent.wav", np.zeros(SR * 2))
        (tmp_path / "link.txt").symlink_to(reference)
        cases = [
            "nobody",
            "notes.txt",
            str(tmp_path / "notes.txt"),
            str(tmp_path / "noise.wav"),
            str(tmp_path / "empty.wav"),
            str(tmp_path / "dir.wav"),
            str(tmp_path / "missing.wav"),
            str(tmp_path / "short.wav"),
            str(tmp_path / "silent.wav"),
            "/dev/zero",
            "/etc/passwd",
            str(tmp_path / "link.txt"),
            "../ref.wav",
        ]
        for voice in cases:
            r = speech(client, voice=voice)
            assert r.status_code == 400, voice
            err = r.json["error"]
            assert err["param"] == "voice" and err["type"] == "invalid_request_error", voice
            assert "secret" not in err["message"] and "Traceback" not in err["message"]
        assert "alloy" in speech(client, voice="nobody").json["error"]["message"]

    def test_voice_listings(self, client):
        voices = client.get("/v1/voices").json
        assert voices["object"] == "list" and voices["default"] == "alba"
        ids = {v["id"]: v for v in voices["data"]}
        assert set(srv.OPENAI_VOICE_MAP) <= set(ids) and "marius" in ids
        assert ids["alloy"]["kind"] == "openai" and ids["alloy"]["maps_to"] == "alba"
        assert ids["marius"]["kind"] == "builtin" and ids["alba"]["default"] is True
        assert all(v["object"] == "voice" for v in voices["data"])
        audio_voices = client.get("/v1/audio/voices").json["voices"]
        assert {v["id"] for v in audio_voices} == set(ids)
        assert all(set(v) == {"id", "name"} for v in audio_voices)


class TestVoiceLibrary:
    def test_voices_dir_entries_appear_and_disappear_live(self, stub, voices_dir):
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        assert "Speaker Two" not in [v["id"] for v in client.get("/v1/voices").json["data"]]
        write_audio(voices_dir / "Speaker Two.wav", tone(320, 2.0))
        listed = {v["id"]: v for v in client.get("/v1/voices").json["data"]}
        assert listed["Speaker Two"]["kind"] == "custom"
        assert listed["Speaker Two"]["file"] == "Speaker Two.wav"
        assert abs(spoken_freq(client, voice="Speaker Two") - 320) < 5
        assert abs(spoken_freq(client, voice="Speaker Two.wav") - 320) < 5
        assert abs(spoken_freq(client, voice="speaker two") - 320) < 5
        (voices_dir / "Speaker Two.wav").unlink()
        assert_openai_error(speech(client, voice="Speaker Two"), 400, "voice")

    @pytest.mark.parametrize("suffix", [".mp3", ".flac"])
    def test_voices_dir_reads_any_audio_format(self, stub, voices_dir, suffix):
        write_audio(voices_dir / f"v{suffix}", np.stack([tone(330, 2.0, 44100)] * 2), 44100)
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        assert abs(spoken_freq(client, voice="v") - 330) < 5

    def test_exported_safetensors_state_is_a_voice(self, stub, voices_dir):
        export_model_state(StubModel.state(450), voices_dir / "exported.safetensors")
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        assert abs(spoken_freq(client, voice="exported") - 450) < 5
        assert stub.loads == ["exported.safetensors"] and "clone" not in stub.encodes

    def test_resolution_order(self, stub, voices_dir):
        write_audio(voices_dir / "alba.wav", tone(210, 2.0))  # shadowed by the built-in
        write_audio(voices_dir / "alloy.wav", tone(220, 2.0))  # shadowed by the OpenAI name
        server = make_server(stub, voices_dir=str(voices_dir))
        client = server.app.test_client()
        assert abs(spoken_freq(client, voice="alba") - 300) < 5
        assert abs(spoken_freq(client, voice="alloy") - 300) < 5
        assert abs(spoken_freq(client, voice=str(voices_dir / "alloy.wav")) - 220) < 5
        assert client.get("/v1/voices").json["resolution_order"] == list(srv.RESOLUTION_ORDER)

    def test_voice_map_file(self, stub, voices_dir, tmp_path):
        write_audio(voices_dir / "Speaker Two.wav", tone(320, 2.0))
        mapping = tmp_path / "map.json"
        mapping.write_text(json.dumps({"nova": "Speaker Two", "alloy": "marius", "echo": "gone"}))
        server = make_server(stub, voices_dir=str(voices_dir), voice_map=str(mapping))
        client = server.app.test_client()
        assert abs(spoken_freq(client, voice="nova") - 320) < 5
        assert abs(spoken_freq(client, voice="alloy") - 400) < 5
        assert abs(spoken_freq(client, voice="echo") - 300) < 5  # missing target -> default
        listed = {v["id"]: v for v in client.get("/v1/voices").json["data"]}
        assert listed["nova"]["maps_to"] == "Speaker Two" and listed["echo"]["maps_to"] == "alba"

    @pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"nova": 3}'])
    def test_bad_voice_map_fails_at_start(self, stub, tmp_path, content):
        mapping = tmp_path / "map.json"
        mapping.write_text(content)
        with pytest.raises(srv.VoiceError, match="voice_map"):
            make_server(stub, voice_map=str(mapping))

    def test_remote_urls_are_refused_unless_allowed(self, stub, reference, web, monkeypatch):
        url = web.serve(reference)
        err = assert_openai_error(
            speech(make_server(stub).app.test_client(), voice=url), 400, "voice"
        )
        assert "--allow_remote_voices" in err["message"]
        client = make_server(stub, allow_remote_voices=True).app.test_client()
        monkeypatch.setattr(srv, "is_public_address", lambda ip: True)  # this test's web is local
        assert abs(spoken_freq(client, voice=url) - 250) < 5
        assert_openai_error(speech(client, voice=url + ".missing"), 400, "voice")

    def test_long_references_are_truncated_to_30_seconds(self, stub, tmp_path, prompt_shapes):
        ref = write_audio(tmp_path / "long.flac", tone(260, 45.0, 48000), 48000)
        assert abs(spoken_freq(make_server(stub).app.test_client(), voice=str(ref)) - 260) < 5
        assert prompt_shapes[-1] == (1, 30 * SR)

    def test_cache_hit_restart_edit_and_corruption(self, tokenizer_path, voices_dir, tmp_path):
        cache = tmp_path / "cache"
        ref = write_audio(voices_dir / "me.wav", tone(310, 2.0))
        first = StubModel(tokenizer_path)
        client = make_server(
            first, voices_dir=str(voices_dir), cache_dir=str(cache)
        ).app.test_client()
        assert abs(spoken_freq(client, voice="me") - 310) < 5
        assert abs(spoken_freq(client, voice="me") - 310) < 5
        assert first.encodes.count("clone") == 1  # a hit costs no encoding
        files = list(cache.rglob("*.safetensors"))
        assert len(files) == 1

        restarted = StubModel(tokenizer_path)  # a new process: empty memory, same disk cache
        client = make_server(
            restarted, voices_dir=str(voices_dir), cache_dir=str(cache)
        ).app.test_client()
        assert abs(spoken_freq(client, voice="me") - 310) < 5
        assert "clone" not in restarted.encodes and len(restarted.loads) == 1

        time.sleep(0.01)
        write_audio(ref, tone(370, 2.0))  # edited in place: new content, new latents
        assert abs(spoken_freq(client, voice="me") - 370) < 5
        assert restarted.encodes.count("clone") == 1

        corrupted = StubModel(tokenizer_path)
        for path in cache.rglob("*.safetensors"):
            path.write_bytes(b"garbage")
        server = make_server(corrupted, voices_dir=str(voices_dir), cache_dir=str(cache))
        assert abs(spoken_freq(server.app.test_client(), voice="me") - 370) < 5  # rebuilt
        assert corrupted.encodes.count("clone") == 1
        key = server.engine.states.content_key(server.voices.resolve("me"))
        assert _import_model_state(server.engine.states.cache.path(key), torch.device("cpu"))

    def test_memory_cache_is_bounded(self):
        cache = srv.LatentCache(None, capacity=3)
        for i in range(10):
            cache.put(f"k{i}", {"m": {"x": torch.zeros(1)}})
        assert list(cache.memory) == ["k7", "k8", "k9"]
        assert cache.get("k8") is not None and cache.get("k1") is None

    def test_upload_use_details_delete(self, stub, voices_dir):
        server = make_server(stub, voices_dir=str(voices_dir))
        client = server.app.test_client()
        r = upload(client, "Speaker Two", wav_bytes(340, 3.0))
        assert r.status_code == 201, r.data
        voice = r.json
        assert (
            voice["id"] == "Speaker Two"
            and voice["kind"] == "custom"
            and voice["object"] == "voice"
        )
        assert abs(voice["duration"] - 3.0) < 0.01 and voice["cached"] == {
            "memory": True,
            "disk": True,
        }
        assert (voices_dir / "Speaker Two.wav").is_file()
        assert sorted(p.name for p in voices_dir.iterdir()) == [
            ".uploads.json",
            ".uploads.lock",
            "Speaker Two.wav",
        ]
        encodes = stub.encodes.count("clone")
        assert abs(spoken_freq(client, voice="Speaker Two") - 340) < 5
        assert stub.encodes.count("clone") == encodes  # precomputed at upload

        details = client.get("/v1/voices/Speaker Two").json
        assert details["source"] == "Speaker Two.wav" and details["bytes"] > 0
        assert client.get("/v1/voices/alba").json["kind"] == "builtin"
        assert client.get("/v1/voices/nova").json["maps_to"] == "anna"
        assert_openai_error(client.get("/v1/voices/nobody"), 404, "name")

        cached = list(server.engine.states.cache.folder.glob("*.safetensors"))
        r = client.delete("/v1/voices/Speaker Two")
        assert r.status_code == 200 and r.json["deleted"] is True
        assert not (voices_dir / "Speaker Two.wav").exists()
        assert not any(p.exists() for p in cached)
        assert_openai_error(client.get("/v1/voices/Speaker Two"), 404, "name")
        assert_openai_error(client.delete("/v1/voices/Speaker Two"), 404, "name")

    def test_listing_says_which_voices_came_from_uploads(self, stub, voices_dir):
        """The page lists uploads as "your voices" apart from what was put in the folder."""
        write_audio(voices_dir / "Put There.wav", tone(300, 2.0))
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        assert upload(client, "Uploaded", wav_bytes(340, 2.0)).status_code == 201

        def origins():
            data = client.get("/v1/voices").json["data"]
            return {v["id"]: v.get("origin") for v in data if v["kind"] == "custom"}

        assert origins() == {"Put There": "folder", "Uploaded": "upload"}
        assert client.get("/v1/voices/Uploaded").json["origin"] == "upload"
        assert client.delete("/v1/voices/Uploaded").status_code == 200
        write_audio(voices_dir / "Uploaded.wav", tone(310, 2.0))  # the same name, put by hand
        assert origins() == {"Put There": "folder", "Uploaded": "folder"}
        (voices_dir / ".uploads.json").write_text("{not json")  # a broken record: all "folder"
        assert origins() == {"Put There": "folder", "Uploaded": "folder"}
        assert upload(client, "Again", wav_bytes(350, 2.0)).status_code == 201
        assert origins()["Again"] == "upload"
        assert not list(voices_dir.glob(".upload-*"))  # the record is written atomically

    def test_upload_name_defaults_to_file_stem(self, stub, voices_dir):
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        r = upload(client, None, wav_bytes(330), filename="My Voice.flac")
        assert r.status_code == 201 and r.json["id"] == "My Voice"
        assert (voices_dir / "My Voice.flac").is_file()

    @pytest.mark.parametrize("name", ["Speaker", "alba", "nova", "ALLOY", "speaker"])
    def test_upload_clash_is_409(self, stub, voices_dir, name):
        write_audio(voices_dir / "Speaker.wav", tone(300, 2.0))
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        err = assert_openai_error(upload(client, name, wav_bytes(330)), 409, "name")
        assert err["code"] == "voice_exists"

    @pytest.mark.parametrize(
        "name,data,filename,param",
        [
            ("../evil", None, "v.wav", "name"),
            (".hidden", None, "v.wav", "name"),
            ("a/b", None, "v.wav", "name"),
            ("x" * 65, None, "v.wav", "name"),
            ("ok", None, "v.txt", "file"),
            ("ok", b"RIFF" + os.urandom(5000), "v.wav", "file"),
            ("ok", b"", "v.wav", "file"),
            ("ok", "short", "v.wav", "file"),
        ],
        ids=["dotdot", "hidden", "slash", "long", "txt", "random-bytes", "empty", "short"],
    )
    def test_upload_rejects_bad_input(self, stub, voices_dir, name, data, filename, param):
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        if data is None:
            data = wav_bytes(330)
        elif data == "short":
            data = wav_bytes(330, 0.2)
        assert_openai_error(upload(client, name, data, filename), 400, param)
        assert list(voices_dir.iterdir()) == []  # nothing stored

    def test_upload_without_file_and_too_large(self, stub, voices_dir):
        client = make_server(stub, voices_dir=str(voices_dir)).app.test_client()
        r = client.post("/v1/voices", data={"name": "x"}, content_type="multipart/form-data")
        assert_openai_error(r, 400, "file")
        big = b"RIFF" + bytes(26 * 1024 * 1024)
        assert upload(client, "big", big).status_code == 413
        assert upload(client, "big", big).json["error"]["message"]

    def test_builtin_and_openai_voices_cannot_be_deleted(self, client):
        assert_openai_error(client.delete("/v1/voices/alba"), 403, "name")
        assert_openai_error(client.delete("/v1/voices/alloy"), 403, "name")

    def test_listing_kinds(self, tokenizer_path, voices_dir, reference):
        write_audio(voices_dir / "mine.wav", tone(300, 2.0))
        with_builtins = make_server(StubModel(tokenizer_path), voices_dir=str(voices_dir))
        kinds = {v["kind"] for v in with_builtins.app.test_client().get("/v1/voices").json["data"]}
        assert kinds == {"openai", "builtin", "custom"}
        custom = StubModel(tokenizer_path, origin=Path("/x/custom.yaml"))
        without = make_server(custom, voices_dir=str(voices_dir), default_voice="mine")
        listed = without.app.test_client().get("/v1/voices").json
        assert {v["kind"] for v in listed["data"]} == {"openai", "custom"}
        assert listed["default"] == "mine"
