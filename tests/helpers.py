"""Helpers shared by the test modules: decoding what the server returns, StubModel (a fast
stand-in with pocket-tts's interface, run through the production Engine and BatchScheduler by
StubSteps), servers on a real socket, and the commands that start one as a process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import requests
import torch
from hypothesis import strategies as st
from pocket_tts.models.model_state import _import_model_state
from pocket_tts.modules.text_conditioner import JsonTokenizer
from pocket_tts.utils.config import CONFIGS_DIR
from tokenizers import Tokenizer

import pocket_tts_server as srv
from tools.offline_model import (  # shared with bench/: a pocket-tts that runs offline
    SR,
    random_weight_config,
    tone,
    write_audio,
)

ROOT = Path(__file__).resolve().parent.parent  # the repository


# -- audio the server returns, decoded ---------------------------------------------------------
def decode(data: bytes, fmt: str = "auto") -> tuple[np.ndarray, int]:
    """Decode a response body to float mono samples and their rate."""
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767.0, SR
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        to_float = av.AudioResampler(format="flt", layout="mono", rate=rate)
        frames = [
            out.to_ndarray().reshape(-1)
            for f in container.decode(stream)
            for out in to_float.resample(f)
        ]
        frames += [out.to_ndarray().reshape(-1) for out in to_float.resample(None)]
    return (np.concatenate(frames) if frames else np.zeros(0)), rate


def duration(data: bytes, fmt: str = "auto") -> float:
    samples, rate = decode(data, fmt)
    return samples.size / rate


def dominant_freq(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


# Codecs add priming/padding: how much longer than the audio a decoded file may be (seconds).
CODEC_SLACK = {"mp3": 0.1, "aac": 0.09, "opus": 0.03, "flac": 0.001, "wav": 0.001, "pcm": 0.001}


# -- StubModel: pocket-tts's interface, a sine wave per voice, the production scheduler ---------
class StubModel:
    """pocket-tts's TTSModel interface, fast: 3 frames (240 ms) of sine per text token."""

    sample_rate = SR
    config = SimpleNamespace(mimi=SimpleNamespace(frame_rate=12.5, sample_rate=SR))
    pad_with_spaces_for_short_inputs = False
    remove_semicolons = False
    append_terminal_punctuation = True
    capitalize_first_letter = True
    replace_characters: dict = {}
    has_custom_weights = False
    has_voice_cloning = True
    device = "cpu"
    FRAMES_PER_TOKEN = 3
    BUILTINS = {"alba": 300.0, "marius": 400.0, "estelle": 500.0}

    def __init__(self, tokenizer_path: Path, origin: Path = CONFIGS_DIR / "english.yaml"):
        self.tokenizer = JsonTokenizer(
            Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(), str(tokenizer_path)
        )
        self.flow_lm = SimpleNamespace(conditioner=SimpleNamespace(tokenizer=self.tokenizer))
        self.origin = origin
        self.encodes: list[str] = []  # every voice encoding (built-in download or cloning)
        self.loads: list[str] = []  # every voice state loaded from a .safetensors file
        self.generated: list[str] = []  # every text chunk generated
        self.stopped: list[bool] = []  # whether each generation ended by the stop event
        self.frame_delay = 0.0
        self.encode_delay = 0.0  # seconds each cloning takes
        self.fail_after_frames: int | None = None

    def to(self, device):
        return self

    def eval(self):
        return self

    def get_state_for_audio_prompt(self, source, truncate=False):
        if isinstance(source, Path) and source.suffix == ".safetensors":
            self.loads.append(source.name)
            return _import_model_state(source, torch.device("cpu"))
        if isinstance(source, str):
            if source not in self.BUILTINS:
                raise FileNotFoundError(source)
            self.encodes.append(source)
            return self.state(self.BUILTINS[source])
        self.encodes.append("clone")
        time.sleep(self.encode_delay)
        return self.state(round(dominant_freq(source.numpy().reshape(-1), SR)))

    @staticmethod
    def state(freq: float) -> dict:
        """A voice state shaped like pocket-tts's: module name -> tensors."""
        return {"stub": {"freq": torch.tensor([float(freq)])}}

    def expected_frames(self, chunk: str) -> int:
        return self.FRAMES_PER_TOKEN * len(self.tokenizer.encode(chunk))

    def generate_audio_stream(self, model_state, text_to_generate, stop=None, **kwargs):
        self.generated.append(text_to_generate)
        freq = float(model_state["stub"]["freq"][0])
        try:
            for i in range(self.expected_frames(text_to_generate)):
                if stop is not None and stop.is_set():
                    return
                if self.fail_after_frames is not None and i >= self.fail_after_frames:
                    raise RuntimeError("stub generation failure")
                time.sleep(self.frame_delay)
                t = np.arange(i * 1920, (i + 1) * 1920) / SR
                yield torch.from_numpy((0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32))
        finally:
            self.stopped.append(stop is not None and stop.is_set())


