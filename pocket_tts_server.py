"""pocket-tts-server: an OpenAI-compatible speech server for Kyutai's pocket-tts.

pocket-tts is a 100M-parameter text-to-speech model that runs faster than real time on a CPU and
clones a voice from a few seconds of audio. This one file turns it into a server that OpenAI
clients (the openai SDK, Open WebUI, Home Assistant, SillyTavern, curl...) use unmodified:

    python pocket_tts_server.py --host 0.0.0.0 --port 8000 --stream

    POST /v1/audio/speech   {"input": "Hello!", "voice": "alloy", "response_format": "mp3"}

Data flows top to bottom, and so does this file:

    configuration & CLI -> model -> text -> voices -> synthesis (Engine) -> encoding (PyAV)
    -> HTTP API (Flask, served by waitress) -> page -> main

The Engine is the only code that touches the model: it yields float32 audio chunks and honours a
stop event, so HTTP handlers and encoders never depend on how generation is scheduled. Encoders
are incremental, so a streamed response leaves as soon as the model produces audio, in every
format. The web page and its logo are embedded at the end, so this file copied alone still runs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fractions
import hmac
import io
import json
import logging
import math
import os
import re
import sys
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import av
import av.filter
import numpy as np
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

logger = logging.getLogger("pocket_tts_server")

SERVER_NAME = "pocket-tts-server"
MODEL_IDS = ("pocket-tts", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # `model` is accepted, ignored

# =================================================================================================
# Configuration & CLI
# =================================================================================================


@dataclass
class Settings:
    """Everything the operator can configure; each field is a flag and a POCKET_TTS_* variable."""

    model_path: str = "english"
    host: str = "127.0.0.1"
    port: int = 8000
    stream: bool = False
    voices_dir: str | None = None
    default_voice: str | None = None
    device: str = "auto"
    quantize: bool = False
    api_key: str | None = None
    max_input_chars: int = 4096
    log_level: str = "info"
    threads: int = 8


FLAG_HELP = {
    "model_path": "pocket-tts language name (english, french, german_24l, ...), local YAML config, "
    "or hf:// path",
    "host": "address to bind; 127.0.0.1 keeps the server private to this machine",
    "port": "TCP port",
    "stream": "stream responses by default (a request's `stream` field still decides)",
    "voices_dir": "folder of reference recordings, each one a voice named by its file stem",
    "default_voice": "voice used when a request names none (built-in name or audio file path)",
    "device": "torch device: auto picks CUDA when available",
    "quantize": "apply pocket-tts dynamic int8 quantization (faster on CPU)",
    "api_key": "require `Authorization: Bearer <key>` on the API (health and page stay open)",
    "max_input_chars": "longest accepted `input`, in characters",
    "log_level": "logging level",
    "threads": "HTTP worker threads (waitress)",
}
FLAG_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "log_level": ("debug", "info", "warning", "error"),
}


def parse_bool(text: str) -> bool:
    """Read a boolean environment variable ("1", "true", "yes", "on" are true)."""
    return text.strip().lower() in ("1", "true", "yes", "on")


def build_arg_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    """One flag per Settings field; defaults come from POCKET_TTS_<NAME>, then the dataclass."""
    parser = argparse.ArgumentParser(
        prog="pocket_tts_server.py",
        description="OpenAI-compatible speech server for Kyutai's pocket-tts.",
        epilog="Every flag can also be set as an environment variable POCKET_TTS_<NAME>.",
    )
    for f in fields(Settings):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        env_value = environ.get(f"POCKET_TTS_{f.name.upper()}")
        kwargs: dict[str, Any] = {"dest": f.name, "help": FLAG_HELP[f.name]}
        if f.type in ("bool", bool):
            default = parse_bool(env_value) if env_value is not None else f.default
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kwargs.update(
                type=int if f.type in ("int", int) else str,
                default=env_value if env_value is not None else f.default,
                choices=FLAG_CHOICES.get(f.name),
            )
            kwargs["help"] += f" (default: {f.default})"
        parser.add_argument(*names, **kwargs)
    return parser


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None):
    """Settings from the command line and the environment."""
    environ = dict(os.environ) if environ is None else environ
    parser = build_arg_parser(environ)
    args = parser.parse_args(argv)
    settings = Settings(**vars(args))
    if settings.max_input_chars < 1:
        parser.error("--max_input_chars must be at least 1")
    return settings


# =================================================================================================
# Model
# =================================================================================================


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message tells the operator what to do."""


