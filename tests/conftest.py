"""Fixtures shared by every test module: the offline tokenizer and reference recording, stub
servers (in process and on a real socket), a voices folder, and the real pocket-tts model.

Route tests run against StubModel: it speaks a sine wave whose pitch identifies the voice (a
built-in's own pitch, or the dominant pitch of a cloned reference) for a duration set by the
text's token count. The `real` fixture drives the real pocket-tts TTSModel, built offline from a
packaged architecture with random weights and EOS disabled, so durations are deterministic. Every
test decodes the audio it gets back with PyAV.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import pocket_tts_server as srv
from tests.helpers import TEST_DEVICE, LiveServer, StubModel, Web, make_server
from tools.offline_model import build_tokenizer, random_weight_config, tone, write_audio


@pytest.fixture(autouse=True)
def private_user_dirs(tmp_path, monkeypatch):
    """Every test gets its own user cache and data folders (voice latents, uploaded voices)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "user-data"))


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """A 3 s, 24 kHz mono WAV at 250 Hz."""
    return write_audio(tmp_path_factory.mktemp("ref") / "ref.wav", tone(250, 3.0))


@pytest.fixture
def stub(tokenizer_path) -> StubModel:
    return StubModel(tokenizer_path)


@pytest.fixture
def prompt_shapes(stub, monkeypatch) -> list:
    """Shapes of the reference audio the stub is asked to clone from, in order."""
    shapes, original = [], stub.get_state_for_audio_prompt
    monkeypatch.setattr(
        stub,
        "get_state_for_audio_prompt",
        lambda src, **k: shapes.append(getattr(src, "shape", None)) or original(src, **k),
    )
    return shapes


@pytest.fixture
def server(stub) -> srv.SpeechServer:
    return make_server(stub)


@pytest.fixture
def client(server):
    return server.app.test_client()


@pytest.fixture
def live(server):
    live = LiveServer(server.app, threads=4)
    yield live
    live.close()


@pytest.fixture
def voices_dir(tmp_path) -> Path:
    folder = tmp_path / "voices"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def real(tmp_path_factory, tokenizer_path, reference):
    """The real TTSModel (random weights) behind the real bootstrap, served by waitress."""
    tmp = tmp_path_factory.mktemp("real")
    config = random_weight_config(tmp, tokenizer_path)
    settings = srv.Settings(
        model_path=str(config),
        default_voice=str(reference),
        voices_dir=str(tmp / "voices"),
        cache_dir=str(tmp / "cache"),
        device=TEST_DEVICE,
        # Exact: a stream sounds the same alone and batched (int8 quantizes activations across
        # the batch: TestPrecision bounds that). --precision auto is tested there too.
        precision="float32",
    )
    server = srv.build_server(settings)  # the real loading path, from a local config
    live = LiveServer(server.app, threads=4)
    service = srv.Service(settings, server.engine)  # what Wyoming and the WebSockets are given
    yield SimpleNamespace(server=server, service=service, url=live.url, model=server.engine.model)
    live.close()


@pytest.fixture
def web():
    server = Web()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