class StubSteps:
    """srv.PocketSteps's interface for StubModel, so that route tests run through the production
    BatchScheduler and Admission. A latent is a frame index; a slot decodes frame k of its
    voice's sine. `stub.generated` records every chunk prefilled, `stub.stopped` whether each
    row that left the batch had been cut short."""

    device = "cpu"
    frame_seconds = 1920 / SR
    min_frames_before_eos = 0
    prefill_batch = 4
    precision = srv.Precision("float32", "the stub's steps")

    def __init__(self, model: StubModel):
        self.model = model
        self.threads: dict[str, set] = {}  # method -> names of the threads that called it
        self.fault: str | None = None  # a method that raises once, at its next call
        self.fault_at: float | None = None  # when it did
        self.slots: dict[int, tuple[float, int]] = {}  # slot -> (pitch, row index)
        self.expected: list[int] = []  # frames of each row prefilled
        self.decoded: list[int] = []  # frames decoded, likewise
        self.prefill_failures: list[str] = []  # prefill raises for rows whose text is listed

    def slot_bytes(self) -> int:
        return 1 << 20

    def chunks(self, text: str) -> list[srv.Chunk]:
        return [srv.Chunk(text, None, self.model.expected_frames(text), 0)]

    def called(self, method: str):
        """Record the calling thread; raise once if `method` is the injected fault."""
        self.threads.setdefault(method, set()).add(threading.current_thread().name)
        if self.fault == method:
            self.fault, self.fault_at = None, time.monotonic()
            raise RuntimeError(f"injected {method} failure")

    def prefill(self, rows) -> list[srv.Prefix]:
        self.called("prefill")
        if any(row.chunk.text in self.prefill_failures for row in rows):
            raise RuntimeError("stub prefill failure")
        prefixes = []
        for row in rows:
            self.model.generated.append(row.chunk.text)
            self.expected.append(row.chunk.max_frames)
            self.decoded.append(0)
            pitch = float(row.voice_state["stub"]["freq"][0])
            prefixes.append(srv.Prefix((pitch, len(self.decoded) - 1), 0, np.zeros(1), False))
        return prefixes

    def place(self, slot: int, prefix: srv.Prefix, frames: int):
        self.called("place")
        self.slots[slot] = prefix.caches

    def remove(self, slot: int, last: int):
        self.called("remove")
        _, index = self.slots[slot]
        self.model.stopped.append(self.decoded[index] < self.expected[index])
        self.slots[slot] = self.slots[last]
        del self.slots[last]

    def reset(self):
        self.slots.clear()

    def step(self, latents: list, generators: list):
        self.called("step")
        time.sleep(self.model.frame_delay)
        frames, limit = np.concatenate(latents) + 1, self.model.fail_after_frames
        if limit is not None and frames.max() >= limit:
            raise RuntimeError("stub generation failure")
        return frames, [False] * frames.size

    def decode(self, latents: list) -> np.ndarray:
        deliver = self.fault == "deliver"  # decoded, but one row short: delivering it fails
        if deliver:
            self.fault, self.fault_at = None, time.monotonic()
        self.called("decode")
        audio = []
        for slot, frame in enumerate(np.concatenate(latents).astype(int)):
            pitch, index = self.slots[slot]
            self.decoded[index] += 1
            t = np.arange(frame * 1920, (frame + 1) * 1920) / SR
            audio.append((0.5 * np.sin(2 * np.pi * pitch * t)).astype(np.float32))
        return np.stack(audio[:-1] if deliver else audio)

    def check_voice(self, voice_state):
        if "stub" not in voice_state:
            raise srv.VoiceError("this voice state was made for another model: it does not fit.")

    def prepare(self, slots: int):
        pass

    def idle(self):
        pass