def pocket_tts_configs_dir() -> Path:
    """Folder of the YAML configs that pocket-tts ships (one per language)."""
    from pocket_tts.utils.config import CONFIGS_DIR

    return Path(CONFIGS_DIR)


def model_source(model_path: str) -> dict[str, str]:
    """Map --model_path to TTSModel.load_model's `language=` or `config=` argument."""
    if model_path.startswith(("hf://", "http://", "https://")):
        return {"config": model_path}
    if model_path.endswith((".yaml", ".yml")) or os.sep in model_path:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"--model_path {model_path!r}: no such YAML config file.")
        return {"config": str(path.resolve())}
    languages = sorted(p.stem for p in pocket_tts_configs_dir().glob("*.yaml"))
    if model_path not in languages:
        raise ModelLoadError(
            f"--model_path {model_path!r} is neither a pocket-tts language "
            f"({', '.join(languages)}) nor a YAML config file."
        )
    return {"language": model_path}


def pick_device(requested: str) -> str:
    """Resolve --device: auto means CUDA when torch sees a GPU, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but torch sees no CUDA device.")
    return requested


def load_model(settings: Settings):
    """Load the pocket-tts model once, with an actionable message when its files are unreachable."""
    from pocket_tts import TTSModel

    source = model_source(settings.model_path)
    device = pick_device(settings.device)
    try:
        model = TTSModel.load_model(**source, quantize=settings.quantize)
    except Exception as exc:  # hub, network, config and weight errors all end up here
        raise ModelLoadError(
            f"Could not load the pocket-tts model {settings.model_path!r} ({source}): "
            f"{type(exc).__name__}: {exc}\n"
            "pocket-tts downloads its weights, tokenizer and built-in voices from the Hugging "
            "Face Hub (kyutai/pocket-tts) on first use, then reads them from the local cache. "
            "Check that this machine can reach the Hub (or that the files are already cached; "
            "HF_HUB_OFFLINE=1 uses the cache only), or point --model_path at a local YAML config "
            "whose weights_path and tokenizer_path are local files."
        ) from exc
    return model.to(device).eval()


def builtin_voice_names(model) -> list[str]:
    """pocket-tts's predefined voices: only models loaded from a packaged config have them."""
    from pocket_tts.utils.utils import _ORIGINS_OF_PREDEFINED_VOICES

    origin = getattr(model, "origin", None)
    packaged = origin is not None and Path(origin).is_relative_to(pocket_tts_configs_dir())
    if not packaged or getattr(model, "has_custom_weights", False):
        return []
    return list(_ORIGINS_OF_PREDEFINED_VOICES)


def model_language(model) -> str:
    """The language of the loaded model, from its config name ("german_24l" -> "german")."""
    stem = Path(str(getattr(model, "origin", "") or "")).stem.lower()
    for language in ("english", "french", "german", "spanish", "italian", "portuguese", "dutch"):
        if language in stem:
            return language
    return "english"


# =================================================================================================
# Text normalization
# =================================================================================================

UNICODE_PUNCTUATION = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - "}
)


def normalize_text(text: str) -> str:
    """Unicode-normalize the text and collapse whitespace, so the tokenizer sees plain prose."""
    text = unicodedata.normalize("NFKC", text).translate(UNICODE_PUNCTUATION)
    return re.sub(r"\s+", " ", text).strip()


# =================================================================================================
# Voices
# =================================================================================================

# OpenAI voice names -> pocket-tts built-in voices of a similar character. Clients hard-code
# these names, so they always resolve: to the default voice where the model has no built-ins.
OPENAI_VOICE_MAP = {
    "alloy": "alba",
    "ash": "marius",
    "ballad": "javert",
    "coral": "cosette",
    "echo": "jean",
    "fable": "george",
    "onyx": "michael",
    "nova": "anna",
    "sage": "vera",
    "shimmer": "fantine",
    "verse": "paul",
    "marin": "eponine",
    "cedar": "charles",
}
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".webm", ".mp4")
MAX_REFERENCE_SECONDS = 30.0  # pocket-tts's own truncation length for voice prompts
MIN_REFERENCE_SECONDS = 0.5
MAX_REFERENCE_BYTES = 100 * 1024 * 1024


class VoiceError(ValueError):
    """A voice that cannot be used; the message is safe to show the client."""


@dataclass(frozen=True)
class VoiceSource:
    """What a voice name resolved to: a pocket-tts built-in, or a reference audio file."""

    kind: str  # "builtin" | "file"
    ref: str  # built-in name, or absolute file path

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def name(self) -> str:
        """What clients see: a built-in's name or a file's stem, never a server path."""
        return Path(self.ref).stem if self.is_file else self.ref


def check_audio_path(path: Path) -> Path:
    """Resolve a path and accept only a regular file with an audio extension and a sane size."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise VoiceError(f"voice file {path.name!r} does not exist.") from None
    if not resolved.is_file():
        raise VoiceError(f"voice {path.name!r} is not a regular audio file.")
    if not {path.suffix.lower(), resolved.suffix.lower()} <= set(AUDIO_EXTENSIONS):
        raise VoiceError(
            f"voice file {path.name!r} is not an audio file ({', '.join(AUDIO_EXTENSIONS)})."
        )
    size = resolved.stat().st_size
    if size == 0 or size > MAX_REFERENCE_BYTES:
        raise VoiceError(f"voice file {path.name!r} is empty or larger than the allowed size.")
    return resolved


def decode_reference(path: Path, sample_rate: int, max_seconds: float = MAX_REFERENCE_SECONDS):
    """Decode any audio PyAV reads to float32 mono at `sample_rate`, at most `max_seconds`."""
    limit = int(max_seconds * sample_rate)
    pieces: list[np.ndarray] = []
    got = 0
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise VoiceError(f"voice file {path.name!r} has no audio stream.")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
                    got += pieces[-1].size
                if got >= limit:
                    break
            else:
                pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, VoiceError):
            raise
        raise VoiceError(f"voice file {path.name!r} could not be decoded as audio.") from None
    audio = np.concatenate(pieces)[:limit] if pieces else np.zeros(0, np.float32)
    if audio.size < MIN_REFERENCE_SECONDS * sample_rate:
        raise VoiceError(
            f"voice file {path.name!r} holds less than {MIN_REFERENCE_SECONDS} s of audio."
        )
    if not np.isfinite(audio).all() or float(np.abs(audio).max()) < 1e-4:
        raise VoiceError(f"voice file {path.name!r} is silent or corrupt.")
    return audio.astype(np.float32, copy=False)


class VoiceCatalog:
    """Resolves the `voice` field of a request to a VoiceSource, and lists what can be asked for."""

    def __init__(self, builtins: list[str], default_voice: str | None, language="english"):
        self.builtins = builtins
        self.default = self.resolve_default(default_voice, language)

    def resolve_default(self, name: str | None, language: str) -> VoiceSource:
        """The server's default voice: the flag, else pocket-tts's default for the language."""
        from pocket_tts.default_parameters import get_default_voice_for_language

        if name:
            return self.lookup(name.strip())
        builtin = get_default_voice_for_language(language)
        if builtin in self.builtins:
            return VoiceSource("builtin", builtin)
        raise VoiceError(
            "this model has no built-in voices: pass --default_voice /path/to/reference.wav"
        )

    def resolve(self, name: str | None) -> VoiceSource:
        """Resolution order: OpenAI names -> built-in names -> absolute path to an audio file."""
        if not name or not name.strip():
            return self.default
        key = name.strip()
        if key.lower() in OPENAI_VOICE_MAP:
            mapped = OPENAI_VOICE_MAP[key.lower()]
            return VoiceSource("builtin", mapped) if mapped in self.builtins else self.default
        return self.lookup(key)

    def lookup(self, key: str) -> VoiceSource:
        """A built-in name or an absolute audio file path, else a VoiceError listing the choices."""
        if key.lower() in self.builtins:
            return VoiceSource("builtin", key.lower())
        if Path(key).is_absolute():
            return VoiceSource("file", str(check_audio_path(Path(key))))
        raise VoiceError(
            f"Voice {key!r} is not available. Available voices: {', '.join(self.names())}, "
            "or an absolute path to an audio file."
        )

    def names(self) -> list[str]:
        """Every voice name a client can use."""
        return list(OPENAI_VOICE_MAP) + [b for b in self.builtins if b not in OPENAI_VOICE_MAP]

    def describe(self) -> list[dict[str, Any]]:
        """One entry per voice, for /v1/voices."""
        entries = [
            {
                "id": name,
                "name": name,
                "kind": "openai",
                "maps_to": target if target in self.builtins else self.default.name,
            }
            for name, target in OPENAI_VOICE_MAP.items()
        ]
        entries += [{"id": b, "name": b, "kind": "builtin"} for b in self.builtins]
        for entry in entries:
            entry["object"] = "voice"
            entry["default"] = entry["id"] == self.default.name
        return entries


# =================================================================================================
# Synthesis
# =================================================================================================

FADE_IN_SECONDS = 0.005  # sentence starts: a fresh decoder state may begin off zero
FADE_OUT_SECONDS = 0.010  # sentence ends: generation stops wherever the waveform happens to be


class Engine:
    """The only owner of the model: voice states and audio generation, one generation at a time.

    `generate` yields float32 mono numpy chunks at `sample_rate` as the model produces them and
    stops early once `stop` is set. Later scheduling (queues, batching) replaces this class only.
    """

    def __init__(self, model, voice_cache_size: int = 32):
        self.model = model
        self.sample_rate: int = model.sample_rate
        self.frame_rate: float = model.config.mimi.frame_rate
        self.has_voice_cloning: bool = getattr(model, "has_voice_cloning", True)
        self._model_lock = threading.Lock()  # one generation (or voice encoding) at a time
        self._cache_lock = threading.Lock()
        self._states: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_size = voice_cache_size

    # -- voices -----------------------------------------------------------------------------------

    def voice_state(self, source: VoiceSource):
        """The conditioned model state of a voice, encoded once and then served from an LRU."""
        key = self._cache_key(source)
        with self._cache_lock:
            if key in self._states:
                self._states.move_to_end(key)
                return self._states[key]
        state = self._encode_voice(source)
        with self._cache_lock:
            self._states[key] = state
            while len(self._states) > self._cache_size:
                self._states.popitem(last=False)
        return state

    @staticmethod
    def _cache_key(source: VoiceSource) -> tuple:
        if source.is_file:
            st = os.stat(source.ref)
            return (source.kind, source.ref, st.st_mtime_ns, st.st_size)
        return (source.kind, source.ref)

    def _encode_voice(self, source: VoiceSource):
        import torch

        if not source.is_file:
            with self._model_lock:
                return self.model.get_state_for_audio_prompt(source.ref)
        if not self.has_voice_cloning:
            raise VoiceError(
                "this server's model was loaded without the voice-cloning weights, so only "
                "built-in voices can be used (accept the model's terms on the Hugging Face Hub "
                "and log in to get them)."
            )
        audio = decode_reference(Path(source.ref), self.sample_rate)
        with self._model_lock:
            return self.model.get_state_for_audio_prompt(torch.from_numpy(audio)[None, :])

    # -- text -------------------------------------------------------------------------------------

    def split(self, text: str) -> list[str]:
        """pocket-tts's own sentence chunking, done here so each chunk boundary can be faded."""
        from pocket_tts.default_parameters import MAX_TOKEN_PER_CHUNK
        from pocket_tts.models.text_chunking import split_into_best_sentences

        m = self.model
        return split_into_best_sentences(
            m.flow_lm.conditioner.tokenizer,
            text,
            MAX_TOKEN_PER_CHUNK,
            m.pad_with_spaces_for_short_inputs,
            remove_semicolons=m.remove_semicolons,
            append_terminal_punctuation=m.append_terminal_punctuation,
            capitalize_first_letter=m.capitalize_first_letter,
            replace_characters=m.replace_characters,
        )

    def count_tokens(self, text: str) -> int:
        """Text tokens as the model's tokenizer counts them (reported as usage)."""
        return len(self.model.flow_lm.conditioner.tokenizer.encode(text))

    # -- audio ------------------------------------------------------------------------------------

    def generate(self, text: str, voice_state, stop: threading.Event) -> Iterator[np.ndarray]:
        """Audio for `text` in `voice_state`, chunk by chunk, until done or `stop` is set."""
        with self._model_lock:
            for sentence in self.split(text):
                if stop.is_set():
                    return
                yield from self._generate_sentence(sentence, voice_state, stop)

    def _generate_sentence(self, sentence: str, voice_state, stop) -> Iterator[np.ndarray]:
        """One chunk of text, faded in and out so that consecutive chunks join without clicks."""
        fade_in = int(FADE_IN_SECONDS * self.sample_rate)
        fade_out = int(FADE_OUT_SECONDS * self.sample_rate)
        pending = np.zeros(0, np.float32)  # last samples, held back until we know they end it
        started = False
        stream = self.model.generate_audio_stream(voice_state, sentence, stop=stop)
        try:
            for chunk in stream:
                audio = chunk.detach().to("cpu").float().numpy().reshape(-1)
                if not started and audio.size:
                    audio = audio.copy()
                    n = min(fade_in, audio.size)
                    audio[:n] *= np.linspace(0.0, 1.0, n, dtype=np.float32)
                    started = True
                pending = np.concatenate([pending, audio])
                if pending.size > fade_out:
                    yield pending[:-fade_out]
                    pending = pending[-fade_out:]
        finally:
            stream.close()
        if pending.size:
            yield pending * np.linspace(1.0, 0.0, pending.size, dtype=np.float32)