# -- servers in process and on a socket, and requests to them ----------------------------------
def make_server(model, batched: bool = True, **overrides) -> srv.SpeechServer:
    """A server around `model`; a StubModel's runs through the BatchScheduler (`StubSteps`), or
    with batched=False through the unbatched path (a pocket-tts whose internals changed)."""
    settings = srv.Settings(model_path="stub", **overrides)
    steps = StubSteps(model) if batched and isinstance(model, StubModel) else None
    server = srv.build_server(settings, model=model, steps=steps)
    if isinstance(model, StubModel):  # forget the start-up warm-up generation
        model.generated.clear()
        model.stopped.clear()
    return server


def speech(client, **body):
    body.setdefault("input", "Hello world.")
    return client.post("/v1/audio/speech", json=body)


def expected_seconds(model: StubModel, engine: srv.Engine, text: str) -> float:
    frames = sum(model.expected_frames(c) for c in engine.split(srv.normalize_text(text)))
    return frames * 1920 / SR


class LiveServer:
    """The application served by waitress on a free loopback port, in a background thread."""

    def __init__(self, app, settings: srv.Settings | None = None, **adjustments):
        settings = settings or srv.Settings(port=0)
        self.server = srv.http_server(app, settings, port=0, **adjustments)  # as main() serves
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def close(self):
        """Stop the loop as SIGTERM does (`srv.stop_serving`), then wait for it to return."""
        srv.stop_serving(self.server)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive() and not self.server._map
        srv.close_http(self.server)


CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


def spoken_freq(client, **body) -> float:
    r = speech(client, response_format="wav", **body)
    assert r.status_code == 200, r.data
    return dominant_freq(*decode(r.data))


def upload(client, name, data: bytes, filename="voice.wav"):
    form = {"file": (io.BytesIO(data), filename)}
    if name is not None:
        form["name"] = name
    return client.post("/v1/voices", data=form, content_type="multipart/form-data")


def wav_bytes(freq: float, seconds: float = 2.0, rate: int = SR, tmp=None) -> bytes:
    path = write_audio(
        Path(tmp or "/tmp") / f"tmp-{freq}-{seconds}-{rate}.wav", tone(freq, seconds, rate), rate
    )
    data = path.read_bytes()
    path.unlink()
    return data