# =================================================================================================
# Encoding
# =================================================================================================


@dataclass(frozen=True)
class AudioFormat:
    """One `response_format`: its HTTP content type and how PyAV (FFmpeg) writes it."""

    name: str
    content_type: str
    container: str | None  # None: raw PCM, no container
    codec: str | None
    codec_options: dict[str, str] = field(default_factory=dict)
    container_options: dict[str, str] = field(default_factory=dict)
    bit_rate: int | None = None


FORMATS = {
    f.name: f
    for f in (
        AudioFormat("mp3", "audio/mpeg", "mp3", "libmp3lame", bit_rate=64_000),
        # Ogg pages are flushed every 20 ms instead of every second, so streams start at once.
        AudioFormat("opus", "audio/opus", "ogg", "libopus", {}, {"page_duration": "20000"}, 32_000),
        AudioFormat("aac", "audio/aac", "adts", "aac", bit_rate=64_000),
        # Small FLAC blocks: the first block leaves after ~50 ms of audio, not ~200 ms.
        AudioFormat("flac", "audio/flac", "flac", "flac", {"frame_size": "1152"}),
        AudioFormat("wav", "audio/wav", "wav", "pcm_s16le", {}, {"fflags": "+bitexact"}),
        AudioFormat("pcm", "audio/pcm", None, None),
    )
}


def atempo_factors(speed: float) -> list[float]:
    """Split a speed into atempo stages of 0.5..2.0 each (0.25 -> 0.5 x 0.5, 4 -> 2 x 2)."""
    factors = []
    while speed > 2.0:
        factors.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    return factors + [speed]


def float_frame(samples: np.ndarray, sample_rate: int, pts: int) -> av.AudioFrame:
    """Wrap float32 mono samples in a PyAV frame."""
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, sample_rate)
    return frame


class TempoFilter:
    """Pitch-preserving time stretch (FFmpeg atempo), fed and drained chunk by chunk."""

    def __init__(self, speed: float, sample_rate: int):
        self.speed = speed
        self.sample_rate = sample_rate
        self.samples_in = self.samples_out = 0
        self.graph = av.filter.Graph()
        node = self.graph.add_abuffer(
            sample_rate=sample_rate, format="flt", layout="mono", time_base=f"1/{sample_rate}"
        )
        for factor in atempo_factors(speed):
            stage = self.graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        sink = self.graph.add("abuffersink")
        node.link_to(sink)
        self.graph.configure()

    def process(self, samples: np.ndarray | None) -> np.ndarray:
        """Push samples (None flushes) and return whatever stretched audio is ready."""
        if samples is None:
            self.graph.push(None)
        else:
            self.graph.push(float_frame(samples, self.sample_rate, self.samples_in))
            self.samples_in += samples.size
        out = []
        while True:
            try:
                out.append(self.graph.pull().to_ndarray().reshape(-1))
            except (av.BlockingIOError, av.EOFError):
                break
        if samples is None:  # atempo drops its last partial window: pad to the exact length
            missing = round(self.samples_in / self.speed) - self.samples_out - sum(map(len, out))
            out.append(np.zeros(max(0, missing), np.float32))
        audio = np.concatenate(out) if out else np.zeros(0, np.float32)
        self.samples_out += audio.size
        return audio