def assert_openai_error(r, status: int, param=None):
    assert r.status_code == status, (r.status_code, r.data)
    assert r.is_json
    err = r.json["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    return err


def post_json(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{url}/v1/audio/speech", json=body, timeout=60, **kwargs)


def raw_request(url: str, body: dict) -> socket.socket:
    """Send a speech request on a bare socket (so the test can hang up at will)."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    data = json.dumps(body)
    sock.sendall(
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n{data}".encode()
    )
    return sock


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


LONG_TEXT = "This sentence is spoken many times over. " * 20


@contextlib.contextmanager
def busy_worker(stub, text: str = LONG_TEXT, **overrides):
    """A live one-worker server whose worker streams `text` to a client that does not read on."""
    live = LiveServer(make_server(stub, max_batch=1, **overrides).app, threads=8)
    blocker = raw_request(live.url, {"input": text, "response_format": "pcm", "stream": True})
    try:
        assert blocker.recv(4096)
        yield live.url, blocker
    finally:
        blocker.close()
        live.close()


# Strategies for the fuzz tests: plausible fields with hostile values, and plain junk.
# -- hostile input and the engine under load ---------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def generate_in_threads(engine, texts, voice_state, delays=None) -> dict:
    """engine.generate for each text at once: {i: (audio seconds, error or None, when it ended)}."""
    outcomes = {}

    def run(i, text):
        time.sleep((delays or [0] * len(texts))[i])
        samples, error = 0, None
        try:
            for audio in engine.generate(text, voice_state, threading.Event(), seed=i):
                samples += audio.size
        except srv.GenerationFailed as exc:
            error = exc
        outcomes[i] = (samples / SR, error, time.monotonic())

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(texts)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    return outcomes


# The real-model tests run on the CPU; POCKET_TTS_TEST_DEVICE=cuda runs them on a GPU.
# -- the real pocket-tts model, and servers as processes ---------------------------------------
TEST_DEVICE = os.environ.get("POCKET_TTS_TEST_DEVICE", "cpu")


def free_port() -> int:
    """A loopback port nothing listens on (for a server started as a process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(real, tmp: Path, tokenizer: Path, port: int, voices: str = "voices") -> list:
    """`python pocket_tts_server.py ...` on a random-weight model, as a person starts it."""
    config = random_weight_config(tmp, tokenizer)
    return [sys.executable, str(ROOT / "pocket_tts_server.py"), "--model_path", str(config),
            "--port", str(port), "--default_voice", str(real.server.voices.default.ref),
            "--cache_dir", str(tmp / "cache"), "--voices_dir", str(tmp / voices)]  # fmt: skip


def library_seconds(model, text: str) -> float:
    """What pocket-tts itself generates for `text` with EOS off: its chunks' length caps."""
    from pocket_tts.models.text_chunking import prepare_text_prompt, split_into_best_sentences

    tokenizer = model.flow_lm.conditioner.tokenizer
    frames = 0
    for chunk in split_into_best_sentences(tokenizer, srv.normalize_text(text), 50, False, False):
        prepared, _ = prepare_text_prompt(chunk, False, False)
        frames += model._estimate_max_gen_len(len(tokenizer.encode(prepared)))
    return frames * model.sample_rate / model.config.mimi.frame_rate / SR


async def ws_messages(ws) -> list:
    """Every JSON message until the server closes the socket."""
    from websockets.exceptions import ConnectionClosed

    out = []
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            out.append(json.loads(raw))
    return out


# -- other protocols, and the remote voices' web server ----------------------------------------
@contextlib.contextmanager
def stub_agents(stub, **overrides):
    """The voice-agent server over the stub model (fast, and sized by `overrides`)."""
    speech = make_server(stub, **overrides)
    server = srv.AgentServer(srv.Service(speech.settings, speech.engine), "127.0.0.1", 0)
    try:
        yield SimpleNamespace(url=f"ws://127.0.0.1:{server.port}", engine=speech.engine)
    finally:
        server.close()


class Web:
    """A small HTTP server on loopback for remote-voice tests, counting what it serves."""

    def __init__(self):
        import http.server

        self.files: dict[str, bytes] = {}
        self.statuses: list[int] = []
        self.slow = False
        web = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/redirect":
                    return self.reply(302, b"", {"Location": "/ref.wav"})
                data = web.files.get(self.path)
                if data is None:
                    return self.reply(404, b"missing")
                if self.headers.get("If-None-Match") == '"v1"':
                    return self.reply(304, b"")
                if web.slow:  # one byte every 0.3 s, for at most 10 s
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    web.statuses.append(200)
                    with contextlib.suppress(OSError):
                        for byte in data[:33]:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.3)
                    return None
                return self.reply(200, data, {"ETag": '"v1"'})

            def reply(self, status, body, headers=None):
                web.statuses.append(status)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, path: Path) -> str:
        self.files[f"/{path.name}"] = path.read_bytes()
        return f"{self.base}/{path.name}"