class _ByteSink:
    """A write-only, non-seekable file for PyAV: muxers then write streamable headers."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples to raw signed 16-bit little-endian PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class AudioEncoder:
    """Float32 mono chunks in, bytes of one valid audio file out, incrementally.

    Streaming writes to a non-seekable sink, so headers are streamable (a WAV states placeholder
    sizes); otherwise the file is written to a seekable buffer and headers state real lengths.
    `speed` != 1 runs the audio through a TempoFilter first.
    """

    def __init__(self, fmt: AudioFormat, sample_rate: int, speed: float = 1.0, streaming=True):
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.streaming = streaming
        self.samples_in = 0
        self.samples_out = 0
        self.tempo = TempoFilter(speed, sample_rate) if abs(speed - 1.0) > 1e-6 else None
        self.buffer = bytearray()  # raw PCM of a non-streamed pcm response
        self.container = self.stream = None
        if fmt.container is not None:
            self.sink = _ByteSink() if streaming else io.BytesIO()
            self.container = av.open(
                self.sink, "w", format=fmt.container, options=dict(fmt.container_options)
            )
            self.stream = self.container.add_stream(
                fmt.codec, rate=sample_rate, layout="mono", options=dict(fmt.codec_options)
            )
            if fmt.bit_rate:
                self.stream.codec_context.bit_rate = fmt.bit_rate

    def encode(self, samples: np.ndarray) -> bytes:
        """Feed audio; return the bytes that are ready (streaming) or b"" (buffered)."""
        self.samples_in += samples.size
        if self.tempo is not None:
            samples = self.tempo.process(samples)
        return self._write(samples)

    def finish(self) -> bytes:
        """Flush every stage and return the remaining bytes (the whole file when buffered)."""
        tail = self._write(self.tempo.process(None)) if self.tempo is not None else b""
        if self.container is None:
            return tail + bytes(self.buffer)
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        return tail + (self.sink.take() if self.streaming else self.sink.getvalue())

    def _write(self, samples: np.ndarray) -> bytes:
        if samples.size == 0:
            return b""
        pts, self.samples_out = self.samples_out, self.samples_out + samples.size
        if self.container is None:
            if self.streaming:
                return pcm16(samples)
            self.buffer += pcm16(samples)
            return b""
        for packet in self.stream.encode(float_frame(samples, self.sample_rate, pts)):
            self.container.mux(packet)
        return self.sink.take() if self.streaming else b""

    def close(self):
        """Release FFmpeg resources after an aborted stream."""
        if self.container is not None:
            with contextlib.suppress(Exception):  # a half-written container: best effort
                self.container.close()


# =================================================================================================
# HTTP API
# =================================================================================================

OPEN_PATHS = ("/", "/health", "/pocket-tts-logo.png", "/favicon.ico")


class ApiError(Exception):
    """A client-visible error, rendered as OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def response(self) -> Response:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        resp = jsonify({"error": body})
        resp.status_code = self.status
        return resp


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class SpeechRequest:
    """A validated POST /v1/audio/speech body."""

    input: str
    voice: str | None
    response_format: str = "mp3"
    speed: float = 1.0
    stream: bool = False
    stream_format: str = "audio"
    normalize: bool = True


def parse_speech_request(body: Any, settings: Settings) -> SpeechRequest:
    """Validate an OpenAI speech request; unknown fields are ignored, bad ones name their param."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    text = body.get("input")
    if text is None:
        raise invalid("input", "Missing required parameter: 'input'.", "missing_required_parameter")
    if not isinstance(text, str):
        raise invalid("input", "'input' must be a string.", "invalid_type")
    if not text.strip():
        raise invalid("input", "'input' must not be empty.")
    if len(text) > settings.max_input_chars:
        raise invalid(
            "input",
            f"'input' is {len(text)} characters long; the maximum is {settings.max_input_chars}.",
            "string_above_max_length",
        )
    for name in ("model", "voice", "instructions"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise invalid(name, f"'{name}' must be a string.", "invalid_type")
    fmt = body.get("response_format") or "mp3"
    if fmt not in FORMATS:
        raise invalid(
            "response_format",
            f"'response_format' must be one of {', '.join(FORMATS)}; got {fmt!r}.",
        )
    speed = body.get("speed", 1.0)
    speed = 1.0 if speed is None else speed
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed):
        raise invalid("speed", "'speed' must be a number between 0.25 and 4.0.", "invalid_type")
    if not 0.25 <= speed <= 4.0:
        raise invalid("speed", f"'speed' must be between 0.25 and 4.0; got {speed}.")
    stream = body.get("stream", settings.stream)
    stream = settings.stream if stream is None else stream
    normalize = body.get("normalize", True)
    for name, value in (("stream", stream), ("normalize", normalize)):
        if not isinstance(value, bool):
            raise invalid(name, f"'{name}' must be true or false.", "invalid_type")
    stream_format = body.get("stream_format") or "audio"
    if stream_format not in ("audio", "sse"):
        raise invalid("stream_format", "'stream_format' must be 'audio' or 'sse'.")
    return SpeechRequest(
        input=text,
        voice=body.get("voice") or None,
        response_format=fmt,
        speed=float(speed),
        stream=stream or stream_format == "sse",
        stream_format=stream_format,
        normalize=normalize,
    )


class SpeechServer:
    """The Flask application: validates requests, asks the Engine for audio, encodes it."""

    def __init__(self, settings: Settings, engine: Engine, voices: VoiceCatalog):
        self.settings = settings
        self.engine = engine
        self.voices = voices
        self.device = str(getattr(engine.model, "device", "cpu"))
        self.app = self.create_app()

    def create_app(self) -> Flask:
        app = Flask(SERVER_NAME)
        app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
        app.json.sort_keys = False
        routes = [
            ("/", self.page, ["GET"]),
            ("/pocket-tts-logo.png", self.logo, ["GET"]),
            ("/favicon.ico", self.logo, ["GET"]),
            ("/health", self.health, ["GET"]),
            ("/v1/models", self.models, ["GET"]),
            ("/v1/audio/models", self.audio_models, ["GET"]),
            ("/v1/voices", self.list_voices, ["GET"]),
            ("/v1/audio/voices", self.list_audio_voices, ["GET"]),
            ("/v1/audio/speech", self.speech, ["POST"]),
        ]
        for rule, view, methods in routes:
            app.add_url_rule(rule, view.__name__ + rule, view, methods=methods)
        app.before_request(self.check_api_key)
        app.register_error_handler(ApiError, lambda e: e.response())
        app.register_error_handler(HTTPException, self.http_error)
        app.register_error_handler(Exception, self.internal_error)
        return app

    # -- errors and auth --------------------------------------------------------------------------

    def check_api_key(self):
        key = self.settings.api_key
        if not key or request.path in OPEN_PATHS or request.method == "OPTIONS":
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return
        raise ApiError(
            401,
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )

    @staticmethod
    def http_error(exc: HTTPException):
        messages = {404: f"Unknown URL: {request.method} {request.path}."}
        message = messages.get(exc.code, exc.description or exc.name)
        if exc.code == 405:
            message = f"Method {request.method} is not allowed on {request.path}."
        resp = ApiError(exc.code or 500, message, code=exc.name.lower().replace(" ", "_"))
        resp = resp.response()
        if exc.code == 405:
            resp.headers["Allow"] = ", ".join(exc.valid_methods or [])
        return resp

    @staticmethod
    def internal_error(exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.path)
        return ApiError(500, "The server had an internal error.", kind="server_error").response()

    # -- small JSON endpoints ---------------------------------------------------------------------

    def health(self):
        return jsonify(
            status="ok",
            model=self.settings.model_path,
            device=self.device,
            sample_rate=self.engine.sample_rate,
            voices=len(self.voices.names()),
            default_voice=self.voices.default.name,
        )

    def models(self):
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "kyutai"} for m in MODEL_IDS]
        return jsonify(object="list", data=data)

    def audio_models(self):
        return jsonify(models=[{"id": m} for m in MODEL_IDS])

    def list_voices(self):
        return jsonify(
            object="list",
            data=self.voices.describe(),
            default=self.voices.default.name,
            resolution_order=["openai", "builtin", "path"],
        )

    def list_audio_voices(self):
        return jsonify(voices=[{"id": v["id"], "name": v["name"]} for v in self.voices.describe()])

    # -- speech -----------------------------------------------------------------------------------

    def speech(self):
        body = request.get_json(force=True, silent=True)
        if body is None:
            raise ApiError(
                400, "We could not parse the JSON body of your request.", None, "invalid_json"
            )
        req = parse_speech_request(body, self.settings)
        text = normalize_text(req.input) if req.normalize else req.input
        voice_state = self.load_voice(req.voice)
        fmt = FORMATS[req.response_format]
        headers = {
            "Cache-Control": "no-store",
            "Content-Disposition": f'inline; filename="speech.{fmt.name}"',
        }
        if req.stream_format == "sse":
            events = self.sse_events(text, voice_state, req)
            return Response(events, mimetype="text/event-stream", headers=headers)
        chunks = self.audio_chunks(text, voice_state, req)
        if req.stream:
            headers["X-Accel-Buffering"] = "no"
            return Response(chunks, content_type=fmt.content_type, headers=headers)
        return Response(b"".join(chunks), content_type=fmt.content_type, headers=headers)

    def load_voice(self, name: str | None):
        """Resolve and encode the requested voice; client mistakes become a 400 on `voice`."""
        try:
            source = self.voices.resolve(name)
            return self.engine.voice_state(source)
        except VoiceError as exc:
            raise invalid("voice", str(exc)) from None
        except ApiError:
            raise
        except Exception:
            if name and name.strip().lower() in OPENAI_VOICE_MAP:
                logger.exception("voice %r failed; using the default voice", name)
                return self.engine.voice_state(self.voices.default)
            raise

    def audio_chunks(self, text: str, voice_state, req: SpeechRequest, usage=None):
        """Encoded bytes of the response as they are produced; stops generation when closed."""
        stop = threading.Event()
        audio = self.engine.generate(text, voice_state, stop)
        encoder = AudioEncoder(
            FORMATS[req.response_format], self.engine.sample_rate, req.speed, req.stream
        )
        try:
            for samples in audio:
                data = encoder.encode(samples)
                if data:
                    yield data
        except Exception:
            if not req.stream:
                raise
            # Headers are gone: log, and end the file cleanly with the audio made so far.
            logger.exception("synthesis failed after the response started")
        finally:
            stop.set()  # a client that hung up closes this generator: stop generating for nobody
            audio.close()
            if usage is not None:
                usage["samples"] = encoder.samples_in
        yield encoder.finish()

    def sse_events(self, text: str, voice_state, req: SpeechRequest) -> Iterator[str]:
        """OpenAI's speech SSE stream: audio deltas, then a done event with usage, then [DONE]."""
        usage: dict[str, int] = {}
        for data in self.audio_chunks(text, voice_state, req, usage):
            if data:
                delta = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                yield f"data: {json.dumps(delta)}\n\n"
        samples_per_token = self.engine.sample_rate / self.engine.frame_rate
        input_tokens = self.engine.count_tokens(text)
        output_tokens = math.ceil(usage.get("samples", 0) / samples_per_token)
        done = {
            "type": "speech.audio.done",
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }
        yield f"data: {json.dumps(done)}\n\n"
        yield "data: [DONE]\n\n"

    # -- page -------------------------------------------------------------------------------------

    def page(self):
        return Response(PAGE_HTML, content_type="text/html; charset=utf-8")

    def logo(self):
        headers = {"Cache-Control": "public, max-age=86400"}
        return Response(LOGO_PNG, content_type="image/png", headers=headers)


# =================================================================================================
# Main
# =================================================================================================


def build_server(settings: Settings, model=None) -> SpeechServer:
    """Load (or take) the model, pre-encode the default voice, and assemble the application."""
    model = load_model(settings) if model is None else model
    engine = Engine(model)
    voices = VoiceCatalog(builtin_voice_names(model), settings.default_voice, model_language(model))
    engine.voice_state(voices.default)  # the first request must not pay for it
    return SpeechServer(settings, engine, voices)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        server = build_server(settings)
    except (ModelLoadError, VoiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import waitress

    logger.info(
        "serving %s on http://%s:%d/ (device %s, streaming by default: %s)",
        settings.model_path,
        settings.host,
        settings.port,
        server.device,
        settings.stream,
    )
    waitress.serve(
        server.app, host=settings.host, port=settings.port, threads=settings.threads, ident=None
    )
    return 0


# =================================================================================================
# Page (HTML/CSS/JS) and logo, embedded so that this file runs alone
# =================================================================================================

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pocket-tts</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/pocket-tts-logo.png"></head>
<body><img src="/pocket-tts-logo.png" alt="pocket-tts" height="48">
<p>OpenAI-compatible speech server. POST /v1/audio/speech.</p></body></html>
"""

LOGO_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)

if __name__ == "__main__":
    sys.exit(main())
