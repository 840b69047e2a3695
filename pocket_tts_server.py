"""pocket-tts-server: an OpenAI-compatible speech server for Kyutai's pocket-tts.

pocket-tts is a 100M-parameter text-to-speech model that runs faster than real time on a CPU and
clones a voice from a few seconds of audio. This one file turns it into a server that OpenAI
clients (the openai SDK, Open WebUI, Home Assistant, SillyTavern, curl...) use unmodified:

    python pocket_tts_server.py --host 0.0.0.0 --port 8000 --stream

    POST /v1/audio/speech   {"input": "Hello!", "voice": "alloy", "response_format": "mp3"}

Data flows top to bottom, and so does this file:

    configuration & CLI -> model -> text -> voices -> synthesis (PocketSteps, Admission,
    BatchScheduler, Engine)
    -> encoding (PyAV) -> HTTP API (Flask, served by waitress) -> Wyoming (Home Assistant)
    -> main -> page

One thread owns the model: the BatchScheduler's loop. Request threads submit a sentence and read
its audio; the loop prefills waiting sentences in one batched pass, advances every active stream by
one batched FlowLM step per tick (Mimi decodes the previous tick on a second thread), and lets
sentences join and leave at any tick. Whatever fails there fails only the rows it concerns, with an
error their readers raise. Admission keeps the batch faster than real time by a margin: its
capacity comes from step times calibrated at start-up, scaled by a smoothed load and held by
hysteresis; requests beyond it wait in a bounded FIFO queue. On a GPU both steps replay as CUDA
graphs, since launching their small kernels one by one would cost more than running them. On a CPU,
FlowLM's matrix products run in int8 where start-up measures int8 faster (--precision). Each stream
keeps its own KV regions and seeded noise, so its audio does not depend on what else is batched (at
int8, within 1e-4 of its peak: activations share a scale per product). The Engine yields float32
audio chunks and honours a stop event (set when a client hangs up), so HTTP handlers and encoders
never depend on how generation is scheduled. Encoders are incremental, so a streamed response
leaves as soon as the model produces audio, in every format. The web page (one player that decodes
every format while it streams) and its logo are embedded at the end, so this file copied alone
still runs. With --wyoming_port, the same Engine also speaks the Wyoming protocol, so Home
Assistant's voice pipelines use it natively.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import concurrent.futures
import contextlib
import copy
import fractions
import functools
import hashlib
import hmac
import http.client
import io
import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import socket
import statistics
import sys
import threading
import time
import unicodedata
import uuid
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import av
import av.filter
import numpy as np
from flask import Flask, Response, g, jsonify, request
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask
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
    voice_map: str | None = None
    cache_dir: str | None = None
    allow_remote_voices: bool = False
    device: str = "auto"
    precision: str = "auto"
    quantize: bool = False  # alias of --precision int8
    api_key: str | None = None
    api_key_file: str | None = None
    cors_origins: str | None = None
    max_input_chars: int = 4096
    max_batch: int = 0  # 0: by device
    realtime_margin: float = 1.1
    workers: int = 0  # deprecated alias of max_batch
    max_queue: int = 16
    queue_timeout: float = 60.0
    request_timeout: float = 600.0
    max_body_kb: int = 1024
    max_upload_mb: int = 25
    max_reference_seconds: float = 30.0
    voice_cache_size: int = 32
    max_connections: int = 1000
    idle_timeout: int = 30
    drain_seconds: float = 15.0
    wyoming_port: int = 0
    wyoming_host: str | None = None
    wyoming_zeroconf: bool = False
    ws_port: int = 0
    ws_host: str | None = None
    ws_tls_cert: str | None = None
    ws_tls_key: str | None = None
    metrics_key: str | None = None
    log_level: str = "info"


FLAG_HELP = {
    "model_path": "pocket-tts language name (english, french, german_24l, ...), local YAML config, "
    "or hf:// path",
    "host": "address to bind; 127.0.0.1 keeps the server private to this machine",
    "port": "TCP port",
    "stream": "stream responses by default (a request's `stream` field still decides)",
    "voices_dir": "folder of reference recordings, each one a voice named by its file stem "
    "(default: <user data dir>/pocket-tts-server/voices)",
    "default_voice": "voice used when a request names none (any voice name or audio file path)",
    "voice_map": 'JSON file mapping OpenAI voice names to voices, e.g. {"nova": "Speaker Two"}',
    "cache_dir": "where voice latents persist (default: <user cache dir>/pocket-tts-server)",
    "allow_remote_voices": "allow http(s):// URLs as voices (downloaded by the server)",
    "device": "torch device: auto picks CUDA when available",
    "precision": "weights of the batched steps' matrix products: int8 (a quarter of float32's "
    "bytes; FlowLM's attention and feed-forward, as pocket-tts's --quantize), float32, or auto: on "
    "a CPU, int8 at each batch size where start-up measures it faster; float32 on a GPU",
    "quantize": "same as --precision int8",
    "api_key": "require `Authorization: Bearer <key>` for synthesis and writes (health, the page "
    "and the model and voice listings stay open)",
    "api_key_file": "read the API key from this file (keeps it out of `ps`; so does "
    "POCKET_TTS_API_KEY)",
    "cors_origins": "comma-separated browser origins allowed to call the API from other sites "
    "(e.g. https://app.example.com; * for any); others' cross-site writes are refused",
    "max_input_chars": "longest accepted `input`, in characters",
    "max_batch": "streams generated together in one batched step at most (0: 16 on CPU, 128 on "
    "CUDA, within half the free memory); fewer are admitted when more would not stay faster "
    "than real time",
    "realtime_margin": "admit a stream only while the batch stays this many times faster than "
    "real time (0: admit up to --max_batch, for throughput over smooth streaming)",
    "workers": "deprecated: same as --max_batch",
    "max_queue": "requests that may wait for a worker; more get 429 with Retry-After",
    "queue_timeout": "seconds a request may wait for a worker before a 503",
    "request_timeout": "seconds one synthesis may run before it is stopped",
    "max_body_kb": "largest JSON request body, in KiB",
    "max_upload_mb": "largest voice upload, in MiB",
    "max_reference_seconds": "seconds of a reference recording used for cloning",
    "voice_cache_size": "voice states kept in memory (LRU)",
    "max_connections": "open client connections at most (idle or slow ones included)",
    "idle_timeout": "seconds an idle connection is kept open",
    "drain_seconds": "on SIGTERM, seconds to let running streams finish before exiting",
    "wyoming_port": "also serve the Wyoming protocol (Home Assistant) on this TCP port (10200 is "
    "usual; 0: off)",
    "wyoming_host": "address for Wyoming (default: --host)",
    "wyoming_zeroconf": "announce the Wyoming service over mDNS, so Home Assistant discovers it",
    "ws_port": "also serve voice agents' streaming-text WebSockets (Gradium's and ElevenLabs' "
    "protocols, for Pipecat, LiveKit and their SDKs) on this TCP port (0: off)",
    "ws_host": "address for the WebSockets (default: --host)",
    "ws_tls_cert": "certificate (PEM) to serve the WebSockets as wss:// (the elevenlabs SDK "
    "only speaks wss://); with --ws_tls_key",
    "ws_tls_key": "private key (PEM) of --ws_tls_cert",
    "metrics_key": "require `Authorization: Bearer <key>` for /metrics (default: open, as "
    "/health is)",
    "log_level": "logging level",
}
FLAG_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "float32", "int8"),
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
        kind = {"int": int, "float": float}.get(str(f.type), str)
        if f.type in ("bool", bool):
            default = parse_bool(env_value) if env_value is not None else f.default
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kwargs.update(
                type=kind,
                default=env_value if env_value is not None else f.default,
                choices=FLAG_CHOICES.get(f.name),
            )
            if f.default is not None:
                kwargs["help"] += f" (default: {f.default})"
        parser.add_argument(*names, **kwargs)
    return parser


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None):
    """Settings from the command line and the environment."""
    environ = dict(os.environ) if environ is None else environ
    parser = build_arg_parser(environ)
    args = parser.parse_args(argv)
    settings = Settings(**vars(args))
    positive = ("max_input_chars", "max_body_kb", "max_upload_mb", "max_reference_seconds",
                "queue_timeout", "request_timeout", "voice_cache_size", "max_connections",
                "idle_timeout")  # fmt: skip
    for name in positive:
        if getattr(settings, name) <= 0:
            parser.error(f"--{name} must be positive")
    if settings.workers < 0 or settings.max_queue < 0 or settings.drain_seconds < 0:
        parser.error("--workers, --max_queue and --drain_seconds cannot be negative")
    if settings.max_batch < 0 or settings.realtime_margin < 0:
        parser.error("--max_batch and --realtime_margin cannot be negative")
    settings.max_batch = settings.max_batch or settings.workers
    if settings.quantize:
        settings.precision = "int8"
    if settings.api_key_file:
        try:
            settings.api_key = Path(settings.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--api_key_file: {exc}")
    return settings


def max_body_bytes(settings: Settings) -> int:
    """The largest request body: an upload (or a JSON body), plus multipart overhead."""
    return max(settings.max_upload_mb * 1024, settings.max_body_kb) * 1024 + 64 * 1024


# =================================================================================================
# Metrics: what Prometheus scrapes at /metrics
# =================================================================================================
# prometheus_client writes the exposition; each Engine owns a registry of its own (tests build many
# servers in one process). Counters and histograms are fed by their owners as things happen
# (admission, the scheduler, the voice cache, each protocol); the gauges are read from the
# Engine's stats at scrape time, so they are never stale.

SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 120.0)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32, 0.64)


class Metrics:
    """The server's metrics, named as Prometheus asks (a `pocket_tts_` prefix, `_seconds`,
    `_total`)."""

    def __init__(self):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # no `_created` series beside each counter and histogram
        self.registry = registry = CollectorRegistry()
        common = {"namespace": "pocket_tts", "registry": registry}
        self.requests = Counter(
            "requests",
            "HTTP requests answered, by route, status and response_format",
            ["route", "status", "format"],
            **common,
        )
        self.request_seconds = Histogram(
            "request_duration_seconds",
            "HTTP requests, from the request to the body's last byte",
            ["route"],
            buckets=SECONDS_BUCKETS,
            **common,
        )
        self.first_audio = Histogram(
            "time_to_first_audio_seconds",
            "From a request (an HTTP stream, a Wyoming synthesis, a WebSocket unit) to its audio",
            ["protocol"],
            buckets=SECONDS_BUCKETS,
            **common,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Time a stream waited for a place",
            buckets=SECONDS_BUCKETS,
            **common,
        )
        self.refusals = Counter(
            "admission_refusals",
            "Streams refused a place, by reason (queue_full: 429, queue_timeout: 503)",
            ["reason"],
            **common,
        )
        self.step_seconds = Histogram(
            "step_seconds",
            "One batched model step (a tick), all its streams together",
            buckets=STEP_BUCKETS,
            **common,
        )
        self.voice_cache = Counter(
            "voice_cache_lookups",
            "Voice states asked for, by where they came from (memory, disk, encoded)",
            ["result"],
            **common,
        )
        self.sessions = Gauge(
            "sessions", "Open Wyoming and WebSocket sessions", ["protocol"], **common
        )
        self.sessions_opened = Counter("sessions_opened", "Wyoming and WebSocket sessions opened",
                                       ["protocol"], **common)  # fmt: skip

    def watch(self, stats):
        """Gauges read at scrape time from `stats()` (the Engine's numbers for /health)."""
        from prometheus_client.core import GaugeMetricFamily

        gauges = {
            "active_streams": "Streams generating now",
            "queue_depth": "Streams waiting for a place",
            "capacity": "Places: streams admitted at once now (real-time admission)",
            "batch_size": "Rows in the batched step now",
            "realtime_headroom": "Audio seconds made per second, per stream (1: just real time)",
            "recent_rtf": "Real-time factor of recent requests",
        }

        class EngineGauges:
            def collect(self):
                values = stats()
                for name, about in gauges.items():
                    if values.get(name) is not None:
                        yield GaugeMetricFamily(f"pocket_tts_{name}", about, value=values[name])

        self.registry.register(EngineGauges())

    def session(self, protocol: str):
        """Count a session open for as long as the `with` block runs."""
        self.sessions_opened.labels(protocol).inc()
        return self.sessions.labels(protocol).track_inprogress()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


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
    if settings.precision == "int8" and device != "cpu":
        raise ModelLoadError(f"--precision int8 runs on CPUs only (--device {device} was chosen); "
                             "use --precision auto or float32 on a GPU.")  # fmt: skip
    try:
        model = TTSModel.load_model(**source)  # int8 copies are made by the batched steps
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


# =================================================================================================
# Text normalization
# =================================================================================================

# pocket-tts reads what it is given: "$5" and "10:30" come out as noise or letters. This section
# turns text into the words a reader would say, in the model's language. Number words come from
# num2words; the tables below hold only what it lacks (symbol words, month names, time patterns).


@dataclass(frozen=True)
class LanguageRules:
    """The words and patterns normalization needs for one language."""

    code: str  # num2words language code
    and_word: str
    percent: str
    degrees: str
    point: str  # decimal separator, spoken
    months: str  # the twelve month names, space-separated
    date: str  # how "{day} {month}" is spoken
    time: str  # "{hour} {minute}"
    full_hour: str  # "{hour}" o'clock
    ordinal_suffix: str  # regex of ordinal suffixes after digits ("3rd", "3e", "3o")
    day_ordinal: bool = False  # dates say "the third", not "three"
    first_ordinal: bool = False  # ...or only for the first ("le premier mai", "el primero")
    fraction_digits: bool = False  # "3.14" -> "three point one four", not "... fourteen"
    decimal_comma: bool = True  # "1,5" is one and a half; "1.234" is a thousand...


# fmt: off
LANGUAGES = {
    "english": LanguageRules(
        "en", "and", "percent", "degrees", "point",
        "january february march april may june july august september october november december",
        date="the {day} of {month}", time="{hour} {minute}", full_hour="{hour} o'clock",
        ordinal_suffix=r"st|nd|rd|th", day_ordinal=True, fraction_digits=True,
        decimal_comma=False),
    "french": LanguageRules(
        "fr", "et", "pour cent", "degrés", "virgule",
        "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
        date="{day} {month}", time="{hour} heures {minute}", full_hour="{hour} heures",
        ordinal_suffix=r"er|re|e|ème|eme", first_ordinal=True),
    "german": LanguageRules(
        "de", "und", "Prozent", "Grad", "Komma",
        "januar februar märz april mai juni juli august september oktober november dezember",
        date="{day} {month}", time="{hour} Uhr {minute}", full_hour="{hour} Uhr",
        # "3." is an ordinal only in dates ("3. Mai"): elsewhere it may end a sentence.
        ordinal_suffix=r"(?!)", day_ordinal=True),
    "spanish": LanguageRules(
        "es", "y", "por ciento", "grados", "coma",
        "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
        date="{day} de {month}", time="{hour} y {minute}", full_hour="{hour} en punto",
        ordinal_suffix=r"\.?[oa]", first_ordinal=True),
    "italian": LanguageRules(
        "it", "e", "per cento", "gradi", "virgola",
        "gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre "
        "dicembre",
        date="{day} {month}", time="{hour} e {minute}", full_hour="{hour} in punto",
        ordinal_suffix=r"\.?[oa]", first_ordinal=True),
    "portuguese": LanguageRules(
        "pt", "e", "por cento", "graus", "vírgula",
        "janeiro fevereiro março abril maio junho julho agosto setembro outubro novembro dezembro",
        date="{day} de {month}", time="{hour} e {minute}", full_hour="{hour} em ponto",
        ordinal_suffix=r"\.?[oa]", first_ordinal=True),
    "dutch": LanguageRules(
        "nl", "en", "procent", "graden", "komma",
        "januari februari maart april mei juni juli augustus september oktober november december",
        date="{day} {month}", time="{hour} uur {minute}", full_hour="{hour} uur",
        ordinal_suffix=r"ste|de|e"),
}
# fmt: on


def model_language(model) -> str:
    """The language of the loaded model, from its config name ("german_24l" -> "german")."""
    stem = Path(str(getattr(model, "origin", "") or "")).stem.lower()
    return next((language for language in LANGUAGES if language in stem), "english")


CURRENCY_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY"}
UNICODE_PUNCTUATION = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
     "\u00ab": '"', "\u00bb": '"', "\u2013": " - ", "\u2014": " - ", "\u2026": "...",
     "\u2212": "-"}
)  # fmt: skip
EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U00002600-\U000027bf\U0001f1e6-\U0001f1ff\u2b00-\u2bff"
    "\ufe0f\u200d\u20e3]+"
)
# Every pattern over client text runs in linear time: no quantifier that can backtrack over an
# unbounded run while another one does (in-line whitespace is [ \t], never \s across lines),
# spans of emphasis and links are bounded, and number patterns start only where a number starts.
MARKDOWN = [
    (re.compile(r"```[^\n]*\n?|`"), ""),  # code fences and inline code marks
    (re.compile(r"!?\[([^\]\n]{0,300})\]\([^)\n]{0,1000}\)"), r"\1"),  # [text](url) -> text
    (re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+([^\n]*)", re.M),
     lambda m: m[1].rstrip().rstrip("#").rstrip() + "."),  # headers end a sentence
    (re.compile(r"^[ \t]{0,3}>[ \t]?", re.M), ""),  # blockquotes
    (re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+", re.M), ""),  # list bullets
    (re.compile(r"^[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*$", re.M), ""),  # horizontal rules
    (re.compile(r"(\*\*|__|~~)(?=\S)([^\n]{0,300}?\S)\1"), r"\2"),  # bold, strikethrough
    (re.compile(r"(?<![\w*])([*_])(?=\S)([^\n]{0,300}?\S)\1(?![\w*])"), r"\2"),  # emphasis
]  # fmt: skip
# A number starts after no digit or digit-and-separator: a failed match is never retried inside it.
NUMBER = r"(?<![\d.,])\d+(?:[.,]\d+)*"
LONG_NUMBER_DIGITS = 15  # longer digit runs are read digit by digit (num2words overflows)


@functools.lru_cache(maxsize=4096)  # digits and small numbers recur: "0.777..." is one call
def num2words_lang(rules: LanguageRules, value, **kwargs) -> str:
    from num2words import num2words

    return num2words(value, lang=rules.code, **kwargs)


def parse_number(text: str, rules: LanguageRules):
    """'1,234.56' / '1.234,56' / '1,5' -> Decimal, reading separators as the language does.

    None when the separators make no single number ("1,2,3", "1.2.3"): a list, read part by part.
    """
    from decimal import Decimal

    groups = re.split(r"[.,]", text)
    seps = re.findall(r"[.,]", text)
    if not seps:
        return Decimal(text)
    last, body = seps[-1], seps[:-1]
    thousands = len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]) and groups[0] != "0"
    english_decimal = not rules.decimal_comma and seps == ["."]  # "1.234" is a decimal in English
    if len(set(seps)) == 1 and thousands and not english_decimal:
        return Decimal("".join(groups))
    grouped = len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:-1])
    one_kind = len(set(body)) <= 1 and last not in body
    if (not body or grouped) and one_kind and (last == "." or rules.decimal_comma):
        return Decimal(f"{''.join(groups[:-1])}.{groups[-1]}")
    return None


def say_parts(text: str, rules: LanguageRules) -> str:
    """A list of numbers joined by separators ("1,2,3" -> "one, two, three")."""
    from decimal import Decimal

    spoken = {",": ", ", ".": f" {rules.point} "}
    return "".join(spoken.get(p) or say_number(Decimal(p), rules) for p in re.split("([.,])", text))


def say_number(value, rules: LanguageRules) -> str:
    """A Decimal as words: integers by num2words, decimals as '<whole> <point> <fraction>'."""
    sign = ""
    if value < 0:
        sign, value = num2words_lang(rules, -1).split()[0] + " ", -value
    whole, _, fraction = f"{value:f}".partition(".")
    if len(whole) > LONG_NUMBER_DIGITS:
        whole_words = " ".join(num2words_lang(rules, int(d)) for d in whole)
    else:
        whole_words = num2words_lang(rules, int(whole))
    if not fraction:
        return sign + whole_words
    if rules.fraction_digits or fraction.startswith("0") or len(fraction) > 2:
        spoken_fraction = " ".join(num2words_lang(rules, int(d)) for d in fraction)
    else:
        spoken_fraction = num2words_lang(rules, int(fraction))
    return f"{sign}{whole_words} {rules.point} {spoken_fraction}"


def say_money(amount, code: str, rules: LanguageRules) -> str:
    """'$1,234.56' -> 'one thousand, two hundred and thirty-four dollars, fifty-six cents'."""
    whole = amount == amount.to_integral_value()
    cents = -amount.as_tuple().exponent <= 2 and len(str(int(amount))) <= LONG_NUMBER_DIGITS
    if not whole and cents and currency_unit(code, 1, rules) != code:  # "five euro, fifty cents"
        return num2words_lang(rules, amount, to="currency", currency=code)
    unit = currency_unit(code, int(amount) if whole else 2, rules)
    return f"{say_number(amount, rules)} {unit}"  # "one point one two three euros"


def currency_unit(code: str, count: int, rules: LanguageRules) -> str:
    """The currency's name for `count` of it ("dollars"), or its code where num2words has none."""
    from num2words import CONVERTER_CLASSES

    converter = CONVERTER_CLASSES[rules.code]
    forms = getattr(converter, "CURRENCY_FORMS", {}).get(code)
    return code if forms is None else converter.pluralize(count, forms[0])


def say_day(day: int, rules: LanguageRules) -> str:
    """The day of a date: an ordinal where the language says one (always for the 1st)."""
    if rules.day_ordinal or (day == 1 and rules.first_ordinal):
        word = num2words_lang(rules, day, to="ordinal")
        return word + "n" if rules.code == "de" else word  # "am dritten Mai"
    return num2words_lang(rules, day)


def say_year(year: int, rules: LanguageRules) -> str:
    return num2words_lang(rules, year, to="year")


def say_matched_number(m: re.Match, rules: LanguageRules) -> str:
    """A matched number with its sign ("neg", "num"); a list of numbers part by part."""
    value = parse_number(m["num"], rules)
    if value is None:
        return ("-" if m["neg"] else "") + say_parts(m["num"], rules)
    return say_number(-value if m["neg"] else value, rules)


def say_matched_money(m: re.Match, rules: LanguageRules) -> str:
    """A matched amount ("num", "num2" or "num3") with its symbol or code."""
    text = m["num"] or m["num2"] or m["num3"]
    amount = parse_number(text, rules)
    code = CURRENCY_SYMBOLS.get(m["pre"] or m["post"] or "", m["code"])
    if amount is None:
        return f"{say_parts(text, rules)} {currency_unit(code, 2, rules)}"
    return say_money(amount, code, rules)


def say_degrees(m: re.Match, rules: LanguageRules) -> str:
    """A matched temperature ("num", "unit")."""
    unit = {"C": " Celsius", "F": " Fahrenheit"}.get(m["unit"] or "", "")
    return f"{say_matched_number(m, rules)} {rules.degrees}{unit}"


def say_date(m: re.Match, rules: LanguageRules) -> str:
    """A matched day and month (and year); an impossible day is left as it was."""
    day = int(m["day"])
    if not 1 <= day <= 31:
        return m[0]
    month = m["month"].lower()
    month = month.capitalize() if rules.code in ("en", "de") else month
    if rules.code == "en" and m.groupdict().get("month_first"):
        spoken = f"{month} {say_day(day, rules)}"  # "May 3" -> "May third"
    else:
        spoken = rules.date.format(day=say_day(day, rules), month=month)
    if m["year"]:
        spoken += f"{',' if ',' in m[0] else ''} {say_year(int(m['year']), rules)}"
    return spoken


def say_clock(m: re.Match, rules: LanguageRules) -> str:
    """A matched time of day ("h", "m")."""
    hour, minute = num2words_lang(rules, int(m["h"])), int(m["m"])
    if minute == 0:
        return rules.full_hour.format(hour=hour)
    spoken = num2words_lang(rules, minute)
    if rules.code == "en" and minute < 10:
        spoken = "oh " + spoken  # "10:05" -> "ten oh five"
    return rules.time.format(hour=hour, minute=spoken)


def expand_numbers(text: str, rules: LanguageRules) -> str:
    """Money, percentages, temperatures, dates, times, ordinals, years, then plain numbers."""
    months = rules.months.replace(" ", "|")
    symbols = "".join(re.escape(c) for c in CURRENCY_SYMBOLS)
    signed = rf"(?P<neg>(?<![\w.,])-)?(?P<num>{NUMBER})"
    ordinal = rf"(?:{rules.ordinal_suffix})"
    year = r"(?:,?\s+(?P<year>\d{4}))?"

    def with_rules(say):  # re.sub calls say(match); the language rides along
        return functools.partial(say, rules=rules)

    number, date = with_rules(say_matched_number), with_rules(say_date)
    steps = [
        (rf"(?P<pre>[{symbols}])\s?(?P<num>{NUMBER})|(?P<num2>{NUMBER})\s?(?P<post>[{symbols}])"
         rf"|(?P<num3>{NUMBER})\s(?P<code>USD|EUR|GBP)\b", with_rules(say_matched_money)),
        (rf"{signed}\s?%", lambda m: f"{number(m)} {rules.percent}"),
        (rf"{signed}\s?°\s?(?P<unit>[CF]\b)?", with_rules(say_degrees)),
        (rf"\b(?P<day>\d{{1,2}}){ordinal}?\.?\s+(?:de\s+)?(?P<month>{months})\b{year}", date),
        (rf"\b(?P<month_first>(?P<month>{months}))\s+(?P<day>\d{{1,2}}){ordinal}?\b{year}", date),
        (r"\b(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)\b(?:\s*(?:Uhr|uur|heures?|h)\b)?",
         with_rules(say_clock)),
        (rf"\b(?P<n>\d+){ordinal}\b", lambda m: num2words_lang(rules, int(m["n"]), to="ordinal")),
        (r"(?<![\w.,-])(?P<y>1[1-9]\d\d|20\d\d)(?![\w.,]\d)", lambda m: say_year(int(m[1]), rules)),
        (rf"{signed}(?!\w)", number),
    ]  # fmt: skip
    for pattern, spell in steps:
        text = re.sub(pattern, spell, text, flags=re.IGNORECASE)
    return text


# Markup that apps send: SSML (<speak>, <break time="500ms"/>) and "[pause:1.5]". Pauses become
# silence; every other tag is dropped and its text kept. Patterns are bounded, so linear-time.
PAUSE = re.compile(
    r"<break\b([^<>]{0,200})>|\[pause:[ \t]{0,8}(\d{1,3}(?:\.\d{1,3})?)[ \t]{0,8}\]", re.I
)
TAG = re.compile(r"</?[A-Za-z][\w:.-]{0,40}(?:\s[^<>]{0,500})?/?>")
BREAK_TIME = re.compile(
    r"time\s{0,8}=\s{0,8}[\"']?\s{0,8}(\d{1,6}(?:\.\d{1,3})?)\s{0,8}(ms|s)?", re.I
)
BREAK_STRENGTHS = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.5, "strong": 0.75,
                   "x-strong": 1.0}  # fmt: skip
MAX_PAUSE_SECONDS = 10.0  # one pause
MAX_SCRIPT_PAUSE_SECONDS = 60.0  # all pauses of one request together
SPOKEN_CHARS_PER_INPUT_CHAR = 8  # normalization may lengthen text ("1999"), but boundedly
WORDLESS_SILENCE_SECONDS = 0.25  # the answer to input with nothing to speak ("...", emoji)


def pause_seconds(m: re.Match) -> float:
    """The length of one <break> or [pause:N], capped at MAX_PAUSE_SECONDS."""
    if m[2] is not None:
        seconds = float(m[2])
    elif time := BREAK_TIME.search(m[1]):
        seconds = float(time[1]) / (1000.0 if (time[2] or "ms").lower() == "ms" else 1.0)
    else:
        strength = re.search(r"strength\s{0,8}=\s{0,8}[\"']?([a-z-]{1,10})", m[1], re.I)
        seconds = BREAK_STRENGTHS.get(strength[1].lower(), 0.5) if strength else 0.5
    return min(seconds, MAX_PAUSE_SECONDS)


def speech_script(text: str, language: str = "english", normalize: bool = True) -> list:
    """What to say: pieces of text (str) and pauses (float seconds), in order.

    With `normalize`, markup is read (pauses kept, other tags dropped) and each piece of text is
    normalized. Pieces with no words are left out; input with nothing to speak at all becomes a
    short silence, as OpenAI answers it.
    """
    if not normalize:
        script: list = [text]
    else:
        script, start, paused = [], 0, 0.0
        for m in PAUSE.finditer(text):
            script.append(text[start : m.start()])
            seconds = min(pause_seconds(m), MAX_SCRIPT_PAUSE_SECONDS - paused)
            if seconds > 0:
                script.append(seconds)
                paused += seconds
            start = m.end()
        script.append(text[start:])
        script = [p if isinstance(p, float) else normalize_text(strip_tags(p), language)
                  for p in script]  # fmt: skip
    script = [p for p in script if isinstance(p, float) or re.search(r"\w", p)]
    return script or [WORDLESS_SILENCE_SECONDS]


def strip_tags(text: str) -> str:
    """Drop markup tags, keeping their text ("<s>Hi</s>." -> "Hi.")."""
    return re.sub(r"(?<! ) +(?=[.,!?;:])", "", TAG.sub(" ", text))  # one try per run: linear


def script_text(script: list) -> str:
    """The spoken text of a script, for token counts."""
    return " ".join(p for p in script if isinstance(p, str))


def has_words(script: list) -> bool:
    """Whether a script needs the model: silence alone needs no voice and no place."""
    return any(isinstance(part, str) for part in script)


def normalize_text(text: str, language: str = "english") -> str:
    """Turn raw client text into plain prose the model reads well, in the model's language."""
    rules = LANGUAGES.get(language, LANGUAGES["english"])
    # Digit groups split by spaces ("1 234", and NBSP anywhere) become one number.
    space = r"[\u00a0\u202f\u2009 ]" if rules.decimal_comma else r"[\u00a0\u202f\u2009]"
    text = re.sub(
        rf"(?<![\d,.])\d{{1,3}}(?:{space}\d{{3}})+(?![\d,.]\d)",
        lambda m: re.sub(r"\D", "", m[0]),
        text,
    )
    text = unicodedata.normalize("NFKC", text).translate(UNICODE_PUNCTUATION)
    for pattern, replacement in MARKDOWN:
        text = pattern.sub(replacement, text)
    text = EMOJI.sub(" ", text)
    text = expand_numbers(text, rules)
    text = re.sub(r"\s*&\s*", f" {rules.and_word} ", text)
    return re.sub(r"\s+", " ", text).strip()


# =================================================================================================
# Voices
# =================================================================================================

# OpenAI voice names -> pocket-tts built-in voices of a similar character (--voice_map changes it).
# Clients hard-code these names, so they always resolve: to the default voice where the target is
# missing (a model without built-in voices, a deleted custom voice).
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
RESOLUTION_ORDER = ("openai", "builtin", "custom", "path")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".webm", ".mp4")
STATE_EXTENSION = ".safetensors"  # a voice state exported by `pocket-tts export-voice`
MAX_REFERENCE_SECONDS = 30.0  # pocket-tts's own truncation length for voice prompts
MIN_REFERENCE_SECONDS = 0.5
MAX_REFERENCE_BYTES = 50 * 1024 * 1024
# Wall time a reference may take to decode: a normal 30 s recording takes well under a second; a
# container of a million one-sample packets would take minutes.
MAX_DECODE_SECONDS = 10.0
UPLOADS_MANIFEST = ".uploads.json"  # the voices-dir files that came from uploads, by name
UPLOADS_LOCK = ".uploads.lock"  # held while a process changes the manifest
# A kill -9 in the middle of a write leaves no partial voice or cache entry: every file is written
# under a temporary name (`temp_file`) and renamed. What it leaves is removed at the next start
# (`remove_leftovers`): our own when its process is gone, any other when older than this, since
# a writer in another container or on another host has pids that are not ours to check.
LEFTOVER_SECONDS = 3600.0
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.()-]{0,63}")


@functools.cache
def writer_id() -> str:
    """This host and PID namespace, in 8 hex digits: pids are only comparable within one."""
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")
        return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


TEMP_NAME = re.compile(r"\.(?:upload|latent|manifest)-([0-9a-f]{8})-(\d+)-\d+.*")


def temp_file(folder: Path, kind: str, suffix: str = "") -> Path:
    """A temporary file in `folder` for an atomic write by this thread:
    `.{kind}-{writer_id}-{pid}-{thread}{suffix}` (kind: upload, latent or manifest)."""
    return folder / f".{kind}-{writer_id()}-{os.getpid()}-{threading.get_ident()}{suffix}"


@contextlib.contextmanager
def folder_lock(folder: Path, name: str):
    """An exclusive lock on `folder/name` held by this process for the block: processes sharing
    the folder on one host (containers with one volume too) take turns. Where the folder cannot
    hold the lock file (read-only), the block runs unlocked, and its own write fails anyway."""
    try:
        import fcntl

        handle = open(folder / name, "a")  # noqa: SIM115 - closed below, after the unlock
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def remove_leftovers(folder: Path):
    """Delete what interrupted writes left in `folder`: temporary files of ours whose process
    died, and any temporary file (safetensors' own `.tmp*` too) older than LEFTOVER_SECONDS."""
    me, now = writer_id(), time.time()
    with contextlib.suppress(OSError):
        for path in folder.glob(".*"):
            ours = TEMP_NAME.fullmatch(path.name)
            if not ours and not path.name.startswith(".tmp"):
                continue
            with contextlib.suppress(OSError):
                dead = ours and ours[1] == me and not pid_alive(int(ours[2]))
                if dead or now - path.stat().st_mtime > LEFTOVER_SECONDS:
                    path.unlink()
                    logger.info("removed %s, left by an interrupted write", path)


class VoiceError(ValueError):
    """A voice that cannot be used; the message is safe to show the client."""


class VoiceNotFound(VoiceError):
    """No voice has that name."""


def voice_error_code(exc: VoiceError) -> str:
    """The error code every protocol gives a voice that cannot be used."""
    return "voice_not_found" if isinstance(exc, VoiceNotFound) else "invalid_value"


@dataclass(frozen=True)
class VoiceSource:
    """What a voice name resolved to: a built-in, a reference recording, a state file or a URL."""

    kind: str  # "builtin" | "file" (audio or .safetensors) | "url"
    ref: str  # built-in name, absolute file path, or URL
    name: str  # what clients see: never a server path

    @property
    def is_state_file(self) -> bool:
        return self.kind == "file" and self.ref.lower().endswith(STATE_EXTENSION)


def check_voice_path(path: Path, folder: Path | None = None) -> Path:
    """Accept only a regular audio (or voice state) file of sane size, after resolving links.

    A path inside `folder` (the voices folder) must still be inside it once resolved. Every
    refusal reads the same, so a client cannot probe what exists on the server.
    """
    allowed = (*AUDIO_EXTENSIONS, STATE_EXTENSION)
    refused = VoiceError(
        f"voice {path.name!r} is not an allowed audio file ({', '.join(allowed)}, at most "
        f"{MAX_REFERENCE_BYTES // 2**20} MiB)."
    )
    try:
        resolved = path.resolve(strict=True)
        regular = resolved.is_file() and 0 < resolved.stat().st_size <= MAX_REFERENCE_BYTES
        if folder is not None and path.absolute().is_relative_to(folder.absolute()):
            regular = regular and resolved.is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):  # missing, a link loop, a NUL byte, bad Unicode
        raise refused from None
    if not regular or not {path.suffix.lower(), resolved.suffix.lower()} <= set(allowed):
        raise refused
    return resolved


AV_LENIENT_METADATA = (
    {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}
)


def open_audio(source) -> av.container.InputContainer:
    """av.open for reading, whatever bytes its tags hold: PyAV 19 decodes them leniently and has
    no option for it; older versions raise on invalid UTF-8 unless told to ignore it."""
    return av.open(source, **AV_LENIENT_METADATA)


def decode_reference(data: bytes, sample_rate: int, max_seconds: float = MAX_REFERENCE_SECONDS):
    """Decode any audio PyAV reads to float32 mono at `sample_rate`, at most `max_seconds`."""
    limit = int(max_seconds * sample_rate)
    pieces: list[np.ndarray] = []
    decoded, deadline = 0, time.monotonic() + MAX_DECODE_SECONDS  # linear work, bounded time
    try:
        with open_audio(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise VoiceError("the voice file has no audio stream.")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
                    decoded += pieces[-1].size
                if decoded >= limit:
                    break
                if time.monotonic() > deadline:
                    raise VoiceError("the voice file takes too long to decode: re-encode it.")
            else:
                pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except (av.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as exc:
        if isinstance(exc, VoiceError):
            raise
        raise VoiceError("the voice file could not be decoded as audio.") from None
    audio = np.concatenate(pieces)[:limit] if pieces else np.zeros(0, np.float32)
    if audio.size < MIN_REFERENCE_SECONDS * sample_rate:
        raise VoiceError(f"the voice recording is shorter than {MIN_REFERENCE_SECONDS} s.")
    peak = float(np.abs(audio).max())
    if not math.isfinite(peak) or peak < 1e-4:
        raise VoiceError("the voice recording is silent or corrupt.")
    if peak > 1.0:  # a float file may hold any range: bring it back to full scale
        audio = audio / peak
    return audio.astype(np.float32, copy=False)


def audio_seconds(path: Path) -> float | None:
    """Duration of an audio file from its container, without decoding it."""
    try:
        with open_audio(str(path)) as container:
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return round(float(stream.duration * stream.time_base), 3)
            return round(container.duration / 1e6, 3) if container.duration else None
    except (av.FFmpegError, IndexError):
        return None


def is_public_address(ip: str) -> bool:
    """Whether an address is on the public internet (not loopback, private, link-local...)."""
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class RemoteVoices:
    """Downloads remote references for --allow_remote_voices, and only what is safe to.

    Each host is resolved once and the connection goes to that address, which must be public
    (every spelling of loopback resolves to loopback, and is refused); redirects are refused;
    one deadline covers the whole download, which is capped in size. Downloads are remembered
    by URL with their validators (ETag, Last-Modified): an unchanged file is not fetched again.
    Every failure reads the same, so the server cannot be used to scan a network.
    """

    def __init__(self, deadline: float = 15.0, max_bytes: int = MAX_REFERENCE_BYTES):
        self.deadline, self.max_bytes = deadline, max_bytes
        # url -> (the validators to send next time, the sha256 of the content)
        self.known: OrderedDict[str, tuple[dict[str, str], str]] = OrderedDict()
        self.lock = threading.Lock()

    def fetch(self, url: str, fresh: bool = False) -> tuple[str, bytes | None]:
        """(sha256 of the content, its bytes); bytes are None when the known copy is unchanged."""
        with self.lock:
            validators, key = self.known.get(url, ({}, ""))
        try:
            status, headers, data = self._get(url, {} if fresh else validators)
        except (OSError, ValueError, http.client.HTTPException):
            status = 0
        if status == 304 and key:
            return key, None
        if status != 200:
            raise VoiceError("the voice URL could not be used (only public http(s) audio files).")
        key = hashlib.sha256(data).hexdigest()
        validators = {"If-None-Match": headers.get("ETag"),
                      "If-Modified-Since": headers.get("Last-Modified")}  # fmt: skip
        kept = {name: value for name, value in validators.items() if value}
        with self.lock:
            self.known[url] = (kept, key)
            while len(self.known) > 256:
                self.known.popitem(last=False)
        return key, data

    def _get(self, url: str, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ip = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)[0][4][0]
        if not is_public_address(ip):
            raise ValueError(ip)
        end = time.monotonic() + self.deadline
        kind = PinnedHTTPSConnection if parts.scheme == "https" else PinnedHTTPConnection
        conn = kind(parts.hostname, port, ip, timeout=self.deadline)
        try:
            path = parts.path or "/"
            conn.request("GET", f"{path}?{parts.query}" if parts.query else path,
                         headers={"User-Agent": SERVER_NAME, **headers})  # fmt: skip
            sock = conn.sock  # the response reads from it after the connection lets go of it
            response = conn.getresponse()
            data = bytearray()
            while response.status == 200:
                left = end - time.monotonic()
                if left <= 0 or len(data) > self.max_bytes:
                    raise ValueError("too slow or too large")
                sock.settimeout(left)
                piece = response.read1(65536)
                if not piece:
                    break
                data += piece
            return response.status, response.headers, bytes(data)
        finally:
            conn.close()


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address resolved (and checked) beforehand."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self):
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address resolved beforehand, verifying the certificate for the host name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self):
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def load_voice_map(path: str | None) -> dict[str, str]:
    """The OpenAI-name mapping: the built-in one, updated by a --voice_map JSON file."""
    mapping = dict(OPENAI_VOICE_MAP)
    if path:
        try:
            custom = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise VoiceError(f"--voice_map {path!r} is not a readable JSON file: {exc}") from None
        if not isinstance(custom, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in custom.items()
        ):
            raise VoiceError(f"--voice_map {path!r} must be a JSON object of name -> voice.")
        mapping.update({k.lower(): v for k, v in custom.items()})
    return mapping


class VoiceCatalog:
    """Resolves a request's `voice` to a VoiceSource and lists every voice a client can use.

    Order: OpenAI names (through the voice map) -> built-in names -> voices-dir entries (by
    stem or file name) -> absolute path to an audio file -> URL (only if allowed). The voices
    folder is read on each lookup, so files added or removed while running appear at once.
    """

    def __init__(
        self,
        builtins: list[str],
        voices_dir: Path,
        default_voice: str | None = None,
        language: str = "english",
        voice_map: dict[str, str] | None = None,
        allow_remote: bool = False,
    ):
        self.builtins = builtins
        self.voices_dir = voices_dir
        self.voice_map = dict(OPENAI_VOICE_MAP if voice_map is None else voice_map)
        self.allow_remote = allow_remote
        self.default: VoiceSource | None = None  # resolving it looks voices up: none yet
        self.default = self.resolve_default(default_voice, language)

    def resolve_default(self, name: str | None, language: str) -> VoiceSource:
        """The server's default voice: the flag, else pocket-tts's default for the language."""
        from pocket_tts.default_parameters import get_default_voice_for_language

        if name:
            name = name.strip()
            relative = Path(name).expanduser()
            if self.kind_of(name) is None and not relative.is_absolute() and relative.is_file():
                name = str(relative.resolve())  # the operator's path, from the working directory
            return self.lookup(name)
        builtin = get_default_voice_for_language(language)
        if builtin in self.builtins:
            return VoiceSource("builtin", builtin, builtin)
        raise VoiceError(
            "this model has no built-in voices: pass --default_voice /path/to/reference.wav"
        )

    def resolve(self, name: str | None, files: dict[str, Path] | None = None) -> VoiceSource:
        """The voice a request asked for; OpenAI names never fail.

        `files` is a voices-dir listing already read (custom_files), to list it once per call.
        """
        if not name or not name.strip():
            return self.default
        key = name.strip()
        if key.lower() in self.voice_map:
            try:
                return self.lookup(self.voice_map[key.lower()], allow_paths=False, files=files)
            except VoiceError:
                return self.default
        return self.lookup(key, files=files)

    def lookup(self, key: str, allow_paths: bool = True, files=None) -> VoiceSource:
        """A built-in, voices-dir entry, audio path or URL; else a VoiceError naming the choices."""
        if key.lower() in self.builtins:
            return VoiceSource("builtin", key.lower(), key.lower())
        custom = self.custom_voice(key, files)
        if custom is not None:
            path = check_voice_path(custom, self.voices_dir)
            return VoiceSource("file", str(path), custom.stem)
        if allow_paths and key.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise VoiceError(
                    "remote voice URLs are disabled on this server (--allow_remote_voices)."
                )
            return VoiceSource("url", key, key.rsplit("/", 1)[-1] or key)
        if allow_paths and Path(key).is_absolute():
            path = check_voice_path(Path(key), self.voices_dir)
            return VoiceSource("file", str(path), path.stem)
        if self.default is not None and key.lower() == self.default.name.lower():
            return self.default  # a default given as a path, by the name it is listed under
        raise VoiceNotFound(
            f"Voice {key!r} is not available. Available voices: {', '.join(self.names())}; "
            "or an absolute path to an audio file on the server."
        )

    def custom_files(self) -> dict[str, Path]:
        """Voices-dir entries by stem (first file name wins when two share a stem)."""
        allowed = (*AUDIO_EXTENSIONS, STATE_EXTENSION)
        found: dict[str, Path] = {}
        with contextlib.suppress(OSError):
            for path in sorted(self.voices_dir.iterdir()):
                if path.suffix.lower() in allowed and not path.name.startswith("."):
                    found.setdefault(path.stem, path)
        return found

    def custom_voice(self, key: str, files: dict[str, Path] | None = None) -> Path | None:
        """A voices-dir entry named by stem or file name, exactly or ignoring case."""
        files = self.custom_files() if files is None else files
        by_name = {**files, **{p.name: p for p in files.values()}}
        if key in by_name:
            return by_name[key]
        folded = {k.lower(): p for k, p in by_name.items()}
        return folded.get(key.lower())

    def names(self) -> list[str]:
        """Every voice name a client can use, in resolution order."""
        builtins = [b for b in self.builtins if b not in self.voice_map]
        return [*self.voice_map, *builtins, *self.custom_files()]

    def describe(self) -> list[dict[str, Any]]:
        """One entry per voice, for /v1/voices (built-ins only when the model has them)."""
        files = self.custom_files()
        entries = [
            {"id": name, "kind": "openai", "maps_to": self.resolve(name, files).name}
            for name in self.voice_map
        ]
        entries += [{"id": b, "kind": "builtin"} for b in self.builtins]
        uploaded = self.uploaded()
        entries += [{"id": stem, "kind": "custom", "file": p.name,
                     "origin": "upload" if p.name in uploaded else "folder"}
                    for stem, p in files.items()]  # fmt: skip
        for entry in entries:
            entry.update(object="voice", name=entry["id"], default=entry["id"] == self.default.name)
        return entries

    def uploaded(self) -> set[str]:
        """Names of the voices-dir files that came from uploads (the rest were put there)."""
        try:
            names = json.loads((self.voices_dir / UPLOADS_MANIFEST).read_text())
        except (OSError, ValueError):
            return set()
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    def mark_uploaded(self, file_name: str, uploaded: bool):
        """Record that a voices-dir file came from an upload, or forget it (one process at a
        time: under the lock that every process sharing the folder takes)."""
        with folder_lock(self.voices_dir, UPLOADS_LOCK):
            self._write_manifest(file_name, uploaded)

    def claim(self, upload: Path, file_name: str, name: str) -> bool:
        """Move an upload in as `file_name` unless a voice `name` exists, on any process or host
        sharing the folder: the check and the move are one step under the folder's lock, and the
        move never replaces a file (a hard link: it fails if the name exists). True if ours."""
        with folder_lock(self.voices_dir, UPLOADS_LOCK):
            if self.kind_of(name) is not None:
                return False
            target = self.voices_dir / file_name
            try:
                os.link(upload, target)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: the lock still orders us
                os.replace(upload, target)
            self._write_manifest(file_name, True)
        return True

    def _write_manifest(self, file_name: str, uploaded: bool):
        """Read, change and atomically rewrite the manifest (the caller holds the lock)."""
        tmp = temp_file(self.voices_dir, "manifest", ".json")
        try:
            names = self.uploaded()
            names = names | {file_name} if uploaded else names - {file_name}
            tmp.write_text(json.dumps(sorted(names)))
            os.replace(tmp, self.voices_dir / UPLOADS_MANIFEST)
        except OSError as exc:
            logger.warning("could not record uploaded voices in %s: %s", UPLOADS_MANIFEST, exc)
            tmp.unlink(missing_ok=True)

    def kind_of(self, name: str) -> str | None:
        """Which kind a client-visible name is, if any (for clashes and deletes)."""
        if name.lower() in self.voice_map:
            return "openai"
        if name.lower() in self.builtins:
            return "builtin"
        return "custom" if self.custom_voice(name) is not None else None


class LatentCache:
    """Conditioned voice states by content hash: a bounded in-memory LRU over safetensors files.

    The disk folder is namespaced by a fingerprint of the model, since a state only fits the
    weights that computed it. A file that fails to load is deleted and recomputed, never fatal.
    """

    def __init__(self, folder: Path | None, capacity: int = 32):
        self.folder = folder
        self.capacity = capacity
        self.memory: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.failing = False  # the last write failed (read-only, full): it is still tried

    def path(self, key: str) -> Path | None:
        return self.folder / f"{key}{STATE_EXTENSION}" if self.folder else None

    def get(self, key: str):
        with self.lock:
            if key in self.memory:
                self.memory.move_to_end(key)
                return self.memory[key]
        return None

    def put(self, key: str, state, persist: bool = True):
        with self.lock:
            self.memory[key] = state
            self.memory.move_to_end(key)
            while len(self.memory) > self.capacity:
                self.memory.popitem(last=False)
        path = self.path(key)
        if persist and path is not None and not path.exists():
            from pocket_tts.models.model_state import export_model_state

            tmp = temp_file(path.parent, "latent")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                export_model_state(state, tmp)
                os.replace(tmp, path)
            except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError: read-only or full
                if not self.failing:  # once per run of failures: a full disk must not flood logs
                    logger.warning("cannot write the voice cache in %s (%s): this voice state "
                                   "stays in memory only", self.folder, exc)  # fmt: skip
                self.failing = True
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
            else:
                self.failing = False

    def forget(self, key: str):
        with self.lock:
            self.memory.pop(key, None)
        path = self.path(key)
        if path is not None:
            with contextlib.suppress(OSError):  # a read-only cache: the entry just stays
                path.unlink(missing_ok=True)

    def status(self, key: str) -> dict[str, bool]:
        path = self.path(key)
        return {"memory": key in self.memory, "disk": bool(path and path.exists())}


def model_fingerprint(model, extra: str = "") -> str:
    """A short hash of the model's weights (a sample of each tensor), to namespace cached states."""
    digest = hashlib.sha256(f"{type(model).__name__}|{extra}".encode())
    named_parameters = getattr(model, "named_parameters", None)
    for name, param in named_parameters() if callable(named_parameters) else ():
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(param.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class Busy(Exception):
    """No place for this request: the queue is full (429) or the wait timed out (503)."""

    def __init__(self, status: int, message: str, retry_after: int):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class ClientGone(Exception):
    """The client hung up while its request waited or was being served."""


ENCODING_QUEUE = 8  # voice encodings that may wait for the one running; more are told to retry


class VoiceStates:
    """Voice states (the model conditioned on a voice prompt), by voice: encoded once per distinct
    recording, ever (memory LRU, then the disk cache keyed by the recording's SHA-256).

    Encoding runs on the asking request's thread, one at a time: it reads the model's weights
    only, so the batch keeps stepping meanwhile.
    """

    def __init__(self, model, cache: LatentCache, max_reference_seconds: float,
                 metrics: Metrics | None = None):  # fmt: skip
        self.model, self.cache, self.metrics = model, cache, metrics or Metrics()
        self.sample_rate: int = model.sample_rate
        self.has_voice_cloning: bool = getattr(model, "has_voice_cloning", True)
        self.max_reference_seconds = max_reference_seconds
        self.remote = RemoteVoices()
        self._encoding = threading.Lock()  # one encoding at a time: it takes the cores it finds
        self._waiting = threading.BoundedSemaphore(ENCODING_QUEUE)  # it and those queued
        self._hashes: OrderedDict[tuple, str] = OrderedDict()  # (path, mtime, size) -> sha256

    def get(self, source: VoiceSource):
        """The conditioned model state of a voice: encoded once per distinct recording, ever."""
        if source.kind == "builtin":
            key = f"builtin-{source.ref}"
            state = self.cache.get(key)
            self.metrics.voice_cache.labels("memory" if state is not None else "encoded").inc()
            if state is None:
                with self._encoder():
                    state = self.model.get_state_for_audio_prompt(source.ref)
                self.cache.put(key, state, persist=False)  # pocket-tts caches its own download
            return state
        data = None
        if source.kind == "url":
            key, data = self.remote.fetch(source.ref)
        else:
            try:
                key = self.content_key(source)
            except OSError:  # removed or replaced since it was resolved
                raise VoiceError(f"voice {source.name!r} is no longer available.") from None
        state, where = self.cache.get(key), "memory"
        if state is None:
            state, where = self._load_cached(key), "disk"
        self.metrics.voice_cache.labels(where if state is not None else "encoded").inc()
        if state is None:
            if source.kind == "url" and data is None:  # known unchanged, but its state was evicted
                key, data = self.remote.fetch(source.ref, fresh=True)
            state = self._encode_voice(source, data)
            self.cache.put(key, state, persist=not source.is_state_file)
        return state

    def content_key(self, source: VoiceSource, data: bytes | None = None) -> str:
        """SHA-256 of the recording's bytes (memoized by path, mtime and size)."""
        if data is not None:
            return hashlib.sha256(data).hexdigest()
        st = os.stat(source.ref)
        stamp = (source.ref, st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp not in self._hashes:
            with open(source.ref, "rb") as f:
                self._hashes[stamp] = hashlib.file_digest(f, "sha256").hexdigest()
            while len(self._hashes) > 1024:
                self._hashes.popitem(last=False)
        return self._hashes[stamp]

    def _load_cached(self, key: str):
        """A state persisted by an earlier run; a corrupt file is discarded."""
        path = self.cache.path(key)
        if path is None or not path.is_file():
            return None
        try:
            state = self.model.get_state_for_audio_prompt(path)
        except Exception:  # noqa: BLE001 - any unreadable cache file is rebuilt
            logger.warning("discarding unreadable voice cache file %s", path)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        self.cache.put(key, state, persist=False)
        return state

    def _encode_voice(self, source: VoiceSource, data: bytes | None):
        import torch

        if source.is_state_file:
            try:
                return self.model.get_state_for_audio_prompt(Path(source.ref))
            except Exception:  # noqa: BLE001 - a bad file is the client's or operator's
                raise VoiceError(f"voice {source.name!r} is not a valid voice state.") from None
        if not self.has_voice_cloning:
            raise VoiceError(
                "this server's model was loaded without the voice-cloning weights, so only "
                "built-in voices can be used (accept the model's terms on the Hugging Face Hub "
                "and log in to get them)."
            )
        if data is None:
            data = Path(source.ref).read_bytes()
        audio = decode_reference(data, self.sample_rate, self.max_reference_seconds)
        with self._encoder():  # on the request's thread: the batch keeps stepping meanwhile
            return self.model.get_state_for_audio_prompt(torch.from_numpy(audio)[None, :])

    @contextlib.contextmanager
    def _encoder(self):
        """The encoder, in turn: at most ENCODING_QUEUE requests encode or wait (each holds a
        server thread); the rest are Busy at once, so uploads never starve /health."""
        if not self._waiting.acquire(blocking=False):
            raise Busy(429, "Too many voices are being encoded at once. Retry later.", 2)
        try:
            with self._encoding:
                yield
        finally:
            self._waiting.release()


# =================================================================================================
# Synthesis
# =================================================================================================

FADE_IN_SECONDS = 0.005  # sentence starts: a fresh decoder state may begin off zero
FADE_OUT_SECONDS = 0.010  # sentence ends: generation stops wherever the waveform happens to be
# With a single batch size measured, each stream more is guessed to cost half a lone stream's
# share (a matrix product is cheaper per row as rows are added). Start-up calibration measures
# sizes 1, 2, 4, ... so the guess is rarely needed.
MARGINAL_STREAM_COST = 0.5
# Prefills computed in one pass at most, by device. A CPU pass is compute-bound (four cost about
# three times one); a GPU pass costs about the same for 1 or 32 rows.
PREFILL_BATCH = {"cpu": 4, "cuda": 32}
# An idle batch waits this long at most for admitted requests that have yet to submit their
# sentence: requests that arrive together are prefilled together, not one pass after another.
PREFILL_GATHER_SECONDS = 0.05
# Admission's load factor (measured tick / calibrated tick) moves this far towards each tick's
# ratio (about 50 ticks, 4 s of audio, to settle), each ratio clipped to [1/MAX_LOAD, MAX_LOAD]:
# one slow tick (a prefill pass, a busy moment) moves it by 2 % at most of its excess.
LOAD_SMOOTHING = 0.02
MAX_LOAD = 4.0
HYSTERESIS = 0.05  # one more stream is admitted only when it fits with 5 % to spare
MAX_PREFILL_THREADS = 8  # a prefill (a few hundred tokens at most) gains little beyond this
# Queries per stream up to which GPU attention is two plain matrix products (a FlowLM step has
# 1, Mimi's 16). The fused kernels tile 64 queries: on an H100 at 128 streams they took 5.6 ms
# of a step for 8 layers of 1 or 16 queries each. (On a CPU the fused kernel is the faster.)
STEP_QUERIES = 16
MAX_DECODER_FRAMES_PER_CALL = 4  # Mimi decodes at most 320 ms per call: bounded memory and work


# -- the machine ---------------------------------------------------------------------------------


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by a container's CPU quota (cgroup v2 or
    v1), since threads beyond the quota only wait for it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for quota_file, period_file in (("cpu.max", None),
                                    ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):  # fmt: skip
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (cgroup / quota_file).read_text().split()
            period = fields[1] if period_file is None else (cgroup / period_file).read_text()
            if fields[0] not in ("max", "-1"):
                return max(1, min(cores or 1, int(fields[0]) // int(period)))
    return cores or 1


def free_memory(device: str) -> int | None:
    """Free bytes on the device (CUDA), or available RAM (Linux); None where unknown."""
    with contextlib.suppress(Exception):
        if device.startswith("cuda"):
            import torch

            return torch.cuda.mem_get_info(torch.device(device))[0]
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


# -- records ------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """A piece of text made ready for the model: its tokens and pocket-tts's length limits."""

    text: str
    tokens: Any  # what the model's prefill reads (pocket-tts: token ids [1, T])
    max_frames: int  # pocket-tts's cap on the frames generated for these tokens
    frames_after_eos: int  # frames still spoken once the model signals the end


@dataclass
class Prefix:
    """What a prefill pass computed for one row: its KV prefix and its first latent."""

    caches: Any  # FlowLM keys and values by layer, [2, P, H, D] each
    length: int  # P: the voice prompt, the text and the first step
    latent: Any  # the first step's latent [1, 1, ldim]
    eos: bool  # whether that step signalled the end


class GenerationFailed(RuntimeError):
    """The model failed on a request's row (the cause is logged, and chained)."""


@dataclass(eq=False)
class Sentence:
    """One chunk of text to speak: a row of the batch, from its prefill to its last frame.

    The request's thread creates it and reads `audio`; the scheduler thread owns everything
    else. `audio` receives float32 arrays, then None at the end, or an exception instead.
    """

    chunk: Chunk
    voice_state: Any
    generator: Any  # torch.Generator: this stream's own sampling noise
    stop: threading.Event  # the request's: set when its client hangs up
    audio: queue.Queue = field(default_factory=queue.Queue)
    abandoned: bool = False  # its reader went away without setting `stop`
    step: int = 0
    eos_step: int | None = None
    latent: Any = None  # its newest latent: audio to decode, and the next step's input
    finished: bool = False

    @property
    def stopped(self) -> bool:
        return self.abandoned or self.stop.is_set()

    def advance(self, latent, eos: bool, min_frames_before_eos: int) -> bool:
        """pocket-tts's stopping rule for this row's next latent: whether it is audio to decode."""
        step, self.step = self.step, self.step + 1
        if eos and self.eos_step is None and step >= min_frames_before_eos:
            self.eos_step = step
        if self.eos_step is not None and step >= self.eos_step + self.chunk.frames_after_eos:
            self.finished = True
            return False
        self.latent = latent
        self.finished = self.step >= self.chunk.max_frames
        return True

    def fail(self, exc: Exception):
        self.finished = True
        self.audio.put(exc)


# -- pocket-tts internals ---------------------------------------------------------------------
# pocket-tts has no batch API: its attention keeps one write offset per batch, so streams that
# started at different times cannot share a step through it. The functions below run the same
# layers with a KV region per stream (its own positions, exactly as if it ran alone) and one
# batched matrix product per layer for all streams. They are every place this file relies on
# pocket-tts's internals (pinned: pocket-tts==4.0.1); `check_internals` names what is missing.

INTERNALS = {
    "TTSModel": ("flow_lm", "mimi", "temp", "sampler_decode_steps", "noise_clamp",
                 "eos_threshold", "model_recommended_frames_after_eos", "_estimate_max_gen_len",
                 "_MIN_FRAMES_BEFORE_EOS"),
    "FlowLMModel": ("transformer", "input_linear", "out_norm", "z_proj", "out_eos", "flow_net",
                    "flow_type", "bos_emb", "emb_std", "emb_mean", "ldim", "conditioner"),
    "StreamingTransformerLayer": ("self_attn", "norm1", "layer_scale_1", "norm2", "linear1",
                                  "linear2", "layer_scale_2"),
    "StreamingMultiheadAttention": ("in_proj", "out_proj", "num_heads", "num_kv_heads",
                                    "dim_per_head", "attn_dim", "context", "rope", "get_state"),
    "MimiModel": ("quantizer", "_to_encoder_framerate", "decoder_transformer", "decoder",
                  "frame_rate", "encoder_frame_rate"),
    "ProjectedTransformer": ("input_proj", "transformer", "output_projs"),
}  # fmt: skip


def check_internals(model) -> list[str]:
    """The pocket-tts internals the batched engine needs that `model` lacks ("Class.name")."""
    objects = {"TTSModel": [model]}
    with contextlib.suppress(AttributeError, IndexError, TypeError):
        objects["FlowLMModel"] = [model.flow_lm]
        layers = [*model.flow_lm.transformer.layers,
                  *model.mimi.decoder_transformer.transformer.layers]  # fmt: skip
        objects["StreamingTransformerLayer"] = layers
        objects["StreamingMultiheadAttention"] = [layer.self_attn for layer in layers]
        objects["MimiModel"] = [model.mimi]
        objects["ProjectedTransformer"] = [model.mimi.decoder_transformer]
    missing = [kind for kind in INTERNALS if kind not in objects]
    for kind, names in INTERNALS.items():
        for obj in objects.get(kind, []):
            missing += [f"{kind}.{n}" for n in names if not hasattr(obj, n)]
    return sorted(set(missing))


@dataclass
class Placement:
    """Where one pass's queries sit in every stream, shared by the layers of a transformer: their
    positions, rotary angles and attention mask are computed once, not once per layer."""

    positions: Any  # [B, T] long: each query's position in its stream
    cos: Any  # [B, T, 1, D/2]: the rotary embedding of those positions
    sin: Any
    mask: Any  # [B, T, span] bool: the region indices each query attends to


def placement(attn, starts, t: int, span: int, length: int) -> Placement:
    """The Placement of T queries per stream from `starts` [B], reading `span` indices of regions
    of `length` (rings: position p is at index p % length)."""
    import torch

    d, device = attn.dim_per_head, starts.device
    positions = starts[:, None] + torch.arange(t, device=device)  # [B, T]
    freqs = torch.exp(torch.arange(d // 2, device=device, dtype=torch.float32)
                      * (-math.log(attn.rope.max_period) * 2 / d))  # fmt: skip
    angles = positions.to(torch.float32)[:, :, None, None] * freqs  # [B, T, 1, D/2]
    # Index j holds the newest position p <= this pass's last with p % L == j (< 0: none yet).
    newest = positions[:, -1:]
    held = newest - (newest - torch.arange(span, device=device)) % length  # [B, span]
    delta = positions[:, :, None] - held[:, None, :]  # [B, T, span]
    mask = (delta >= 0) & (held >= 0)[:, None, :]
    if attn.context is not None:
        mask &= delta < attn.context
    return Placement(positions, torch.cos(angles), torch.sin(angles), mask)


def rope_rows(x, where: Placement):
    """pocket-tts's rotary embedding, a position per stream: x [B, T, H, D]."""
    import torch

    b, t, h, d = x.shape
    pairs = x.view(b, t, h, d // 2, 2)
    real, imag = pairs[..., 0].float(), pairs[..., 1].float()
    cos, sin = where.cos, where.sin
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.to(x.dtype).view(b, t, h, d)


def attend(attn, x, keys, values, where: Placement, linear):
    """One attention layer for streams with their own KV regions.

    x: [B, T, E]; keys/values: [B, H_kv, L, D], one region per stream; where: the queries'
    positions and mask (`placement`); linear: how to apply a Linear (see `Linears`). Writes this
    step's keys and values into the regions.

    A region is a ring: position p is kept at index p % L. One as long as its stream never
    wraps; one shorter than a long stream works when attention sees only the last `context`
    positions and L >= context + T - 1 (Mimi's, see `mimi_positions`).
    """
    import torch
    import torch.nn.functional as F

    b, t, _ = x.shape
    d, span = attn.dim_per_head, where.mask.shape[-1]
    projected = linear(attn.in_proj, x)
    q = projected[..., : attn.attn_dim].view(b, t, attn.num_heads, d)
    k, v = projected[..., attn.attn_dim :].view(b, t, 2, attn.num_kv_heads, d).unbind(dim=2)
    q, k = rope_rows(q, where), rope_rows(k, where)
    rows, at = torch.arange(b, device=x.device)[:, None], where.positions % keys.shape[2]
    keys[rows, :, at] = k.to(keys.dtype)  # [B, T] indices: [B, T, H, D] values
    values[rows, :, at] = v.to(values.dtype)
    k_all, v_all = keys[:, :, :span], values[:, :, :span]
    if attn.num_kv_heads != attn.num_heads:
        k_all = k_all.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
        v_all = v_all.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    q = q.transpose(1, 2)  # [B, H, T, D]
    if x.is_cuda and t <= STEP_QUERIES:  # a step: GPU kernels would tile 64 queries for these
        scores = (q @ k_all.transpose(-1, -2)) * d**-0.5  # [B, H, T, span]
        out = scores.masked_fill(~where.mask[:, None], -math.inf).softmax(-1) @ v_all
    else:
        out = F.scaled_dot_product_attention(q, k_all, v_all, where.mask[:, None])
    return linear(attn.out_proj, out.transpose(1, 2).reshape(b, t, attn.attn_dim))


def run_layers(transformer, x, regions, starts, linear, span: int | None = None):
    """A StreamingTransformer's layers over streams with KV regions ([(keys, values)] by layer).

    span: the region positions attention reads; by default up to the longest stream (a device
    sync), a fixed length in a CUDA graph (positions beyond a stream's own are masked)."""
    import torch.nn.functional as F

    length = regions[0][0].shape[2]
    if span is None:
        span = min(int(starts.max()) + x.shape[1], length)
    shared: dict[tuple, Placement] = {}  # by what a placement depends on: layers alike share one
    for layer, (keys, values) in zip(transformer.layers, regions, strict=True):
        attn = layer.self_attn
        key = (attn.dim_per_head, attn.rope.max_period, attn.context, keys.shape[2])
        if key not in shared:
            shared[key] = placement(attn, starts, x.shape[1], span, keys.shape[2])
        update = attend(attn, layer.norm1(x), keys, values, shared[key], linear)
        x = x.to(update) + layer.layer_scale_1(update)
        hidden = F.gelu(linear(layer.linear1, layer.norm2(x)), approximate="tanh")
        update = linear(layer.linear2, hidden)
        x = x.to(update) + layer.layer_scale_2(update)
    return x


def flow_step(model, latents, regions, starts, noise, linear, span: int | None = None):
    """One FlowLM step for every stream: next latents [B, 1, ldim] and EOS flags [B].

    noise: each stream's sampling noise [B, ldim] (`streams_noise`)."""
    lm = model.flow_lm
    hidden = run_layers(lm.transformer, lm.input_linear(latents), regions, starts, linear, span)
    return flow_head(model, hidden[:, -1], noise)


def flow_head(model, hidden, noise):
    """FlowLM's last hidden state of each stream [B, dim] to its latent [B, 1, ldim] and EOS [B]."""
    import torch
    from pocket_tts.models import flow_lm as flow_module

    lm = model.flow_lm
    if lm.out_norm:
        hidden = lm.out_norm(hidden)
    if lm.z_proj is not None:
        hidden = lm.z_proj(hidden)
    hidden = hidden.to(torch.float32)
    eos = (lm.out_eos(hidden) > model.eos_threshold).view(-1)
    decode = {"lsd": flow_module.lsd_decode, "flow_matching": flow_module.ot_decode,
              "drifting": flow_module.drifting_decode,
              "pointwise": flow_module.pointwise_decode}[lm.flow_type]  # fmt: skip
    flow = functools.partial(lm.flow_net, hidden)
    return decode(flow, noise.to(hidden), model.sampler_decode_steps)[:, None, :], eos


def streams_noise(model, generators) -> Any:
    """Each stream's sampling noise for one step [B, ldim], drawn on the CPU from its own
    generator: the same whatever else shares its step, and whatever the device."""
    import torch

    std, clamp = model.temp**0.5, model.noise_clamp
    return torch.stack([stream_noise(model.flow_lm.ldim, std, clamp, g) for g in generators])


def stream_noise(size: int, std: float, clamp: float | None, generator):
    """A stream's own sampling noise: the same whatever else shares its step."""
    import torch

    noise = torch.empty(size)
    if clamp is None:
        return noise.normal_(0.0, std, generator=generator)
    return torch.nn.init.trunc_normal_(noise, 0.0, std, -clamp, clamp, generator=generator)


def mimi_step(model, latents, state, regions, starts, linear, span: int | None = None):
    """Mimi decodes one latent per stream: audio [B, samples].

    state: Mimi's convolution states ({module: {name: [slots, ...]}}), of which rows 0..B-1 are
    read and updated in place."""
    lm, mimi = model.flow_lm, model.mimi
    n = latents.shape[0]
    views = {name: {key: t[:n] for key, t in module.items()} for name, module in state.items()}
    given = {name: dict(module) for name, module in views.items()}
    x = mimi.quantizer((latents * lm.emb_std + lm.emb_mean).transpose(-1, -2))
    x = mimi._to_encoder_framerate(x, views)
    projected = mimi.decoder_transformer
    x = x.transpose(1, 2)
    if projected.input_proj is not None:
        x = projected.input_proj(x)
    x = run_layers(projected.transformer, x, regions, starts, linear, span)
    x = projected.output_projs[0](x).transpose(1, 2)
    audio = mimi.decoder(x, views)[:, 0]
    for name, module in views.items():  # pocket-tts replaces some state tensors: copy them back
        for key, tensor in module.items():
            if tensor is not given[name][key]:
                state[name][key][:n] = tensor
    return audio


def voice_prefix(model, voice_state) -> tuple[list, int]:
    """A voice's prompt as pocket-tts cached it: FlowLM keys and values ([2, L, H, D]) by layer."""
    length = int(next(s["offset"] for s in voice_state.values() if "offset" in s).view(-1)[0])
    layers = model.flow_lm.transformer.layers
    return [
        layer.self_attn.get_state(voice_state)["cache"][:, 0, :length] for layer in layers
    ], length


def prefill(model, jobs: list, linear) -> list[Prefix]:
    """Streams' prefixes and first steps in one batched pass: each voice's cached prompt, then
    its text, then the begin-of-stream latent (what pocket-tts's first generation step feeds).

    jobs: [(voice_state, tokens [1, T], generator)]. Returns, per job, a Prefix: each FlowLM
    layer's keys and values ([2, P, H, D]), the prefix length P (the first step included), the
    first latent [1, 1, ldim] and its EOS flag. Inputs are padded at the end to the longest: a
    padded position comes after every real one, so (attention being causal) no real one sees it,
    and it is not returned. The scheduler's thread runs it between two ticks.
    """
    import torch

    lm = model.flow_lm
    voices = [voice_prefix(model, state) for state, _, _ in jobs]
    begin = lm.input_linear(lm.bos_emb[None])  # [1, dim]: the first step's input
    texts = [lm.conditioner(tokens)[0] for _, tokens, _ in jobs]  # [T, dim] each
    inputs = [torch.cat([text, begin.to(text.dtype)]) for text in texts]
    lengths = [length + x.shape[0] for (_, length), x in zip(voices, inputs, strict=True)]
    room = max(length for _, length in voices) + max(x.shape[0] for x in inputs)  # padding
    regions = Regions(lm.transformer.layers, len(jobs), room, begin.device, torch.float32)
    for row, (caches, length) in enumerate(voices):
        regions.put(row, caches, length)
    x = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True)  # [B, T, dim]
    hidden = run_layers(lm.transformer, x, regions.layers, regions.starts, linear)
    last = torch.stack([hidden[row, len(given) - 1] for row, given in enumerate(inputs)])
    noise = streams_noise(model, [generator for _, _, generator in jobs])
    latents, eos = flow_head(model, last, noise)
    eos = eos.tolist()
    return [
        Prefix(regions.prefix(row, length), length, latents[row : row + 1], eos[row])
        for row, length in enumerate(lengths)
    ]


def decoder_steps(model) -> int:
    """Mimi's decoder-transformer positions per FlowLM frame (its upsampling before them)."""
    return int(model.mimi.encoder_frame_rate / model.mimi.frame_rate)


def mimi_positions(model, frames: int) -> int:
    """Positions a Mimi KV region keeps for `frames`: all of them, or (attention seeing only its
    last `context` positions) a ring of context + one frame's steps, far fewer."""
    steps = decoder_steps(model)
    context = model.mimi.decoder_transformer.transformer.layers[0].self_attn.context
    return steps * frames if context is None else min(steps * frames, context + steps)


def row_capacity(model, reference_seconds: float = MAX_REFERENCE_SECONDS) -> tuple[int, int]:
    """Positions the longest row needs: (FlowLM, frames generated).

    FlowLM holds the voice prompt (up to --max_reference_seconds), the text (up to a chunk's
    tokens) and the frames; Mimi only the frames (`mimi_positions`). A longer voice state (a
    .safetensors voice) grows them.
    """
    from pocket_tts.default_parameters import MAX_TOKEN_PER_CHUNK

    frames = model._estimate_max_gen_len(MAX_TOKEN_PER_CHUNK) + 2
    prompt = math.ceil(reference_seconds * model.config.mimi.frame_rate)
    return prompt + MAX_TOKEN_PER_CHUNK + frames, frames


def estimate_step(measured: dict[int, float], streams: int) -> float | None:
    """The step time of `streams` rows from times measured at some batch sizes: interpolated
    between them, extrapolated beyond them (the last slope, or MARGINAL_STREAM_COST)."""
    if not measured:
        return None
    measured = sorted(measured.items())
    below = [m for m in measured if m[0] <= streams] or measured[:1]
    above = [m for m in measured if m[0] >= streams]
    (n0, t0), (n1, t1) = below[-1], (above[0] if above else below[-1])
    if n1 > n0:
        return t0 + (t1 - t0) * (streams - n0) / (n1 - n0)
    if len(below) >= 2 and not above:  # beyond the largest size: its last slope
        n_prev, t_prev = below[-2]
        per_stream = max(0.0, (t0 - t_prev) / (n0 - n_prev))
    else:  # one size measured: a guess
        per_stream = MARGINAL_STREAM_COST * t0 / n0
    return t0 + per_stream * max(0, streams - n0)


# -- precision: the kernels that apply each Linear -----------------------------------------------
# A batched step is mostly matrix products of a few rows (one per stream) by large weights; on a
# CPU their cost is reading the weights, and int8 weights are a quarter of float32's. FlowLM's 24
# Linears of the 100M model, one thread, per step (2-vCPU AMD EPYC Zen 4, torch 2.13):
#   rows                       1      2      4      8     16
#   float32, MKL            23.2   42.5   38.1   50.0   58.8 ms
#   float32, oneDNN-packed  21.0   27.2   17.7   25.0   30.0
#   int8, fbgemm (dynamic)   3.9    3.6    3.6    4.9    8.6   (x86 engine 4.3-9.4, oneDNN 6.6-10.6)
#   int8, torchao 0.18       (the library's whole stream: 1.03x float32, against torch.ao's 1.66x)
# Start-up measures float32 against int8 on the machine at hand and runs, at each batch size, the
# faster. Only the Linears pocket-tts's own --quantize converts are int8 (FlowLM's attention and
# feed-forward): upstream measured their word error rate and listened to them. The flow head,
# Mimi and voice encoding stay float32.

KERNEL_ROWS = (1, 2, 4, 8, 16, 64)  # batch sizes compared at start-up (64: a prefill's rows)
# int8 runs where it measured at least this much faster: where the two are even (the 2M model's
# small products: 0.4-1.3x), float32's exact results win.
INT8_GAIN = 1.1


@dataclass
class Precision:
    """What applies the Linears of the batched steps, and why: for the start-up log and /health."""

    name: str  # "float32", "int8", or "int8+float32" (each at the batch sizes it measured faster)
    reason: str
    int8_rows: tuple[int, ...] = ()  # the KERNEL_ROWS that run int8


class Linears:
    """Applies a Linear with the kernel chosen for its input's rows: `linears(module, x)`.

    int8 (`int8_linears`) where the batch size measured faster (the nearest of KERNEL_ROWS at or
    below the rows); float32 otherwise: oneDNN-packed weights (`pack_linears`) for 2 rows or more,
    the module itself (MKL's GEMV, the fastest there) for one.
    """

    def __init__(self, packed: dict, int8: dict, int8_rows=()):
        self.packed, self.int8, self.int8_rows = packed, int8, frozenset(int8_rows)

    def __call__(self, module, x):
        import torch

        rows = x.numel() // x.shape[-1]
        quantized = self.int8.get(module)
        if quantized is not None and self.runs_int8(rows):
            return quantized(x)
        weight = self.packed.get(module)
        if weight is None or rows < 2:
            return module(x)
        return torch.ops.mkldnn._linear_pointwise(x, weight, module.bias, "none", [], "")

    def runs_int8(self, rows: int) -> bool:
        return max([r for r in KERNEL_ROWS if r <= rows] or [1]) in self.int8_rows


def pack_linears(layers) -> dict:
    """oneDNN-packed copies of the float32 CPU Linear weights in `layers`: {Linear: weight}.

    MKL's float32 GEMM is slow for the 2-16 rows of a batched step on some CPUs (on this AMD
    EPYC, 4 rows cost 2.7x one row); oneDNN's packed GEMM costs 1.7x. Empty where the private
    op is missing or disagrees with F.linear: then every Linear runs as usual.
    """
    import torch

    linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    packed = {}
    try:
        for module in linears:
            weight = module.weight
            if weight.device.type != "cpu" or weight.dtype != torch.float32:
                return {}
            packed[module] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 4)
        probe = torch.randn(3, 1, linears[0].in_features)
        if not torch.allclose(Linears(packed, {})(linears[0], probe), linears[0](probe),
                              rtol=1e-4, atol=1e-5):  # fmt: skip
            return {}
    except (AttributeError, RuntimeError, IndexError):
        return {}
    return packed


def quantized_linears(layer) -> tuple:
    """A FlowLM layer's Linears that pocket-tts's --quantize converts: attention, feed-forward."""
    return layer.self_attn.in_proj, layer.self_attn.out_proj, layer.linear1, layer.linear2


def int8_linears(layers) -> dict:
    """Int8 copies of the Linears pocket-tts's --quantize converts (each layer's attention
    projections and feed-forward): {Linear: torch.ao dynamic int8 Linear}; empty where this torch
    has no int8 CPU kernels.

    Weights are quantized once, here, per output channel (pocket-tts: per tensor; per channel is
    as fast and closer); activations per call, by the kernel. The float32 modules stay untouched.
    torch 2.13 warns that its quantized tensors will go: a torch without them runs float32.
    """
    import torch

    try:
        from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

        engines = torch.backends.quantized.supported_engines
        # fbgemm: x86 (measured fastest above); qnnpack: ARM
        torch.backends.quantized.engine = next(e for e in ("fbgemm", "qnnpack") if e in engines)
        copies = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            for layer in layers:
                for module in quantized_linears(layer):
                    weight = module.weight.detach().float().cpu()
                    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
                    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
                    quantized = torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)
                    copy = Int8Linear(module.in_features, module.out_features,
                                      bias_=module.bias is not None, dtype=torch.qint8)  # fmt: skip
                    copy.set_weight_bias(quantized, module.bias)
                    copies[module] = copy
    except (ImportError, AttributeError, RuntimeError, StopIteration):
        return {}
    return copies


def linears_seconds(linears: Linears, modules: list, rows: int) -> float:
    """Median seconds `linears` takes to apply every module once to `rows` rows: over 3 runs, or
    as many as fit in 10 ms (a small model's products take microseconds: 3 would be noise)."""
    import torch

    inputs = {m.in_features: torch.randn(rows, 1, m.in_features) for m in modules}
    times: list[float] = []
    with torch.no_grad():
        while len(times) < 4 or (sum(times[1:]) < 0.01 and len(times) < 200):
            started = time.perf_counter()
            for module in modules:
                linears(module, inputs[module.in_features])
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first run warms the kernels up


def choose_linears(model, requested: str) -> tuple[Linears, Precision]:
    """The kernels of the batched steps at --precision `requested`, and why.

    auto: on a CPU, int8 at each batch size of KERNEL_ROWS where it measures faster than float32
    (memory holds only the kernels chosen); on a GPU float32 (torch.ao's int8 runs on CPUs only).
    """
    flow_layers = model.flow_lm.transformer.layers
    mimi_packed = pack_linears(model.mimi.decoder_transformer.transformer.layers)
    device = next(model.flow_lm.parameters()).device
    int8 = int8_linears(flow_layers) if requested != "float32" and device.type == "cpu" else {}
    if not int8:
        reason = ("asked for (--precision float32)" if requested == "float32" else
                  f"int8 kernels run on CPUs only, and this model runs on {device}"
                  if device.type != "cpu" else "this torch has no int8 CPU kernels")  # fmt: skip
        float32 = Linears({**pack_linears(flow_layers), **mimi_packed}, {})
        return float32, Precision("float32", reason)
    if requested == "int8":
        return (Linears(mimi_packed, int8, KERNEL_ROWS),
                Precision("int8", "asked for (--precision int8)", KERNEL_ROWS))  # fmt: skip
    seconds = {rows: [0.0, 0.0] for rows in KERNEL_ROWS}  # float32, int8
    quantized = Linears({}, int8, KERNEL_ROWS)
    for layer in flow_layers:  # one layer's packed float32 copies at a time: less peak memory
        modules, float32 = quantized_linears(layer), Linears(pack_linears([layer]), {})
        for rows, pair in seconds.items():
            pair[0] += linears_seconds(float32, modules, rows)
            pair[1] += linears_seconds(quantized, modules, rows)
    speedups = {rows: float32 / int8 for rows, (float32, int8) in seconds.items()}
    int8_rows = tuple(rows for rows, speedup in speedups.items() if speedup >= INT8_GAIN)
    measured = ", ".join(f"{rows} rows {speedup:.1f}x" for rows, speedup in speedups.items())
    reason = f"auto: int8 against float32, measured at start-up ({measured})"
    if len(int8_rows) == len(KERNEL_ROWS):  # no packed float32 copies of FlowLM to keep
        return Linears(mimi_packed, int8, int8_rows), Precision("int8", reason, int8_rows)
    packed = {**pack_linears(flow_layers), **mimi_packed}
    if not int8_rows:
        return Linears(packed, {}), Precision("float32", reason)
    return Linears(packed, int8, int8_rows), Precision("int8+float32", reason, int8_rows)


# -- slots: the model's state for every row ------------------------------------------------------


class Regions:
    """Per-stream KV regions of one transformer: [(keys, values)] per layer, [slots, H, L, D].

    Head-major: attention reads each head's positions as one contiguous run. A step's attention
    at 4-16 streams took 1.4-1.9x as long with positions outermost ([slots, L, H, D], pocket-tts's
    own layout), where a head's keys are 256 bytes every 4 KB (100M model, CPU).
    """

    def __init__(self, layers, slots: int, length: int, device, dtype):
        import torch

        shapes = [(slots, layer.self_attn.num_kv_heads, length, layer.self_attn.dim_per_head)
                  for layer in layers]  # fmt: skip
        zeros = functools.partial(torch.zeros, device=device, dtype=dtype)
        self.layers = [(zeros(shape), zeros(shape)) for shape in shapes]
        self.starts = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def put(self, slot: int, caches: list, length: int):
        """A stream's prefix into a slot: keys and values ([2, P, H, D]) by layer, P = length."""
        for (keys, values), cache in zip(self.layers, caches, strict=True):
            keys[slot, :, :length] = cache[0].transpose(0, 1)
            values[slot, :, :length] = cache[1].transpose(0, 1)
        self.starts[slot] = length

    def prefix(self, slot: int, length: int) -> list:
        """A slot's first `length` positions as `put` takes them: [2, P, H, D] by layer."""
        import torch

        return [torch.stack((k[slot, :, :length], v[slot, :, :length])).transpose(1, 2)
                for k, v in self.layers]  # fmt: skip

    def view(self, n: int) -> tuple[list, Any]:
        return [(k[:n], v[:n]) for k, v in self.layers], self.starts[:n]

    def move(self, src: int, dst: int):
        for k, v in self.layers:
            k[dst], v[dst] = k[src], v[src]
        self.starts[dst] = self.starts[src]

    def grown(self, slots: int, length: int, used: int) -> Regions:
        """A copy with room for more streams or longer ones, keeping rows 0..used-1."""
        bigger = copy.copy(self)
        bigger.layers = []
        for k, v in self.layers:
            pair = []
            for t in (k, v):
                new = t.new_zeros((slots, t.shape[1], length, t.shape[3]))
                new[:used, :, : t.shape[2]] = t[:used]
                pair.append(new)
            bigger.layers.append(tuple(pair))
        bigger.starts = self.starts.new_zeros(slots)
        bigger.starts[:used] = self.starts[:used]
        return bigger


def cuda_graph(body, pool):
    """(graph, outputs) of `body()` captured as a CUDA graph (after warm-up runs on a side stream,
    as CUDA requires); graphs given the same `pool` share their scratch memory."""
    import torch

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = body()
    return graph, outputs


class StepGraphs:
    """The batch's FlowLM and Mimi steps as CUDA graphs, one per padded batch size (1, 2, 4...).

    On a GPU a step is some 500 small kernels: launching them from Python costs 8-12 ms of CPU
    (and of the GIL, which every HTTP thread wants too) for about 3 ms of GPU work (measured on
    an H100 at 64 rows). A graph launches them all at once. Its shapes are fixed: rows are
    padded to the next captured size (the slots beyond the batch are unused), attention reads
    whole regions (positions beyond each stream's own are masked), and each step's noise is
    copied into a buffer. The graphs read the slots' regions and Mimi states in place, so
    they are made again whenever those are reallocated.
    """

    def __init__(self, steps: PocketSteps):
        import torch

        slots = steps.flow.slots
        self.sizes = sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})
        buffer = functools.partial(torch.zeros, slots, device=steps.device)
        ldim = steps.model.flow_lm.ldim
        self.flow_in, self.noise, self.mimi_in = buffer(1, ldim), buffer(ldim), buffer(1, ldim)
        flow_pool, mimi_pool = torch.cuda.graph_pool_handle(), torch.cuda.graph_pool_handle()

        def flow(size):
            regions, starts = steps.flow.view(size)
            return flow_step(steps.model, self.flow_in[:size], regions, starts,
                             self.noise[:size], steps.linear, steps.flow.length)  # fmt: skip

        def mimi(size):
            regions, starts = steps.mimi.view(size)
            return mimi_step(steps.model, self.mimi_in[:size], steps.mimi_state, regions, starts,
                             steps.linear, steps.mimi.length)  # fmt: skip

        self.flow = {n: cuda_graph(functools.partial(flow, n), flow_pool) for n in self.sizes}
        self.mimi = {n: cuda_graph(functools.partial(mimi, n), mimi_pool) for n in self.sizes}

    def padded(self, n: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def flow_step(self, latents, noise, n: int):
        """`flow_step` for rows 0..n-1: their next latents [n, 1, ldim] and EOS flags [n]."""
        self.flow_in[:n], self.noise[:n] = latents, noise
        graph, (out, eos) = self.flow[self.padded(n)]
        graph.replay()
        return out[:n].clone(), eos[:n]  # the next replay overwrites them

    def mimi_step(self, latents, n: int):
        """`mimi_step` for rows 0..n-1: audio [n, samples], valid until the next replay."""
        self.mimi_in[:n] = latents
        graph, audio = self.mimi[self.padded(n)]
        graph.replay()
        return audio[:n]


DECIMAL_WINDOW_TOKENS = 8  # tokens decoded on each side of a sentence boundary (each >= 1 char)


def linear_decimal_period(tokens: list[int], index: int, tokenizer) -> bool:
    """pocket-tts's `_is_decimal_period_boundary` ("3.5": a period between digits is no sentence
    end), reading a few tokens on each side instead of decoding the whole text twice per
    boundary: linear splitting instead of quadratic (100k characters took 46 s)."""
    before = tokenizer.decode(tokens[max(0, index - DECIMAL_WINDOW_TOKENS) : index])
    after = tokenizer.decode(tokens[index : index + DECIMAL_WINDOW_TOKENS])
    return len(before) >= 2 and before[-1] == "." and before[-2].isdigit() and after[:1].isdigit()


def linear_sentence_splitting():
    """Have pocket-tts's sentence splitter use `linear_decimal_period` (where it has that hook)."""
    from pocket_tts.models import text_chunking

    original = getattr(text_chunking, "_is_decimal_period_boundary", None)
    if original is not None and original is not linear_decimal_period:
        linear_decimal_period.__wrapped__ = original  # what it replaces (the tests compare them)
        text_chunking._is_decimal_period_boundary = linear_decimal_period


def text_options(model) -> tuple:
    """pocket-tts's text preparation options, as its generate_audio_stream passes them."""
    return (model.pad_with_spaces_for_short_inputs, model.remove_semicolons,
            model.append_terminal_punctuation, model.capitalize_first_letter,
            model.replace_characters)  # fmt: skip


class PocketSteps:
    """pocket-tts's TTSModel as batched steps over slots: all the scheduler knows of the model.

    Slot i holds row i's state: its FlowLM KV region (voice prompt, text, frames), its Mimi KV
    ring and Mimi's convolution states. `chunks` runs on request threads (the tokenizer only);
    every other method runs on the scheduler's thread, `decode` on its Mimi thread while the
    others wait. Another model plugs in by offering the same methods.
    """

    def __init__(self, model, precision: str = "auto",
                 reference_seconds: float = MAX_REFERENCE_SECONDS):  # fmt: skip
        import torch

        self.model, self.reference_seconds = model, reference_seconds
        self.device = next(model.flow_lm.parameters()).device
        self.frame_seconds = 1.0 / model.config.mimi.frame_rate
        self.min_frames_before_eos = model._MIN_FRAMES_BEFORE_EOS
        self.prefill_batch = PREFILL_BATCH.get(self.device.type, PREFILL_BATCH["cpu"])
        self.mimi_steps = decoder_steps(model)
        # Regions are as long as a sentence can be from the start: growing them while streams
        # run copies them, and every stream stalls for it (measured: 1 s for 16 slots).
        length, frames = row_capacity(model, reference_seconds)
        self.flow = Regions(model.flow_lm.transformer.layers, 1, length, self.device,
                            torch.float32)  # fmt: skip
        self.mimi = Regions(model.mimi.decoder_transformer.transformer.layers, 1,
                            mimi_positions(model, frames), self.device, torch.float32)  # fmt: skip
        self.linear, self.precision = choose_linears(model, precision)
        self.mimi_blank = self.fresh_mimi_state(1)  # one stream's state at a sentence's start
        self.mimi_state = self.fresh_mimi_state(1)
        self.graphs: StepGraphs | None = None  # CUDA only: made by `prepare`
        self.regraph = False  # the graphs' arrays were reallocated: make them again when idle

    def slot_bytes(self) -> int:
        """Memory of one slot: FlowLM and Mimi KV regions for the longest sentence."""
        return (self.flow.nbytes + self.mimi.nbytes) // self.flow.slots

    def check_voice(self, voice_state):
        """Raise VoiceError unless `voice_state` is a prompt this model continues: a KV cache
        for every FlowLM layer, of its heads and head size (another model's .safetensors is not).
        """
        try:
            caches, length = voice_prefix(self.model, voice_state)
            layers = self.model.flow_lm.transformer.layers
            fits = length > 0 and all(
                cache.shape == (2, length, layer.self_attn.num_kv_heads,
                                layer.self_attn.dim_per_head)
                for layer, cache in zip(layers, caches, strict=True))  # fmt: skip
        except (KeyError, IndexError, StopIteration, TypeError, AttributeError, ValueError,
                RuntimeError):  # fmt: skip
            fits = False
        if not fits:
            raise VoiceError("this voice state was made for another model: it does not fit.")

    # -- request threads --------------------------------------------------------------------------

    def chunks(self, text: str) -> list[Chunk]:
        """What pocket-tts's generate_audio_stream makes of a text before generating it."""
        from pocket_tts.default_parameters import MAX_TOKEN_PER_CHUNK
        from pocket_tts.models.text_chunking import prepare_text_prompt, split_into_best_sentences

        m, options = self.model, text_options(self.model)
        tokenizer = m.flow_lm.conditioner.tokenizer
        chunks = []
        for part in split_into_best_sentences(tokenizer, text, MAX_TOKEN_PER_CHUNK, *options):
            prepared, frames_after_guess = prepare_text_prompt(part, *options)
            tokens = m.flow_lm.conditioner.prepare(prepared)
            after = m.model_recommended_frames_after_eos
            chunks.append(Chunk(part, tokens, m._estimate_max_gen_len(tokens.shape[1]),
                                frames_after_guess + 2 if after is None else after))  # fmt: skip
        return chunks

    # -- the scheduler's thread -------------------------------------------------------------------

    def prefill(self, rows: list[Sentence]) -> list[Prefix]:
        """The rows' prefixes and first latents, in one batched pass (`prefill`)."""
        jobs = [(row.voice_state, row.chunk.tokens, row.generator) for row in rows]
        return prefill(self.model, jobs, self.linear)

    def place(self, slot: int, prefix: Prefix, frames: int):
        """A prefilled row into `slot` (slots below it are in use), growing the arrays to fit."""
        self._make_room(slot + 1, prefix.length + frames + 2, frames + 2, used=slot)
        self.flow.put(slot, prefix.caches, prefix.length)
        self.mimi.starts[slot] = 0
        for name, module in self.mimi_state.items():
            for key, tensor in module.items():
                tensor[slot] = self.mimi_blank[name][key][0]

    def remove(self, slot: int, last: int):
        """The row in `slot` leaves; the row in `last` (the highest in use) takes its place."""
        if slot != last:
            self.flow.move(last, slot)
            self.mimi.move(last, slot)
            for module in self.mimi_state.values():
                for tensor in module.values():
                    tensor[slot] = tensor[last]
        self.flow.starts[last] = self.mimi.starts[last] = 0  # unused (graphs step it too)

    def reset(self):
        """No slot is in use (after a failure): every one back at position 0."""
        self.flow.starts.zero_()
        self.mimi.starts.zero_()

    def step(self, latents: list, generators: list):
        """One FlowLM step for rows 0..n-1: their next latents [n, 1, ldim] and EOS flags."""
        import torch

        n, inputs = len(latents), torch.cat(latents)
        noise = streams_noise(self.model, generators)
        if self.graphs is not None:
            try:
                out, eos = self.graphs.flow_step(inputs, noise, n)
            except Exception:
                self.drop_graphs()
                raise
        else:
            regions, starts = self.flow.view(n)
            out, eos = flow_step(self.model, inputs, regions, starts, noise, self.linear)
        self.flow.starts[:n] += 1
        return out, eos.tolist()

    def decode(self, latents: list) -> np.ndarray:
        """Mimi decodes rows 0..n-1's latents: float32 audio [n, samples] (the Mimi thread)."""
        import torch

        n, inputs = len(latents), torch.cat(latents)
        with torch.no_grad():  # grad mode is per thread
            if self.graphs is not None:
                audio = self.graphs.mimi_step(inputs, n)
            else:
                regions, starts = self.mimi.view(n)
                audio = mimi_step(self.model, inputs, self.mimi_state, regions, starts,
                                  self.linear)  # fmt: skip
        self.mimi.starts[:n] += self.mimi_steps
        return audio.float().cpu().numpy()

    def prepare(self, slots: int):
        """Before calibration: on a GPU, arrays for `slots` rows and their CUDA graphs."""
        if self.device.type == "cuda":
            frames = row_capacity(self.model, self.reference_seconds)[1]
            self._make_room(slots, self.flow.length, frames, used=0)
            self.make_graphs()

    def idle(self):
        """Nothing runs: the moment to make graphs again after a reallocation."""
        if self.regraph:
            self.make_graphs()

    def make_graphs(self):
        """Capture the steps (StepGraphs); where this torch cannot, steps stay eager."""
        self.regraph, self.graphs = False, None
        started = time.monotonic()
        try:
            graphs = StepGraphs(self)
        except RuntimeError:
            logger.warning("CUDA graphs could not be made: each step launches its kernels one by "
                           "one (slower)", exc_info=True)  # fmt: skip
            return
        self.graphs = graphs
        logger.info("CUDA graphs for %d batch sizes made in %.1f s",
                    len(graphs.sizes), time.monotonic() - started)  # fmt: skip

    def drop_graphs(self):
        """A replay failed: steps stay eager from now on (a second failure would fail again)."""
        logger.warning("a CUDA graph replay failed: steps run eagerly from now on")
        self.graphs, self.regraph = None, False

    def fresh_mimi_state(self, slots: int):
        """Mimi's convolution states for `slots` streams (its attention runs on Regions)."""
        from pocket_tts.modules.stateful_module import init_states

        state = init_states(self.model.mimi, batch_size=slots, sequence_length=1)
        return {name: module for name, module in state.items() if "cache" not in module}

    def _make_room(self, slots: int, length: int, frames: int, used: int):
        """Grow the slot arrays (doubling) and the regions' length to fit, keeping the state of
        the `used` rows in slots 0..used-1."""
        mimi_length, capacity = mimi_positions(self.model, frames), self.flow.slots
        if slots <= capacity and length <= self.flow.length and mimi_length <= self.mimi.length:
            return
        if slots > capacity:
            capacity = max(slots, 2 * capacity)
        if self.graphs is not None:  # they read the old arrays; eager steps until made again
            self.graphs, self.regraph = None, True
        self.flow = self.flow.grown(capacity, max(length, self.flow.length), used)
        self.mimi = self.mimi.grown(capacity, max(mimi_length, self.mimi.length), used)
        bigger = self.fresh_mimi_state(capacity)
        for name, module in self.mimi_state.items():
            for key, tensor in module.items():
                bigger[name][key][:used] = tensor[:used]
        self.mimi_state = bigger


def pocket_steps(model, precision: str = "auto", reference_seconds: float = MAX_REFERENCE_SECONDS):
    """The batched steps (PocketSteps) of a pocket-tts model at --precision `precision`, room for
    voice prompts of `reference_seconds`; None (one stream per request, float32) where its
    internals changed."""
    missing = check_internals(model)
    if missing:
        logger.warning("pocket-tts internals changed (%s): generating one stream at a time per "
                       "request, without batching", ", ".join(missing))  # fmt: skip
        return None
    return PocketSteps(model, precision, reference_seconds)


# -- admission ----------------------------------------------------------------------------------


class Capacity:
    """How many streams the batch keeps faster than real time: a smoothed, hysteretic estimate.

    A step's expected time is the one calibrated at start-up for that batch size, times a load
    factor: the smoothed ratio of measured ticks (prefill passes and a busy machine included) to
    their calibrated time. The capacity is the largest batch whose expected step, times the
    margin, fits in a frame. It drops as soon as the current batch no longer fits, and rises only
    when one more stream fits with HYSTERESIS to spare, so noisy ticks never make it swing.
    Written by the scheduler's thread; read anywhere (a read sees one whole value).
    """

    def __init__(self, frame_seconds: float, margin: float, max_batch: int):
        self.frame_seconds, self.margin, self.max_batch = frame_seconds, margin, max_batch
        self.calibrated: dict[int, float] = {}  # batch size -> seconds (replaced, never edited)
        self.load = 1.0
        self.value = max_batch

    def calibrate(self, table: dict[int, float]):
        self.calibrated, self.load = dict(table), 1.0
        self.value = 1
        self._settle(spare=1.0)

    def expected(self, streams: int) -> float | None:
        """The expected step time of a batch of `streams` (None: nothing measured)."""
        seconds = estimate_step(self.calibrated, streams)
        return None if seconds is None else seconds * self.load

    def fits(self, streams: int, spare: float = 1.0) -> bool:
        seconds = self.expected(streams)
        return (
            self.margin <= 0
            or seconds is None
            or (seconds * self.margin * spare <= self.frame_seconds)
        )

    def observe(self, streams: int, seconds: float):
        """A tick of `streams` rows took `seconds`: update the load, then the capacity."""
        calibrated = estimate_step(self.calibrated, streams)
        if not calibrated:
            return
        ratio = min(max(seconds / calibrated, 1 / MAX_LOAD), MAX_LOAD)
        self.load += LOAD_SMOOTHING * (ratio - self.load)
        self._settle(spare=1.0 + HYSTERESIS)

    def _settle(self, spare: float):
        value = self.value
        while value > 1 and not self.fits(value):
            value -= 1
        while value < self.max_batch and self.fits(value + 1, spare):
            value += 1
        self.value = value


@dataclass(eq=False)
class Ticket:
    """A request waiting in the queue for a place."""

    granted: bool = False


class Admission:
    """Places among the streams: at most `capacity.value` at once, the rest wait in FIFO order.

    A request takes a place (`acquire`) for as long as it generates. When a place frees, the
    oldest waiting request gets it at once; at most `max_queue` wait, for `queue_timeout` at
    most, and the rest are told when to retry (Busy, with Retry-After).
    """

    def __init__(self, capacity: Capacity, max_queue: int, queue_timeout: float,
                 metrics: Metrics | None = None):  # fmt: skip
        self.capacity, self.max_queue, self.queue_timeout = capacity, max_queue, queue_timeout
        self.metrics = metrics or Metrics()
        self.changed = threading.Condition()
        self.queue: deque[Ticket] = deque()
        self.active = 0
        self.recent: deque[tuple[float, float]] = deque(maxlen=32)  # (audio s, wall s) per job

    def acquire(self, cancelled=None):
        """Wait in the queue for a place; return the (idempotent) release function."""
        started = time.monotonic()
        deadline = started + self.queue_timeout
        with self.changed:
            self._grant()
            if self.queue or self.active >= self.capacity.value:
                self._wait(Ticket(), deadline, cancelled)
            else:
                self.active += 1
        self.metrics.queue_wait.observe(time.monotonic() - started)
        released = threading.Event()

        def release():
            with self.changed:
                if not released.is_set():
                    released.set()
                    self.active -= 1
                    self._grant()

        return release

    def _wait(self, ticket: Ticket, deadline: float, cancelled):
        """Queue `ticket` until a place is granted to it (under `changed`)."""
        if len(self.queue) >= self.max_queue:
            self.metrics.refusals.labels("queue_full").inc()
            message = "The server is busy: too many requests are queued. Retry later."
            raise Busy(429, message, self.retry_after(len(self.queue) + 1))
        self.queue.append(ticket)
        try:
            while not ticket.granted:
                if cancelled is not None and cancelled():
                    raise ClientGone
                if time.monotonic() > deadline:
                    self.metrics.refusals.labels("queue_timeout").inc()
                    position = self.queue.index(ticket) + 1
                    raise Busy(503, "No stream became free in time.", self.retry_after(position))
                self.changed.wait(0.25)  # a release notifies at once; capacity may have grown
                self._grant()
        except BaseException:
            if ticket.granted:  # granted just as it gave up: pass the place on
                self.active -= 1
                self._grant()
            else:
                self.queue.remove(ticket)
            raise

    def _grant(self):
        """Free places to the oldest waiting requests (under `changed`)."""
        while self.queue and self.active < self.capacity.value:
            self.queue.popleft().granted = True
            self.active += 1
            self.changed.notify_all()

    def finished(self, audio_seconds: float, wall_seconds: float):
        """A request's generation ended: its duration feeds Retry-After and recent_rtf."""
        self.recent.append((audio_seconds, wall_seconds))

    def retry_after(self, position: int) -> int:
        """Seconds until the request at queue `position` (1: next) can expect a place: a place
        frees every (typical request time / capacity) seconds."""
        walls = [wall for _, wall in list(self.recent)] or [5.0]
        per_place = sum(walls) / len(walls) / max(1, self.capacity.value)
        return max(1, min(120, math.ceil(per_place * position)))

    def stats(self) -> dict[str, Any]:
        recent = list(self.recent)
        audio, wall = sum(a for a, _ in recent), sum(w for _, w in recent)
        with self.changed:
            active, waiting, capacity = self.active, len(self.queue), self.capacity.value
        return {
            "active_streams": active,
            "queue_depth": waiting,
            "max_queue": self.max_queue,
            "capacity": capacity,
            "can_start": 0 if waiting else max(0, capacity - active),
            "recent_rtf": round(audio / wall, 2) if wall > 0 else None,
        }


# -- the batch scheduler: the model's one owner --------------------------------------------------


@dataclass(eq=False)
class Decoding:
    """Mimi decoding one tick's latents on its thread: the audio of `rows`, in slot order."""

    future: concurrent.futures.Future
    rows: list[Sentence]
    delivered: bool = False


class BatchScheduler:
    """One thread owns the model: it prefills, steps, decodes, joins and leaves rows.

    Request threads only `submit` a Sentence and read its audio (`audio`). Each tick, one FlowLM
    step advances every row while Mimi decodes the previous tick's latents on a second thread
    (pocket-tts overlaps them the same way); then finished and stopped rows leave, and waiting
    sentences are prefilled in one batched pass and join. Rows live in slots 0..n-1, so a step
    works on views, never on copies; a leaving row's slot is refilled by the last one. Whatever
    raises, the rows it concerns receive the error and the rest goes on: a failed prefill fails
    only its own rows (a pass is retried row by row), a failed tick or decoding fails the
    batch that was in it, and the next sentence starts afresh.
    """

    def __init__(self, steps, capacity: Capacity, admitted=lambda: 0,
                 metrics: Metrics | None = None):  # fmt: skip
        import torch

        self.steps, self.capacity, self.metrics = steps, capacity, metrics or Metrics()
        self.admitted = admitted  # how many requests hold a place (they may submit soon)
        self.torch_threads = torch.get_num_threads()  # pocket-tts sets 1: a core per thread
        self.rows: list[Sentence] = []
        self.jobs: deque[Sentence] = deque()  # submitted, waiting for their prefill
        self.calls: deque[tuple[Any, concurrent.futures.Future]] = deque()  # run between ticks
        self.lock = threading.Lock()  # guards jobs and calls
        self.wake = threading.Event()
        self.running = True
        self.tick_seconds: float | None = None  # smoothed, for /health
        self.calibrating: list[tuple[int, float]] | None = None  # (rows, seconds) of plain ticks
        self.decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mimi")
        self.thread = threading.Thread(target=self._run, name="batch", daemon=True)
        self.thread.start()

    # -- requests' side ---------------------------------------------------------------------------

    def submit(self, *rows: Sentence):
        """Queue sentences for their prefill (together: one pass); they join at the next tick."""
        with self.lock:
            if not self.running:
                raise GenerationFailed("the batch scheduler is stopped")
            self.jobs.extend(rows)
        self.wake.set()

    def audio(self, row: Sentence) -> Iterator[np.ndarray]:
        """The submitted row's audio as Mimi decodes it; its error, raised; an error if the
        scheduler's thread is gone. Stopping early abandons the row."""
        try:
            while True:
                try:
                    item = row.audio.get(timeout=1.0)
                except queue.Empty:
                    if not self.thread.is_alive():
                        raise GenerationFailed("the batch scheduler stopped") from None
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise GenerationFailed(f"generation failed: {item}") from item
                yield item
        finally:
            row.abandoned = True

    def call(self, fn):
        """Run `fn()` on the scheduler's thread between ticks; return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            self.calls.append((fn, future))
        self.wake.set()
        return future.result()

    def calibrate(self, make_row, frames: int = 6):
        """Measure the step at batch sizes 1, 2, 4, ... up to max_batch, through the loop itself.

        `make_row(frames)` makes a short Sentence. Admission starts from these measurements; it
        stops at the first size slower than real time (none would be admitted). On a GPU the
        slot arrays are first made as large as max_batch and the steps captured as CUDA graphs,
        so that calibration measures what will run.
        """
        self.call(functools.partial(self.steps.prepare, self.capacity.max_batch))
        table, size = {}, 1
        while True:
            for _ in range(2):  # the first run grows the slot arrays: keep the second's
                self.calibrating = ticks = []
                rows = [make_row(frames) for _ in range(size)]
                try:
                    self.submit(*rows)
                    for row in rows:
                        for _ in self.audio(row):
                            pass
                finally:
                    self.calibrating = None
            full = sorted(seconds for streams, seconds in ticks if streams == size)
            if full:  # the median: one slow tick (a busy machine) must not decide for good
                table[size] = full[len(full) // 2]
            self.capacity.calibrate(table)
            if size >= self.capacity.max_batch or not self.capacity.fits(size):
                return
            size = min(2 * size, self.capacity.max_batch)

    def stats(self) -> dict[str, Any]:
        """Batch size, step time and real-time headroom, for /health."""
        seconds = self.tick_seconds if self.rows else None
        expected = self.capacity.expected(max(1, len(self.rows)))
        return {
            "batch_size": len(self.rows),
            "step_ms": round(seconds * 1000, 1) if seconds else None,
            "realtime_headroom": round(self.steps.frame_seconds / seconds, 2) if seconds else None,
            "expected_step_ms": round(expected * 1000, 1) if expected else None,
        }

    def close(self):
        """Stop the thread (rows still in the batch get an error) and the Mimi thread."""
        with self.lock:
            self.running = False
        self.wake.set()
        self.thread.join(timeout=10)
        self.decoder.shutdown(wait=True)

    # -- the loop ---------------------------------------------------------------------------------

    def _run(self):
        import torch

        decoding: Decoding | None = None
        why = "the server is shutting down"
        try:
            with torch.no_grad():
                while self.running:
                    try:
                        decoding = self._turn(decoding)
                    except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                        logger.exception("batched generation failed")
                        self._fail_batch(decoding, exc)
                        decoding = None
        except BaseException:  # noqa: BLE001 - whatever ends this thread, nobody waits for it
            logger.critical("the batch scheduler stopped", exc_info=True)
            why = "the batch scheduler stopped"
        finally:
            with self.lock:
                self.running = False
                left, self.jobs = list(self.jobs), deque()
            self._fail_batch(decoding, GenerationFailed(why))
            for row in left:
                row.fail(GenerationFailed(why))

    def _turn(self, decoding: Decoding | None) -> Decoding | None:
        """One turn of the loop: calls, then a tick, or (nothing to do) a wait."""
        self._run_calls()
        if self.rows or decoding is not None or self.jobs:
            return self._tick(decoding)
        self.steps.idle()
        self.wake.wait()
        self.wake.clear()
        return None

    def _tick(self, decoding: Decoding | None) -> Decoding | None:
        """One FlowLM step for every row (Mimi decodes the last tick meanwhile), then rows leave,
        waiting ones are prefilled and join, and Mimi starts on this tick's latents."""
        started = time.monotonic()
        n = len(self.rows)
        latents, eos = None, []
        if n:
            rows = self.rows
            latents, eos = self.steps.step([r.latent for r in rows], [r.generator for r in rows])
        if decoding is not None:
            self._deliver(decoding)  # Mimi ran while FlowLM stepped
        emitted = self._advance(latents, eos)
        self._leave(emitted)
        joined = self._join()
        if n:
            self._record(n, time.monotonic() - started, joined)
        if not self.rows:
            return None
        # Every row now has a latent to decode: this step's, or (joined) its prefill's first.
        rows = list(self.rows)
        future = self.decoder.submit(self.steps.decode, [row.latent for row in rows])
        return Decoding(future, rows)

    def _advance(self, latents, eos: list[bool]) -> list[Sentence]:
        """The step's latents to their rows; the rows whose latent is audio to decode."""
        emitted = []
        for i, row in enumerate(self.rows):
            if row.finished:
                continue
            if row.stopped:
                row.finished = True
                continue
            if row.advance(latents[i : i + 1], eos[i], self.steps.min_frames_before_eos):
                emitted.append(row)
        return emitted

    def _deliver(self, decoding: Decoding):
        """The decoded audio to its rows (waiting for Mimi); a decoding error raises."""
        audio = decoding.future.result()
        decoding.delivered = True
        for i, row in enumerate(decoding.rows):
            if not row.stopped:
                row.audio.put(audio[i])

    def _leave(self, emitted: list[Sentence]):
        """Finished and stopped rows leave; the last row takes each freed slot.

        A row that emitted its last latent this tick stays one more: Mimi still needs its slot.
        """
        keep = set(map(id, emitted))
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if id(row) in keep or not row.finished:
                i += 1
                continue
            last = len(self.rows) - 1
            self.steps.remove(i, last)
            self.rows[i] = self.rows[last]
            self.rows.pop()
            row.audio.put(None)

    def _join(self) -> bool:
        """Waiting sentences are prefilled in one pass and take the next slots; whether any did.

        Each row is on its own from its prefill on: whatever fails, fails it alone."""
        rows = [row for row in self._take_jobs(self.steps.prefill_batch) if self._wanted(row)]
        if not rows:
            return False
        for row, prefix in self._prefill(rows):
            try:
                if not row.advance(prefix.latent, prefix.eos, self.steps.min_frames_before_eos):
                    row.audio.put(None)  # over at its first step
                    continue
                self.steps.place(len(self.rows), prefix, row.chunk.max_frames)
            except Exception as exc:  # noqa: BLE001 - this row's error (a state too large?)
                logger.exception("a prefilled row could not join the batch")
                row.fail(exc)
                continue
            self.rows.append(row)
        return True

    def _wanted(self, row: Sentence) -> bool:
        if row.stopped:
            row.audio.put(None)
        return not row.stopped

    def _take_jobs(self, most: int) -> list[Sentence]:
        """Up to `most` waiting sentences, in arrival order. With nobody speaking, first wait
        (PREFILL_GATHER_SECONDS at most) for requests admitted a moment ago that have yet to
        submit theirs, so that requests arriving together share one pass."""
        if not self.rows:
            deadline = time.monotonic() + PREFILL_GATHER_SECONDS
            while len(self.jobs) < most and time.monotonic() < deadline:
                if self.admitted() <= len(self.jobs):  # each request has one sentence at a time
                    break
                time.sleep(0.002)
        with self.lock:
            return [self.jobs.popleft() for _ in range(min(most, len(self.jobs)))]

    def _prefill(self, rows: list[Sentence]) -> list[tuple[Sentence, Prefix]]:
        """The rows' prefixes, in one pass with every core; a failed pass is retried row by
        row, so that one bad input fails only itself."""
        import torch

        # torch's thread count is this thread's own (and the default of threads yet to start),
        # so it is set back at once. Mimi is idle now: the pass may use every core.
        torch.set_num_threads(max(1, min(MAX_PREFILL_THREADS, usable_cores())))
        try:
            try:
                return list(zip(rows, self.steps.prefill(rows), strict=True))
            except Exception as exc:  # noqa: BLE001 - retried alone, below
                if len(rows) == 1:
                    logger.exception("prefill failed")
                    rows[0].fail(exc)
                    return []
            done = []
            for row in rows:
                try:
                    done += list(zip([row], self.steps.prefill([row]), strict=True))
                except Exception as exc:  # noqa: BLE001 - this row's own error
                    logger.exception("prefill failed")
                    row.fail(exc)
            return done
        finally:
            torch.set_num_threads(self.torch_threads)

    def _fail_batch(self, decoding: Decoding | None, exc: Exception):
        """After a failed tick: audio already decoded goes out, then every row in the batch
        receives the error and its slot is freed."""
        if decoding is not None and not decoding.delivered:
            with contextlib.suppress(Exception):
                self._deliver(decoding)
        for row in self.rows:
            row.fail(exc)
        self.rows.clear()
        with contextlib.suppress(Exception):
            self.steps.reset()

    def _run_calls(self):
        with self.lock:
            calls, self.calls = list(self.calls), deque()
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - the caller raises it
                future.set_exception(exc)

    def _record(self, streams: int, seconds: float, joined: bool):
        if self.calibrating is not None:
            if not joined:
                self.calibrating.append((streams, seconds))
            return
        old = self.tick_seconds
        self.tick_seconds = seconds if old is None else old + LOAD_SMOOTHING * (seconds - old)
        self.metrics.step_seconds.observe(seconds)
        self.capacity.observe(streams, seconds)


# -- the Engine: what HTTP, Wyoming and other protocols call --------------------------------------


@dataclass(eq=False)
class Turn:
    """One request's turn at the model: the place it holds and its audio (float32 chunks).

    `release` (any thread, idempotent: a deadline's timer) stops generation and frees the
    place; `close` (the thread that iterates `audio`) also closes the audio generator. Every
    protocol ends a turn with `close`, however it finished."""

    audio: Iterator[np.ndarray]
    stop: threading.Event
    free_place: Any  # Admission's idempotent release function

    def release(self):
        self.stop.set()
        self.free_place()

    def close(self):
        self.stop.set()
        try:
            self.audio.close()
        finally:
            self.free_place()


class Engine:
    """Voices, admission and audio: the one API that protocols use.

    A request names its voice (`voice`: its state) and takes a `turn`: a place in the queue,
    then `speak`, which yields float32 mono numpy chunks at `sample_rate` as the model makes
    them, stopping early once `stop` is set. With batched steps (`PocketSteps`) every sentence
    is a row of the BatchScheduler, which alone touches the model's state; a pocket-tts whose
    internals changed runs its own generate_audio_stream per request instead. HTTP, Wyoming and
    the WebSockets all speak through `voice` and `turn`, each telling errors its own way.
    """

    def __init__(
        self,
        model,
        cache: LatentCache | None = None,
        max_batch: int = 1,
        max_queue: int = 16,
        queue_timeout: float = 60.0,
        max_reference_seconds: float = MAX_REFERENCE_SECONDS,
        realtime_margin: float = 1.1,
        steps=None,
        metrics: Metrics | None = None,
    ):
        self.model = model
        self.metrics = metrics or Metrics()
        linear_sentence_splitting()
        if hasattr(model, "max_decoder_frames_per_call"):  # 0 would decode a whole backlog at once
            model.max_decoder_frames_per_call = MAX_DECODER_FRAMES_PER_CALL
        self.sample_rate: int = model.sample_rate
        self.frame_rate: float = model.config.mimi.frame_rate
        self.language = model_language(model)  # of its text: the normalizer's rules
        self.states = VoiceStates(model, cache or LatentCache(None), max_reference_seconds,
                                  self.metrics)  # fmt: skip
        self.capacity = Capacity(1.0 / self.frame_rate, realtime_margin, max_batch)
        self.admission = Admission(self.capacity, max_queue, queue_timeout, self.metrics)
        self.steps = steps
        self.scheduler = None
        self.precision = Precision("float32", "unbatched: pocket-tts's own generation")
        if steps is not None:
            self.scheduler = BatchScheduler(steps, self.capacity, lambda: self.admission.active,
                                            self.metrics)  # fmt: skip
            self.precision = steps.precision
        self.metrics.watch(self.stats)

    # -- places -----------------------------------------------------------------------------------

    def acquire(self, cancelled=None):
        """Wait in the FIFO queue for a place; return the (idempotent) release function."""
        return self.admission.acquire(cancelled)

    @property
    def max_batch(self) -> int:
        return self.capacity.max_batch

    @property
    def active(self) -> int:
        return self.admission.active

    @property
    def waiting(self) -> int:
        return len(self.admission.queue)

    def stats(self) -> dict[str, Any]:
        """Queue and throughput numbers for /health."""
        stats = {
            "batched": self.scheduler is not None,
            "max_batch": self.max_batch,
            "precision": self.precision.name,
            "precision_reason": self.precision.reason,
        }
        stats.update(self.admission.stats())
        if self.scheduler is not None:
            stats.update(self.scheduler.stats())
        return stats

    def close(self):
        """Stop the scheduler's threads (at shutdown)."""
        if self.scheduler is not None:
            self.scheduler.close()

    # -- voices -----------------------------------------------------------------------------------

    def use_voices(self, catalog: VoiceCatalog):
        """The voices that protocols name; the default's state is kept, should its file vanish."""
        self.catalog = catalog
        self.default_state = self.voice_state(catalog.default)

    def voice(self, name: str | None, load: bool = True):
        """The state of a voice by name, for every protocol (each maps VoiceError, with
        `voice_error_code`, to its own wire format). `load=False` only checks the name: words-free
        input needs no state. A default whose file went away keeps its start-up state; an OpenAI
        name whose voice fails speaks as the default."""
        source = self.catalog.resolve(name)
        if not load:
            return None
        try:
            return self.voice_state(source)
        except VoiceError as exc:
            if source != self.catalog.default:
                raise
            logger.warning("default voice unavailable (%s); using its start-up state", exc)
            return self.default_state
        except Exception:
            if name and name.strip().lower() in self.catalog.voice_map:
                logger.exception("voice %r failed; using the default voice", name)
                return self.voice_state(self.catalog.default)
            raise

    def voice_state(self, source: VoiceSource):
        """The conditioned model state of a voice (`VoiceStates.get`), checked against the model:
        one that does not fit is the request's VoiceError, never a failure inside the batch."""
        state = self.states.get(source)
        if self.steps is not None:
            self.steps.check_voice(state)
        return state

    # -- turns: how every protocol speaks -------------------------------------------------------

    def turn(self, script: list, voice_state, stop: threading.Event, gone=None) -> Turn:
        """A request's turn: a place in the queue (Busy, or ClientGone once `gone()`; silence
        alone needs none), then `script`'s audio. The caller ends it with `Turn.close`."""
        release = self.acquire(gone) if has_words(script) else (lambda: None)
        return Turn(self.speak(script, voice_state, stop), stop, release)

    def warm_up(self, voice_state):
        """Generate at start-up (torch's first run on new threads is slow). Batched, that is the
        calibration: the step time measured at growing batch sizes, for admission."""
        if self.scheduler is None:
            for _ in self.generate("Hello.", voice_state, threading.Event()):
                pass
        else:
            self.scheduler.calibrate(functools.partial(self._calibration_row, voice_state))
        self.admission.recent.clear()

    def _calibration_row(self, voice_state, frames: int) -> Sentence:
        [chunk] = self.steps.chunks("Hello.")
        chunk.max_frames = frames
        return self._row(chunk, voice_state, threading.Event(), 0)

    # -- text -------------------------------------------------------------------------------------

    def split(self, text: str) -> list[str]:
        """pocket-tts's own sentence chunking, done here so each chunk boundary can be faded."""
        from pocket_tts.default_parameters import MAX_TOKEN_PER_CHUNK
        from pocket_tts.models.text_chunking import split_into_best_sentences

        tokenizer = self.model.flow_lm.conditioner.tokenizer
        chunks = split_into_best_sentences(tokenizer, text, MAX_TOKEN_PER_CHUNK,
                                           *text_options(self.model))  # fmt: skip
        return [piece for chunk in chunks for piece in self.fit(chunk, MAX_TOKEN_PER_CHUNK)]

    def fit(self, chunk: str, limit: int) -> list[str]:
        """Cut a chunk with no punctuation left to split at into runs of words of <= `limit` tokens.

        pocket-tts sizes a chunk's KV cache, decoder state and length from its token count, so
        one 800-token run of words would cost gigabytes; runs of `limit` tokens cost what a
        sentence does. A word longer than the limit is cut into pieces of characters.
        """
        if self.count_tokens(chunk) <= limit:
            return [chunk]
        width = max(1, limit // 4)  # characters per piece of a giant word: <= 4 tokens each
        words = (w[i : i + width] for w in chunk.split() for i in range(0, len(w), width))
        pieces, run, used = [], [], 0
        for word in words:
            cost = self.count_tokens(" " + word)
            if run and used + cost > limit:
                pieces.append(" ".join(run))
                run, used = [], 0
            run.append(word)
            used += cost
        if run:
            pieces.append(" ".join(run))
        return pieces

    def count_tokens(self, text: str) -> int:
        """Text tokens as the model's tokenizer counts them (reported as usage)."""
        return len(self.model.flow_lm.conditioner.tokenizer.encode(text))

    # -- audio ------------------------------------------------------------------------------------

    def generate(self, text: str, voice_state, stop: threading.Event, seed: int | None = None):
        """Audio for `text` in `voice_state`, chunk by chunk, until done or `stop` is set.

        The caller holds a place (acquire) for as long as it iterates. A `seed` makes the
        sampling noise, and so the audio, repeatable.
        """
        started, samples = time.monotonic(), 0
        seed = secrets.randbits(62) if seed is None else seed
        try:
            for index, sentence in enumerate(self.split(text)):
                if stop.is_set():
                    return
                chunks = self._sentence_audio(sentence, voice_state, stop, seed * 1000 + index)
                for audio in self._faded(chunks):
                    samples += audio.size
                    yield audio
        finally:
            if samples:
                self.admission.finished(samples / self.sample_rate, time.monotonic() - started)

    def speak(self, script: list, voice_state, stop: threading.Event, seed: int | None = None):
        """Audio for a speech_script: text through `generate`, pauses as silence."""
        for index, part in enumerate(script):
            if stop.is_set():
                return
            if isinstance(part, str):
                part_seed = None if seed is None else seed * 100 + index
                yield from self.generate(part, voice_state, stop, part_seed)
                continue
            total, step = round(part * self.sample_rate), self.sample_rate // 4
            for start in range(0, total, step):  # in pieces, so a stream keeps flowing
                yield np.zeros(min(step, total - start), np.float32)

    def _sentence_audio(self, sentence: str, voice_state, stop, seed: int) -> Iterator[np.ndarray]:
        """One chunk of text as float32 arrays: rows of the batch, or the model's own stream."""
        if self.scheduler is None:
            stream = self.model.generate_audio_stream(voice_state, sentence, stop=stop)
            try:
                for chunk in stream:
                    yield chunk.detach().to("cpu").float().numpy().reshape(-1)
            finally:
                stream.close()
            return
        for chunk in self.steps.chunks(sentence):
            row = self._row(chunk, voice_state, stop, seed)
            self.scheduler.submit(row)
            yield from self.scheduler.audio(row)
            seed += 7919

    @staticmethod
    def _row(chunk: Chunk, voice_state, stop, seed: int) -> Sentence:
        import torch

        generator = torch.Generator().manual_seed(seed % 2**63)
        return Sentence(chunk, voice_state, generator, stop)

    def _faded(self, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """One chunk of text, faded in and out so that consecutive chunks join without clicks.

        The last FADE_OUT samples are held back until the next piece shows they are not the end;
        the first piece (one frame, 80 ms) leaves whole, so encoders can start on it at once.
        """
        fade_in = int(FADE_IN_SECONDS * self.sample_rate)
        fade_out = int(FADE_OUT_SECONDS * self.sample_rate)
        pending = np.zeros(0, np.float32)  # held-back tail
        first = True
        try:
            for audio in chunks:
                if first and audio.size:
                    audio = audio.copy()
                    n = min(fade_in, audio.size)
                    audio[:n] *= np.linspace(0.0, 1.0, n, dtype=np.float32)
                pending = np.concatenate([pending, audio])
                keep = 0 if first else fade_out
                first = first and not audio.size
                if pending.size > keep:
                    yield pending[: pending.size - keep]
                    pending = pending[pending.size - keep :]
        finally:
            chunks.close()
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


MP3_JOINABLE = {"id3v2_version": "0", "write_xing": "0"}
FORMATS = {
    f.name: f
    for f in (
        # No ID3v2 tag and no Xing/Info frame: clients join per-sentence MP3s into one stream,
        # and a header in the middle of a stream is a glitch (or an error) to a decoder.
        AudioFormat("mp3", "audio/mpeg", "mp3", "libmp3lame", {}, MP3_JOINABLE, 64_000),
        # Ogg pages are flushed every 20 ms instead of every second, so streams start at once.
        AudioFormat("opus", "audio/opus", "ogg", "libopus", {}, {"page_duration": "20000"}, 32_000),
        AudioFormat("aac", "audio/aac", "adts", "aac", bit_rate=64_000),
        # Small FLAC blocks: the first block leaves after ~50 ms of audio, not ~200 ms.
        AudioFormat("flac", "audio/flac", "flac", "flac", {"frame_size": "1152"}),
        AudioFormat("wav", "audio/wav", "wav", "pcm_s16le", {}, {"fflags": "+bitexact"}),
        AudioFormat("pcm", "audio/pcm", None, None),
    )
}
# Formats of the voice-agent protocols only (telephony): raw G.711, no container.
WIRE_FORMATS = FORMATS | {
    "ulaw": AudioFormat("ulaw", "audio/basic", "mulaw", "pcm_mulaw"),
    "alaw": AudioFormat("alaw", "audio/x-alaw-basic", "alaw", "pcm_alaw"),
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


class Resampler:
    """Float32 mono from one sample rate to another (FFmpeg's swresample through PyAV), fed and
    drained chunk by chunk: the output keeps the input's duration within a sample."""

    def __init__(self, rate_in: int, rate_out: int):
        self.rate_in, self.samples_in = rate_in, 0
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)

    def process(self, samples: np.ndarray | None) -> np.ndarray:
        """Push samples (None flushes) and return what is ready at the new rate."""
        frame = None
        if samples is not None:
            frame = float_frame(samples, self.rate_in, self.samples_in)
            self.samples_in += samples.size
        out = [f.to_ndarray().reshape(-1) for f in self.resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class AudioEncoder:
    """Float32 mono chunks in, bytes of one valid audio file out, incrementally.

    Streaming writes to a non-seekable sink, so headers are streamable (a WAV states placeholder
    sizes); otherwise the file is written to a seekable buffer and headers state real lengths.
    `speed` != 1 runs the audio through a TempoFilter first; a `rate` other than the model's
    through a Resampler (the voice-agent protocols ask for 8 to 48 kHz).
    """

    def __init__(self, fmt: AudioFormat, sample_rate: int, speed: float = 1.0, streaming=True,
                 rate: int | None = None):  # fmt: skip
        self.fmt = fmt
        self.sample_rate = rate or sample_rate  # what is written
        self.streaming = streaming
        self.samples_in = 0
        self.samples_out = 0
        self.tempo = TempoFilter(speed, sample_rate) if abs(speed - 1.0) > 1e-6 else None
        self.resampler = Resampler(sample_rate, rate) if rate and rate != sample_rate else None
        self.buffer = bytearray()  # raw PCM of a non-streamed pcm response
        self.container = self.stream = None
        if fmt.container is not None:
            self.sink = _ByteSink() if streaming else io.BytesIO()
            self.container = av.open(
                self.sink, "w", format=fmt.container, options=dict(fmt.container_options)
            )
            self.stream = self.container.add_stream(
                fmt.codec, rate=self.sample_rate, layout="mono", options=dict(fmt.codec_options)
            )
            if fmt.bit_rate:
                self.stream.codec_context.bit_rate = fmt.bit_rate

    def encode(self, samples: np.ndarray) -> bytes:
        """Feed audio; return the bytes that are ready (streaming) or b"" (buffered)."""
        self.samples_in += samples.size
        if self.tempo is not None:
            samples = self.tempo.process(samples)
        if self.resampler is not None:
            samples = self.resampler.process(samples)
        return self._write(samples)

    def finish(self) -> bytes:
        """Flush every stage and return the remaining bytes (the whole file when buffered)."""
        tail = self._write(self.tempo.process(None)) if self.tempo is not None else b""
        if self.resampler is not None:
            tail += self._write(self.resampler.process(None))
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
        """Release FFmpeg's resources (after `finish`, or of an aborted stream); idempotent."""
        container, self.container = self.container, None
        if container is not None:
            with contextlib.suppress(Exception):  # a half-written container: best effort
                container.close()


# =================================================================================================
# HTTP API
# =================================================================================================


def key_given(key: str, *candidates: str | None) -> bool:
    """Whether any of the `candidates` (header values) is `key`, compared in constant time."""
    return any(c and hmac.compare_digest(c.strip().encode(), key.encode()) for c in candidates)


def bearer(headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    return token if scheme.lower() == "bearer" else None


CORS_EXPOSED = "Retry-After, x-request-id, Content-Disposition"
OPEN_PATHS = (  # /metrics has a key of its own, --metrics_key
    "/",
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    "/pocket-tts-logo.png",
    "/favicon.ico",
    "/favicon.svg",
)
# Listings stay open under --api_key: Open WebUI fetches them with no key and, on a 401, silently
# offers six stock voice names instead of this server's.
DISCOVERY_PATHS = ("/v1/models", "/v1/audio/models", "/v1/voices", "/v1/audio/voices")


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


def host_name(host: str) -> str:
    """The name in a Host header: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_name(name: str) -> bool:
    import ipaddress

    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def voices_dir_unwritable() -> ApiError:
    message = "The voices folder cannot be written on this server (read-only or full)."
    return ApiError(403, message, code="voices_dir_not_writable", kind="server_error")


@dataclass
class SpeechRequest:
    """A validated POST /v1/audio/speech body."""

    input: str
    voice: str | None
    model: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    stream: bool = False
    stream_format: str = "audio"
    normalize: bool = True


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can carry them; UTF-8 cannot


def parse_voice(voice: Any) -> str | None:
    """A request's `voice`: a name, or the current OpenAI API's object {"id": "<name>"}."""
    if isinstance(voice, dict):
        voice = voice.get("id")
        if not isinstance(voice, str):
            raise invalid("voice", "'voice.id' must be a string.", "invalid_type")
    if voice is not None and not isinstance(voice, str):
        message = "'voice' must be a string or an object {\"id\": ...}."
        raise invalid("voice", message, "invalid_type")
    if voice is not None and LONE_SURROGATE.search(voice):
        raise invalid("voice", "'voice' holds invalid Unicode (a lone surrogate).")
    return voice or None


def parse_speech_request(body: Any, settings: Settings) -> SpeechRequest:
    """Validate an OpenAI speech request; unknown fields are ignored, bad ones name their param."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    text = body.get("input")
    if text is None:
        raise invalid("input", "Missing required parameter: 'input'.", "missing_required_parameter")
    if not isinstance(text, str):
        raise invalid("input", "'input' must be a string.", "invalid_type")
    if LONE_SURROGATE.search(text):
        raise invalid("input", "'input' holds invalid Unicode (a lone surrogate).")
    if not text.strip():
        raise invalid("input", "'input' must not be empty.")
    if len(text) > settings.max_input_chars:
        raise invalid(
            "input",
            f"'input' is {len(text)} characters long; the maximum is {settings.max_input_chars}.",
            "string_above_max_length",
        )
    for name in ("model", "instructions"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise invalid(name, f"'{name}' must be a string.", "invalid_type")
    voice = parse_voice(body.get("voice"))
    fmt = body.get("response_format") or "mp3"
    if not isinstance(fmt, str) or fmt not in FORMATS:
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
    if not isinstance(stream_format, str) or stream_format not in ("audio", "sse"):
        raise invalid("stream_format", "'stream_format' must be 'audio' or 'sse'.")
    return SpeechRequest(
        input=text,
        voice=voice,
        model=body.get("model") or None,
        response_format=fmt,
        speed=float(speed),
        stream=stream or stream_format == "sse",
        stream_format=stream_format,
        normalize=normalize,
    )


# fmt: off
OPENAI_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def openapi_spec(settings: Settings) -> dict[str, Any]:
    """An OpenAPI 3 description of the API (for client generators and schema-driven fuzzers)."""
    error = {"description": "OpenAI error object",
             "content": {"application/json": {"schema": OPENAI_ERROR_SCHEMA}}}
    errors = {code: error for code in ("400", "401", "404", "409", "413", "429", "503")}
    json_ok = {"200": {"description": "OK", "content": {"application/json": {}}}}
    speech = {"type": "object", "required": ["input"], "properties": {
        "model": {"type": "string"},
        "input": {"type": "string", "minLength": 1, "maxLength": settings.max_input_chars},
        "voice": {"oneOf": [{"type": "string"}, {"type": "object", "required": ["id"],
                                                 "properties": {"id": {"type": "string"}}}]},
        "response_format": {"enum": list(FORMATS)},
        "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0},
        "stream": {"type": "boolean"},
        "stream_format": {"enum": ["audio", "sse"]},
        "instructions": {"type": "string"},
        "normalize": {"type": "boolean"}}}
    audio = {f.content_type: {} for f in FORMATS.values()} | {"text/event-stream": {}}
    upload = {"multipart/form-data": {"schema": {"type": "object", "required": ["file"],
              "properties": {"name": {"type": "string"},
                             "file": {"type": "string", "format": "binary"}}}}}
    openai_upload = {"multipart/form-data": {"schema": {"type": "object",
                     "required": ["audio_sample", "name"], "properties": {
                         "audio_sample": {"type": "string", "format": "binary"},
                         "name": {"type": "string"}, "consent": {"type": "string"},
                         "type": {"enum": ["audio_sample"]}}}}}
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": SERVER_NAME, "version": "1.0"},
        "paths": {
            "/v1/audio/speech": {"post": {
                "requestBody": {"content": {"application/json": {"schema": speech}}},
                "responses": {"200": {"description": "audio", "content": audio}, **errors}}},
            "/v1/voices": {
                "get": {"responses": json_ok},
                "post": {"requestBody": {"content": upload},
                         "responses": {"201": json_ok["200"], **errors}}},
            "/v1/voices/{name}": {
                "get": {"parameters": name, "responses": {**json_ok, **errors}},
                "delete": {"parameters": name, "responses": {**json_ok, **errors}}},
            "/v1/audio/voices": {
                "get": {"responses": json_ok},
                "post": {"requestBody": {"content": openai_upload},
                         "responses": {**json_ok, **errors}}},
            "/v1/audio/voices/{name}": {
                "delete": {"parameters": name, "responses": {**json_ok, **errors}}},
            "/v1/models": {"get": {"responses": json_ok}},
            "/v1/audio/models": {"get": {"responses": json_ok}},
            "/health": {"get": {"responses": json_ok}},
        },
    }
# fmt: on


def first_audio_timed(chunks: Iterator[bytes], metrics: Metrics, protocol: str, started: float):
    """`chunks`, with the time from `started` to the first one in /metrics."""
    try:
        for chunk in chunks:
            if started is not None:
                metrics.first_audio.labels(protocol).observe(time.monotonic() - started)
                started = None
            yield chunk
    finally:
        chunks.close()


class ClosingStream:
    """A streamed response body that runs `on_close` once, however it ends (done, error, hang-up).

    A generator's own `finally` does not run if the server closes it before the first chunk, so
    the worker a stream holds is released here instead.
    """

    def __init__(self, chunks: Iterator, on_close):
        self.chunks, self.on_close = chunks, on_close

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.chunks)
        except BaseException:
            self.close()
            raise

    def close(self):
        try:
            self.chunks.close()
        finally:
            self.on_close()


class SpeechServer:
    """The Flask application: validates requests, asks the Engine for audio, encodes it."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.voices = engine.catalog  # the Engine's (`Engine.use_voices`): one catalog for all
        self.device = str(getattr(engine.model, "device", "cpu"))
        self.naming = threading.Lock()  # voice names are claimed one upload at a time
        self.draining = False  # set on SIGTERM: /ready says 503
        self.cors = {o.strip().rstrip("/") for o in (settings.cors_origins or "").split(",")} - {""}
        self.loopback_only = is_loopback_name(settings.host)
        self.app = self.create_app()

    def create_app(self) -> Flask:
        app = Flask(SERVER_NAME)
        app.config["MAX_CONTENT_LENGTH"] = max_body_bytes(self.settings)
        app.json.sort_keys = False
        routes = [
            ("/", self.page, ["GET"]),
            ("/pocket-tts-logo.png", self.logo, ["GET"]),
            ("/favicon.svg", self.favicon, ["GET"]),
            ("/favicon.ico", self.favicon, ["GET"]),
            ("/health", self.health, ["GET"]),
            ("/ready", self.ready, ["GET"]),
            ("/metrics", self.metrics, ["GET"]),
            ("/openapi.json", self.openapi, ["GET"]),
            ("/v1/models", self.models, ["GET"]),
            ("/v1/audio/models", self.audio_models, ["GET"]),
            ("/v1/voices", self.list_voices, ["GET"]),
            ("/v1/voices", self.upload_voice, ["POST"]),
            ("/v1/voices/<path:name>", self.get_voice, ["GET"]),
            ("/v1/voices/<path:name>", self.delete_voice, ["DELETE"]),
            ("/v1/audio/voices", self.list_audio_voices, ["GET"]),
            ("/v1/audio/voices", self.create_audio_voice, ["POST"]),
            ("/v1/audio/voices/<path:name>", self.delete_audio_voice, ["DELETE"]),
            ("/v1/audio/speech", self.speech, ["POST"]),
        ]
        for rule, view, methods in routes:
            app.add_url_rule(rule, view.__name__ + rule, view, methods=methods)
        app.before_request(self.tag_request)
        app.before_request(self.guard_request)
        app.before_request(self.check_api_key)
        app.after_request(self.finish_response)
        app.register_error_handler(ApiError, lambda e: e.response())
        app.register_error_handler(Busy, self.busy)
        app.register_error_handler(ClientGone, self.client_gone)
        app.register_error_handler(HTTPException, self.http_error)
        app.register_error_handler(Exception, self.internal_error)
        return app

    # -- errors and auth --------------------------------------------------------------------------

    @staticmethod
    def tag_request():
        """Give each request an id (sent back as x-request-id, written in its log line) and its
        start time (for /metrics)."""
        g.request_id, g.started = f"req_{uuid.uuid4().hex}", time.monotonic()

    def finish_response(self, resp: Response) -> Response:
        """Tag, log, and (for an allowed other site) open the response to the browser."""
        request_id = g.get("request_id") or f"req_{uuid.uuid4().hex}"
        resp.headers["x-request-id"] = request_id
        origin = request.headers.get("Origin")
        if self.origin_allowed(origin):
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
            resp.vary.add("Origin")
        logger.info("%s %s %s -> %d", request_id, request.method, request.path, resp.status_code)
        self.count_request(resp)
        return resp

    def count_request(self, resp: Response):
        """The request in /metrics: by route (its pattern), status and format; its duration once
        the body's last byte has left."""
        metrics = self.engine.metrics
        route = request.url_rule.rule if request.url_rule else "unmatched"
        fmt = g.get("response_format", "")
        metrics.requests.labels(route, str(resp.status_code), fmt).inc()
        started = g.get("started", time.monotonic())
        resp.call_on_close(
            lambda: metrics.request_seconds.labels(route).observe(time.monotonic() - started)
        )

    def guard_request(self):
        """Refuse what only another web site (or a DNS-rebound host name) would send.

        A browser lets any site post to a server on your machine; without a key, that site
        could speak or upload through it. Writes from other sites are refused unless their
        origin is in --cors_origins, and a server on loopback only answers loopback names.
        """
        if self.loopback_only and not is_loopback_name(host_name(request.host)):
            message = f"This server answers only on its own address, not as {request.host!r}."
            raise ApiError(403, message, code="invalid_host")
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return self.preflight(origin)
        write = request.method not in ("GET", "HEAD", "OPTIONS")
        if write and self.cross_site(origin) and not self.origin_allowed(origin):
            message = (f"Requests from other sites ({origin or 'unknown origin'}) are refused; "
                       "allow the site with --cors_origins.")  # fmt: skip
            raise ApiError(403, message, code="cross_site_request")
        return None

    def cross_site(self, origin: str | None) -> bool:
        site = request.headers.get("Sec-Fetch-Site", "")
        if site in ("cross-site", "same-site"):
            return True
        return bool(origin) and (origin == "null" or urlsplit(origin).netloc != request.host)

    def origin_allowed(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.cors or origin.rstrip("/") in self.cors)

    def preflight(self, origin: str | None) -> Response:
        """CORS preflight: an allowed origin may send the key and JSON; others learn nothing."""
        if not self.origin_allowed(origin):
            raise ApiError(403, "This origin is not allowed (--cors_origins).", code="cors_origin")
        resp = Response(status=204)
        resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        resp.headers["Access-Control-Max-Age"] = "600"
        return resp

    def check_api_key(self):
        key = self.settings.api_key
        if not key or request.path in OPEN_PATHS or request.method == "OPTIONS":
            return
        if request.method == "GET" and request.path in DISCOVERY_PATHS:
            return
        if key_given(key, bearer(request.headers)):
            return
        raise ApiError(
            401,
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )

    def http_error(self, exc: HTTPException):
        """Werkzeug's HTTP errors (404, 405, 413...) as OpenAI error objects."""
        message, param = exc.description or exc.name, None
        if exc.code == 404:
            message = f"Unknown URL: {request.method} {request.path}."
        elif exc.code == 405:
            message = f"Method {request.method} is not allowed on {request.path}."
        elif exc.code == 413:
            field = {"/v1/voices": "file", "/v1/audio/voices": "audio_sample"}.get(request.path)
            limit = f"{self.settings.max_upload_mb} MiB" if field else "the server's limit"
            message, param = f"The request body is larger than {limit}.", field
        code = exc.name.lower().replace(" ", "_")
        resp = ApiError(exc.code or 500, message, param, code).response()
        if exc.code == 405:
            resp.headers["Allow"] = ", ".join(exc.valid_methods or [])
        return resp

    @staticmethod
    def busy(exc: Busy):
        code = "rate_limit_exceeded" if exc.status == 429 else "server_busy"
        resp = ApiError(exc.status, str(exc), code=code, kind="server_busy").response()
        resp.headers["Retry-After"] = str(exc.retry_after)
        return resp

    @staticmethod
    def client_gone(exc: ClientGone):
        logger.info("client hung up: %s %s", request.method, request.path)
        return ApiError(400, "The client closed the request.", code="client_closed").response()

    @staticmethod
    def internal_error(exc: Exception):
        logger.exception("%s internal error on %s %s", g.get("request_id"), request.method,
                         request.path)  # fmt: skip
        return ApiError(500, "The server had an internal error.", kind="server_error").response()

    # -- small JSON endpoints ---------------------------------------------------------------------

    def ready(self):
        """For load balancers: 503 while draining after SIGTERM, or with no place free and the
        queue full (the next request would be refused here: send it elsewhere)."""
        stats = self.engine.stats()
        full = stats["can_start"] == 0 and stats["queue_depth"] >= stats["max_queue"]
        reason = "draining" if self.draining else "full" if full else None
        body = jsonify(ready=reason is None, reason=reason, active_streams=stats["active_streams"],
                       queue_depth=stats["queue_depth"])  # fmt: skip
        return body, 200 if reason is None else 503

    def metrics(self):
        """Prometheus' text format; behind --metrics_key when it is set."""
        key = self.settings.metrics_key
        if key and not key_given(key, bearer(request.headers)):
            message = "/metrics needs the --metrics_key, as 'Authorization: Bearer <key>'."
            raise ApiError(401, message, code="invalid_api_key")
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.engine.metrics.exposition(), content_type=CONTENT_TYPE_LATEST)

    def health(self):
        if request.args.get("ready"):  # /health?ready=1: the readiness answer
            return self.ready()
        return jsonify(
            status="ok",
            model=Path(self.settings.model_path).name,  # a path would tell where files are
            language=self.engine.language,
            device=self.device,
            sample_rate=self.engine.sample_rate,
            voices=len(self.voices.names()),
            default_voice=self.voices.default.name,
            max_input_chars=self.settings.max_input_chars,
            auth=bool(self.settings.api_key),
            **self.engine.stats(),
        )

    def openapi(self):
        return jsonify(openapi_spec(self.settings))

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
            resolution_order=list(RESOLUTION_ORDER),
        )

    def list_audio_voices(self):
        return jsonify(voices=[{"id": v["id"], "name": v["name"]} for v in self.voices.describe()])

    # -- speech -----------------------------------------------------------------------------------

    def speech(self):
        if (request.content_length or 0) > self.settings.max_body_kb * 1024:
            message = f"The request body exceeds {self.settings.max_body_kb} KiB."
            raise ApiError(413, message, code="request_too_large")
        if request.mimetype not in ("", "application/json"):  # a form post from another site
            message = "Send the request body as JSON, with 'Content-Type: application/json'."
            raise ApiError(415, message, code="unsupported_media_type")
        try:
            body = json.loads(request.get_data(cache=False) or b"null")
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested thousands deep
            body = None
        if body is None:
            message = "We could not parse the JSON body of your request."
            raise ApiError(400, message, code="invalid_json")
        req = parse_speech_request(body, self.settings)
        g.response_format = req.response_format
        script = speech_script(req.input, self.engine.language, req.normalize)
        if len(script_text(script)) > SPOKEN_CHARS_PER_INPUT_CHAR * self.settings.max_input_chars:
            message = "'input' is too long once its numbers and symbols are written out as words."
            raise invalid("input", message, "string_above_max_length")
        try:  # the Engine's voices; a client's mistake is a 400 on `voice`
            voice_state = self.engine.voice(self.requested_voice(req), load=has_words(script))
        except VoiceError as exc:
            raise invalid("voice", str(exc), voice_error_code(exc)) from None
        fmt = FORMATS[req.response_format]
        headers = {
            "Cache-Control": "no-store",
            "Content-Disposition": f'inline; filename="speech.{fmt.name}"',
        }
        gone = request.environ.get("waitress.client_disconnected") or (lambda: False)
        turn = self.engine.turn(script, voice_state, threading.Event(), gone)  # Busy: 429/503
        if not req.stream:
            try:
                data = b"".join(self.audio_chunks(turn, script, req, gone))
            finally:
                turn.close()
            return Response(data, content_type=fmt.content_type, headers=headers)
        if req.stream_format == "sse":
            events = ClosingStream(self.sse_events(turn, script, req, gone), turn.close)
            return Response(events, mimetype="text/event-stream", headers=headers)
        headers["X-Accel-Buffering"] = "no"
        chunks = self.audio_chunks(turn, script, req, gone)
        chunks = first_audio_timed(chunks, self.engine.metrics, "http", g.started)
        return Response(ClosingStream(chunks, turn.close), content_type=fmt.content_type,
                        headers=headers)  # fmt: skip

    def requested_voice(self, req: SpeechRequest) -> str | None:
        """The voice a request names: `voice`, else a `model` that names a voice (LocalAI's way)."""
        if req.voice is None and req.model and req.model not in MODEL_IDS:
            return req.model if self.voices.kind_of(req.model) else None
        return req.voice

    def audio_chunks(self, turn: Turn, script: list, req: SpeechRequest, gone, usage=None):
        """Encoded bytes of the response as they are produced; stops generation when closed.

        The turn's place is freed as soon as generation ends, or at --request_timeout even
        while a slow reader still holds this generator at a `yield`.
        """
        encoder = AudioEncoder(
            FORMATS[req.response_format], self.engine.sample_rate, req.speed, req.stream
        )

        def expire():
            logger.warning("synthesis stopped after --request_timeout")
            turn.release()

        try:  # an encoder left unfinished (the client left) is closed, not left to the GC
            timer = threading.Timer(self.settings.request_timeout, expire)
            timer.daemon = True
            timer.start()
            try:
                for samples in turn.audio:
                    if gone():
                        raise ClientGone
                    if turn.stop.is_set():  # the deadline passed
                        break
                    data = encoder.encode(samples)
                    if data:
                        yield data
            except ClientGone:
                if not req.stream:
                    raise
                return  # nobody is listening: no file to finish
            except Exception:
                if not req.stream:
                    raise
                # Headers are gone: log, and end the file cleanly with the audio made so far.
                logger.exception("synthesis failed after the response started")
            finally:
                timer.cancel()
                turn.close()  # the model is free for the next request while the last bytes leave
                if usage is not None:
                    usage["samples"] = encoder.samples_in
            yield encoder.finish()
        finally:
            encoder.close()

    def sse_events(self, turn: Turn, script: list, req: SpeechRequest, gone):
        """OpenAI's speech SSE stream: audio deltas, then a done event with usage, then [DONE]."""
        usage: dict[str, int] = {}
        for data in self.audio_chunks(turn, script, req, gone, usage):
            if data:
                delta = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                yield f"data: {json.dumps(delta)}\n\n"
        samples_per_token = self.engine.sample_rate / self.engine.frame_rate
        text = script_text(script)
        input_tokens = self.engine.count_tokens(text) if text else 0
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

    # -- voice management -------------------------------------------------------------------------

    def voice_details(self, name: str) -> dict[str, Any]:
        entry = next((v for v in self.voices.describe() if v["id"] == name), None)
        if entry is None:
            raise ApiError(404, f"No voice named {name!r}.", "name", "voice_not_found")
        if entry["kind"] == "custom":
            try:
                source = self.voices.lookup(name)
                path = Path(source.ref)
                entry.update(
                    source=path.name,
                    bytes=path.stat().st_size,
                    duration=None if source.is_state_file else audio_seconds(path),
                    cached=self.engine.states.cache.status(self.engine.states.content_key(source)),
                    usable=True,
                )
            except (VoiceError, OSError) as exc:  # a broken entry in the voices folder
                message = str(exc) if isinstance(exc, VoiceError) else "it cannot be read."
                entry.update(source=entry["file"], usable=False, error=message)
        else:
            entry["source"] = entry.get("maps_to", name)
        return entry

    def get_voice(self, name: str):
        return jsonify(self.voice_details(self.find_voice_name(name)))

    def find_voice_name(self, name: str) -> str:
        """The listed id for a name given by stem, file name, or in another case."""
        kind = self.voices.kind_of(name)
        if kind == "custom":
            return self.voices.custom_voice(name).stem
        return name.lower() if kind else name

    def upload_voice(self):
        """POST /v1/voices: a recording (multipart `file`, optional `name`) becomes a voice."""
        name = self.store_voice(request.files.get("file"), request.form.get("name"), "file")
        resp = jsonify(self.voice_details(name))
        resp.status_code = 201
        return resp

    def create_audio_voice(self):
        """POST /v1/audio/voices, OpenAI's custom voices: `audio_sample`, `name`, `consent`."""
        if (request.form.get("type") or "audio_sample") != "audio_sample":
            raise invalid("type", "Only voices from an 'audio_sample' can be created here.")
        upload, name = request.files.get("audio_sample"), request.form.get("name")
        name = self.store_voice(upload, name, "audio_sample")
        created = self.voices.custom_voice(name).stat().st_mtime
        return jsonify(id=name, object="audio.voice", name=name, created_at=int(created),
                       type="audio_sample")  # fmt: skip

    def store_voice(self, upload, name: str | None, field: str) -> str:
        """Validate, encode once and store an uploaded recording; return the new voice's name."""
        name = (name or "").strip()
        if upload is None or not upload.filename:
            raise invalid(field, f"Send the recording as a multipart field named '{field}'.")
        suffix = Path(upload.filename).suffix.lower()
        if suffix not in AUDIO_EXTENSIONS:
            allowed = ", ".join(AUDIO_EXTENSIONS)
            raise invalid(field, f"'{field}' must be an audio file ({allowed}).")
        name = name or Path(upload.filename).stem
        if not VOICE_NAME.fullmatch(name) or name.lower().endswith(AUDIO_EXTENSIONS):
            raise invalid(
                "name",
                "'name' must be 1-64 letters, digits, spaces or ._()- and start with a letter or "
                "digit.",
            )
        taken = ApiError(409, f"A voice named {name!r} already exists.", "name", "voice_exists")
        if self.voices.kind_of(name) is not None:
            raise taken
        limit = self.settings.max_upload_mb * 1024 * 1024
        data = upload.read(limit + 1)
        if len(data) > limit:
            message = f"'{field}' is larger than {self.settings.max_upload_mb} MiB."
            raise ApiError(413, message, field, "file_too_large")
        folder = self.voices.voices_dir
        tmp = temp_file(folder, "upload", suffix)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        except OSError:
            raise voices_dir_unwritable() from None
        source = VoiceSource("file", str(tmp), name)
        kept = False
        try:
            self.engine.voice_state(source)  # validates, and encodes the latents once
            if self.hung_up():  # nobody is waiting for this voice: do not create it
                raise ClientGone
            with self.naming:  # two uploads of one name, here or on a replica: one wins
                if not self.voices.claim(tmp, f"{name}{suffix}", name):
                    raise taken
                kept = True
        except VoiceError as exc:
            raise invalid(field, str(exc)) from None
        except OSError:
            raise voices_dir_unwritable() from None
        finally:
            if not kept:
                self.forget_orphan(source)
            tmp.unlink(missing_ok=True)
        return name

    def forget_orphan(self, source: VoiceSource):
        """Drop the cached latents of an upload that was not kept, unless a voice shares them."""
        with contextlib.suppress(OSError):
            self.forget_unshared(self.engine.states.content_key(source))

    def forget_unshared(self, key: str):
        """Drop the cached latents `key`, unless a voice in the voices folder has those bytes."""
        states, in_use = self.engine.states, set()
        for path in self.voices.custom_files().values():
            with contextlib.suppress(OSError):
                in_use.add(states.content_key(VoiceSource("file", str(path), path.stem)))
        if key not in in_use:
            states.cache.forget(key)

    @staticmethod
    def hung_up() -> bool:
        """Whether the client of the current request has closed its connection."""
        gone = request.environ.get("waitress.client_disconnected")
        return bool(gone and gone())

    def delete_voice(self, name: str):
        """DELETE /v1/voices/<name>."""
        return jsonify(id=self.remove_voice(name), object="voice", deleted=True)

    def delete_audio_voice(self, name: str):
        """DELETE /v1/audio/voices/<id>, OpenAI's shape."""
        return jsonify(id=self.remove_voice(name), object="audio.voice.deleted", deleted=True)

    def remove_voice(self, name: str) -> str:
        """Remove an uploaded (voices-dir) voice and its cached latents; return its id.

        The default voice and the targets of OpenAI names are in use and stay. A broken entry
        (a dangling link, a FIFO, an empty file) is removed itself, never what it points to.
        """
        kind = self.voices.kind_of(name)
        if kind is None:
            raise ApiError(404, f"No voice named {name!r}.", "name", "voice_not_found")
        if kind != "custom":
            raise ApiError(
                403, f"{name!r} is a {kind} voice and cannot be deleted.", "name", "not_deletable"
            )
        entry = self.voices.custom_voice(name)
        in_use = {self.voices.default.name, *self.voices.voice_map.values()}
        if entry.stem.lower() in {v.lower() for v in in_use}:
            message = (
                f"{entry.stem!r} is in use as this server's default voice or as the voice of an "
                "OpenAI voice name (--default_voice, --voice_map), so it stays."
            )
            raise ApiError(409, message, "name", "voice_in_use")
        key = None
        with contextlib.suppress(VoiceError, OSError):
            key = self.engine.states.content_key(self.voices.lookup(name))
        try:
            entry.unlink(missing_ok=True)
            with self.naming:
                self.voices.mark_uploaded(entry.name, False)
        except IsADirectoryError:
            message = f"{entry.name!r} is a folder, not a voice file: remove it on the server."
            raise ApiError(409, message, "name", "not_deletable") from None
        except OSError:
            raise voices_dir_unwritable() from None
        if key is not None:  # another voice with the same bytes keeps them (issue #19)
            self.forget_unshared(key)
        return entry.stem

    # -- page -------------------------------------------------------------------------------------

    def page(self):
        return Response(PAGE_HTML, content_type="text/html; charset=utf-8")

    def logo(self):
        return self.embedded(LOGO_PNG, "image/png")

    def favicon(self):
        return self.embedded(FAVICON_SVG, "image/svg+xml")

    @staticmethod
    def embedded(body, content_type: str) -> Response:
        """A file embedded in this module: browsers keep it for a day."""
        headers = {"Cache-Control": "public, max-age=86400"}
        return Response(body, content_type=content_type, headers=headers)


# =================================================================================================
# Other protocols: the Engine from an event loop
# =================================================================================================
# Wyoming and the voice-agent WebSockets run on asyncio; the Engine blocks. They take voices by
# name from the Engine (`Engine.voice`, run on the loop's thread pool; a VoiceError is each
# protocol's to tell), and take Engine turns through `engine_audio`, on a LoopThread.


@dataclass(frozen=True)
class Service:
    """What the other protocols use of the server: its settings and its Engine (voices by name,
    turns, metrics, the model's language); never the HTTP application."""

    settings: Settings
    engine: Engine


class ProtocolServerError(RuntimeError):
    """A protocol's server (Wyoming, the voice-agent WebSockets) could not start."""


def port_unusable(name: str, host: str, port: int, exc: Exception) -> str:
    """What start-up says of a port it cannot listen on (any protocol's, HTTP's too)."""
    reason = getattr(exc, "strerror", None) or exc  # "Address already in use", not "[Errno 98]…"
    return f"the {name} port {host}:{port} cannot be opened ({reason})."


class LoopThread:
    """An asyncio event loop on a thread of its own, with a pool of threads for the Engine's
    blocking calls (a stream waiting for a place holds one). `stop` ends the loop, joins its
    thread and shuts the pool down."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.pool = concurrent.futures.ThreadPoolExecutor(64, name)
        self.loop.set_default_executor(self.pool)
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine, timeout: float = 10.0):
        """Run `coroutine` on the loop and wait for its result."""
        return self.submit(coroutine).result(timeout=timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)
        if not self.thread.is_alive():
            self.loop.close()


async def engine_audio(engine: Engine, script: list, state, stop: threading.Event, gone=None):
    """An Engine turn, asynchronously: a place in the queue (Busy, or ClientGone once `gone()`),
    then each chunk of audio as it is made. However the caller ends (done, an error, cancelled),
    the turn is closed; a thread inside the Engine is waited for, never abandoned."""
    loop = asyncio.get_running_loop()
    taking = loop.run_in_executor(None, engine.turn, script, state, stop, gone)
    try:
        turn = await asyncio.shield(taking)
    except asyncio.CancelledError:  # a place won after all is given back
        taking.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
        raise
    pending = None
    try:
        while True:
            pending = loop.run_in_executor(None, next, turn.audio, None)
            samples = await asyncio.shield(pending)
            if samples is None:
                return
            yield samples
    finally:
        stop.set()
        if pending is not None and not pending.done():
            await asyncio.wait([pending])
        await loop.run_in_executor(None, turn.close)


# =================================================================================================
# Wyoming protocol (Home Assistant's voice pipelines), served beside HTTP by the same Engine
# =================================================================================================

SENTENCE_END = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"')\]]))\s+")  # space after a sentence


def split_finished(text: str, checked: int = 0) -> tuple[list[str], str]:
    """Finished sentences of streamed text, and the unfinished rest to wait on.

    checked: how much of `text` is known to end no sentence (a rest returned before): only what
    follows it (and the 2 characters a sentence end looks back at) is searched, so text streamed
    in many small pieces without a sentence end costs linear time, not quadratic."""
    if not SENTENCE_END.search(text, max(0, checked - 2)):
        return [], text
    parts = SENTENCE_END.split(text)
    return [p for p in parts[:-1] if p.strip()], parts[-1]


def wyoming_info(service: Service):
    """The `info` answer: one TTS program and its voices, each with its language."""
    from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

    language = LANGUAGES.get(service.engine.language, LANGUAGES["english"]).code
    kyutai = Attribution(name="Kyutai", url="https://github.com/kyutai-labs/pocket-tts")
    default = service.engine.catalog.default.name

    def voice(name: str, about: str) -> TtsVoice:
        if name == default:
            about += " (the server's default voice)"
        return TtsVoice(name=name, attribution=kyutai, installed=True, description=about,
                        version=None, languages=[language])  # fmt: skip

    voices = [voice(e["id"], "pocket-tts built-in voice" if e["kind"] == "builtin"
                    else f"voice cloned from {e.get('file')}")
              for e in service.engine.catalog.describe() if e["kind"] != "openai"]  # fmt: skip
    if default not in [v.name for v in voices]:  # a default given as a path
        voices.append(voice(default, "cloned from a recording"))
    program = TtsProgram(name=SERVER_NAME, attribution=kyutai, installed=True, version="1.0",
                         description="Kyutai pocket-tts: fast voice cloning TTS", voices=voices,
                         supports_synthesize_streaming=True)  # fmt: skip
    return Info(tts=[program])


MAX_WYOMING_EVENT_BYTES = 1 << 20  # an event's data or payload (a TTS client sends text only)


class WyomingTooLarge(ValueError):
    """An event header that declares more than MAX_WYOMING_EVENT_BYTES, or no line end."""


async def read_wyoming_event(reader):
    """wyoming's async_read_event, every size bounded: the header line by the reader's limit
    (64 KiB), its data and payload by MAX_WYOMING_EVENT_BYTES. None at the end of the stream."""
    from wyoming.event import Event

    try:
        line = await reader.readline()
    except (asyncio.LimitOverrunError, ValueError):
        raise WyomingTooLarge("An event header line is too long.") from None
    if not line:
        return None
    header = json.loads(line)  # ValueError: malformed, answered as such
    parts = {}
    for key in ("data_length", "payload_length"):
        size = header.get(key) or 0
        if not isinstance(size, int) or not 0 <= size <= MAX_WYOMING_EVENT_BYTES:
            raise WyomingTooLarge(f"'{key}' must be at most {MAX_WYOMING_EVENT_BYTES} bytes.")
        parts[key] = await reader.readexactly(size) if size else None
    data = dict(header.get("data") or {})
    if parts["data_length"]:
        data.update(json.loads(parts["data_length"]))
    return Event(type=header["type"], data=data, payload=parts["payload_length"])


class WyomingSession:
    """One Wyoming connection: `synthesize`, and streamed `synthesize-start/-chunk/-stop`.

    Audio goes out as it is generated (audio-start, audio-chunk..., audio-stop per text). In a
    streamed request each sentence is spoken as soon as its end arrives, in order, by one task;
    a disconnect stops its generation and frees its place at once. Connections are bounded as
    HTTP's are: at most --max_connections, closed after --idle_timeout with nothing to do, every
    event's size capped.
    """

    def __init__(self, service: Service, reader, writer, sessions: set):
        from wyoming.server import AsyncEventHandler

        class Handler(AsyncEventHandler):
            async def handle_event(handler, event) -> bool:  # noqa: N805
                return await self.handle(event)

            async def run(handler):  # noqa: N805
                await self.serve()

        self.service, self.handler, self.sessions = service, Handler(reader, writer), sessions
        self.closed = False  # the client left
        self.stops: set[threading.Event] = set()  # one per synthesis running now
        self.streaming: dict[str, Any] | None = None  # voice, pending text, sentence queue, task

    async def serve(self):
        """Admit the connection (or say `busy`), then read its events; close it however it ends."""
        settings = self.service.settings
        try:
            if len(self.sessions) >= settings.max_connections:
                await self.error("Too many connections: retry later.", "busy")
                return
            self.sessions.add(self)
            with self.service.engine.metrics.session("wyoming"):
                await self.read_events()
        finally:
            self.sessions.discard(self)
            self.close()
            self.handler.writer.close()

    async def read_events(self):
        """Events until the client leaves, goes idle, or breaks a limit."""
        settings = self.service.settings
        while True:
            try:
                read = read_wyoming_event(self.handler.reader)
                event = await asyncio.wait_for(read, settings.idle_timeout)
            except asyncio.TimeoutError:
                if self.stops or self.streaming:  # speaking: not idle
                    continue
                return
            except WyomingTooLarge as exc:
                await self.error(str(exc), "too_large")
                return
            except (ValueError, KeyError, TypeError, AttributeError):
                await self.error("The event is not what the Wyoming protocol defines.", "bad")
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if event is None or not await self.handle(event):
                return

    async def handle(self, event) -> bool:
        from wyoming.info import Describe
        from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

        try:
            if Describe.is_type(event.type):
                await self.handler.write_event(wyoming_info(self.service).event())
            elif SynthesizeStart.is_type(event.type):
                await self.start_stream(SynthesizeStart.from_event(event).voice)
            elif SynthesizeChunk.is_type(event.type) and self.streaming:
                await self.add_text(SynthesizeChunk.from_event(event).text)
            elif SynthesizeStop.is_type(event.type) and self.streaming:
                await self.end_stream()
            elif Synthesize.is_type(event.type) and not self.streaming:  # else: compatibility copy
                request = Synthesize.from_event(event)
                await self.speak(request.text, self.voice_name(request.voice))
        except (KeyError, TypeError, ValueError, AttributeError):  # malformed event data
            await self.error("The event's data is not what the Wyoming protocol defines.", "bad")
        return True

    @staticmethod
    def voice_name(voice) -> str | None:
        return voice.name if voice is not None and isinstance(voice.name, str) else None

    async def error(self, text: str, code: str):
        from wyoming.error import Error

        await self.handler.write_event(Error(text=text, code=code).event())

    # -- streamed text ----------------------------------------------------------------------------

    async def start_stream(self, voice):
        if self.streaming:  # a new start abandons the stream before it (its task ends here)
            self.streaming["task"].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.streaming["task"]
        sentences: asyncio.Queue = asyncio.Queue()
        voice = self.voice_name(voice)
        self.streaming = {"voice": voice, "text": "", "chars": 0, "sentences": sentences}
        self.streaming["task"] = asyncio.create_task(self.speak_stream(voice, sentences))

    async def add_text(self, text: str):
        stream, text = self.streaming, str(text)
        stream["chars"] += len(text)
        if stream["chars"] > self.service.settings.max_input_chars:
            self.streaming = None
            stream["task"].cancel()
            await self.too_long()
            return
        pending = stream["text"]
        finished, stream["text"] = split_finished(pending + text, len(pending))
        for sentence in finished:
            stream["sentences"].put_nowait(sentence)

    async def end_stream(self):
        from wyoming.tts import SynthesizeStopped

        stream, self.streaming = self.streaming, None
        if stream["text"].strip():
            stream["sentences"].put_nowait(stream["text"])
        stream["sentences"].put_nowait(None)
        await stream["task"]
        await self.handler.write_event(SynthesizeStopped().event())

    async def speak_stream(self, voice: str | None, sentences: asyncio.Queue):
        """Speak each finished sentence in order (the voice given at the start: events that
        arrived in one read may have ended the stream before this task first runs)."""
        while (sentence := await sentences.get()) is not None:
            await self.speak(sentence, voice)

    # -- speech -----------------------------------------------------------------------------------

    async def speak(self, text: str, voice: str | None):
        """audio-start, audio-chunks as the Engine makes them, audio-stop; or an error event."""
        from wyoming.audio import AudioChunk, AudioStart, AudioStop

        service, loop, asked = self.service, asyncio.get_running_loop(), time.monotonic()
        if len(text) > service.settings.max_input_chars:
            return await self.too_long()
        script = speech_script(text, service.engine.language)
        try:  # the Engine's voices, errors as Wyoming `error` events
            state = await loop.run_in_executor(None, service.engine.voice, voice, has_words(script))
        except VoiceError as exc:
            return await self.error(str(exc), voice_error_code(exc))
        except Busy as exc:
            return await self.error(str(exc), "busy")
        rate, stop = service.engine.sample_rate, threading.Event()
        self.stops.add(stop)
        deadline = loop.time() + service.settings.request_timeout  # as HTTP's
        timer = loop.call_at(deadline, stop.set)
        audio = engine_audio(service.engine, script, state, stop, self.gone)

        async def send(eventable):  # a client that stops reading holds its place until the deadline
            await asyncio.wait_for(self.handler.write_event(eventable.event()),
                                   max(0.0, deadline - loop.time()) + 1.0)  # fmt: skip

        try:
            async with contextlib.aclosing(audio):
                started = False  # audio-start once a place is won: else a `busy` error
                async for samples in audio:
                    if not started:
                        service.engine.metrics.first_audio.labels("wyoming").observe(
                            time.monotonic() - asked
                        )
                        await send(AudioStart(rate=rate, width=2, channels=1))
                        started = True
                    await send(AudioChunk(rate=rate, width=2, channels=1, audio=pcm16(samples)))
            if not started:
                await send(AudioStart(rate=rate, width=2, channels=1))
            await send(AudioStop())
        except (Busy, ClientGone) as exc:
            await self.error(str(exc) or "The client left.", "busy")
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            logger.warning("a Wyoming client stopped reading: its connection is closed")
            self.close()
            self.handler.writer.close()
        except GenerationFailed:
            logger.exception("synthesis failed")
            await self.error("The model failed on this text and voice.", "synthesis_failed")
        finally:
            timer.cancel()
            self.stops.discard(stop)

    async def too_long(self):
        limit = self.service.settings.max_input_chars
        await self.error(f"The text is longer than {limit} characters.", "too_long")

    def gone(self) -> bool:
        return self.closed

    def close(self):
        """The client left: stop its generation now."""
        self.closed = True
        for stop in list(self.stops):
            stop.set()
        if self.streaming:
            self.streaming["task"].cancel()


def wyoming_service_info(port: int, host: str, name: str | None = None):
    """The mDNS announcement Home Assistant discovers (_wyoming._tcp), built without network."""
    from zeroconf import ServiceInfo

    name = name or f"{SERVER_NAME}-{socket.gethostname()}"
    return ServiceInfo("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.",
                       addresses=[socket.inet_aton(host)], port=port,
                       properties={"name": SERVER_NAME})  # fmt: skip


class WyomingError(ProtocolServerError):
    """The Wyoming server could not start."""


class WyomingServer:
    """Wyoming on an event loop thread of its own, announced over mDNS if asked; `close` stops
    the listening socket, the announcement, the loop and its threads."""

    def __init__(self, service: Service, host: str, port: int, zeroconf: bool = False):
        from wyoming.server import AsyncTcpServer

        self.loop, self.sessions = LoopThread("wyoming"), set()
        self.tcp, self.zeroconf = AsyncTcpServer(host, port), None
        raise_open_files_limit(2 * service.settings.max_connections + 64)  # HTTP's and Wyoming's

        def handler(reader, writer):
            return WyomingSession(service, reader, writer, self.sessions).handler

        try:
            self.loop.run(self.tcp.start(handler))
        except (OSError, concurrent.futures.TimeoutError) as exc:
            self.loop.stop()
            raise WyomingError(port_unusable("Wyoming", host, port, exc)) from None
        self.port = self.tcp._server.sockets[0].getsockname()[1]
        if zeroconf:
            from zeroconf.asyncio import AsyncZeroconf

            address = (
                host if host not in ("0.0.0.0", "") else socket.gethostbyname(socket.gethostname())
            )
            self.zeroconf = AsyncZeroconf()
            self.loop.submit(self.zeroconf.async_register_service(wyoming_service_info(
                self.port, address)))  # fmt: skip
        logger.info("Wyoming on tcp://%s:%d%s", host, self.port,
                    " (announced over mDNS)" if zeroconf else "")  # fmt: skip

    def close(self):
        if self.zeroconf is not None:
            with contextlib.suppress(Exception):
                self.loop.run(self.zeroconf.async_close())
        with contextlib.suppress(Exception):
            self.loop.run(self.tcp.stop())
        self.loop.stop()


# =================================================================================================
# Voice agents: streamed text in over WebSocket (Gradium's and ElevenLabs' protocols)
# =================================================================================================
# Voice-agent frameworks (Pipecat, LiveKit Agents) stream an LLM's tokens into a TTS WebSocket
# and play the audio that comes back at once, with word timings. This serves the protocols whose
# clients they ship, so that those clients work with only their URL changed:
#   Gradium      /api/speech/tts                               gradium SDK, Pipecat, LiveKit
#   ElevenLabs   /v1/text-to-speech/{voice}/multi-stream-input Pipecat, LiveKit
#                /v1/text-to-speech/{voice}/stream-input       the elevenlabs SDK
# They run on the `websockets` library's asyncio server on --ws_port (waitress, the HTTP server,
# has no WebSocket upgrade). Streamed text becomes a unit of speech at each sentence end, at a
# flush, or (ElevenLabs without auto_mode) once its chunk schedule's characters have gathered;
# each unit is spoken through the Engine as HTTP's requests are (voices, admission, batching).

AGENT_SCHEDULE = (120, 160, 250, 290)  # ElevenLabs' default chunk_length_schedule (characters)
MAX_CONTEXTS = 8  # open at once on one socket (ElevenLabs allows 5)
WIRE_FORMAT = re.compile(r"(pcm|wav|mp3|opus|ulaw|alaw)(?:_(\d{4,5}))?(?:_(\d{2,3}))?")
WIRE_RATES = {"opus": (8000, 12000, 16000, 24000, 48000), "ulaw": (8000,), "alaw": (8000,)}
PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass(frozen=True)
class WireFormat:
    """An output format of the agent protocols (`pcm_16000`, `mp3_44100_128`, `ulaw_8000`)."""

    name: str
    fmt: AudioFormat
    rate: int

    def encoder(self, model_rate: int) -> AudioEncoder:
        return AudioEncoder(self.fmt, model_rate, rate=self.rate)


def wire_format(name, default_rate: int) -> WireFormat:
    """Parse an output format; a bare codec (Gradium's `pcm`, `wav`) is at `default_rate`.
    ValueError says what is possible."""
    match = WIRE_FORMAT.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"Unknown output format {name!r}: use pcm_<rate> (8000 to 48000), "
                         "mp3_<rate>_<kbps>, opus_48000, ulaw_8000, alaw_8000, pcm, wav or "
                         "opus.")  # fmt: skip
    codec, rate, kbps = match.group(1), int(match.group(2) or default_rate), match.group(3)
    if codec in ("ulaw", "alaw") and match.group(2) is None:
        rate = 8000
    if rate not in WIRE_RATES.get(codec, PCM_RATES):
        raise ValueError(f"Output format {name!r}: {codec} is not available at {rate} Hz.")
    fmt = WIRE_FORMATS[codec]
    if kbps:
        fmt = replace(fmt, bit_rate=int(kbps) * 1000)
    return WireFormat(name, fmt, rate)


class TextTooLong(ValueError):
    """A context's streamed text went past --max_input_chars."""


SENTENCE_AT_END = re.compile(r"[^\W\d_][.!?…]+[\"')\]]*\Z")  # "world." ends it; "3." may not


class TextIn:
    """A context's streamed text, cut into units to speak: at each sentence end, at a flush, and,
    with a `schedule`, once schedule[n] characters have gathered without one (cut at a space).

    A message that ends a sentence ends a unit at once: Pipecat sends whole sentences with no
    space after them ("Hello world.", then "How are you?"), and its next sentence may be seconds
    away. A word ending with a digit and a point ("3.") waits: "14" may follow.
    """

    def __init__(self, limit: int, schedule: tuple[int, ...] | None = None):
        self.limit, self.schedule = limit, schedule
        self.pending, self.received, self.units = "", 0, 0

    def add(self, text: str) -> list[str]:
        self.received += len(text)
        if self.received > self.limit:
            raise TextTooLong(f"The text is longer than {self.limit} characters.")
        units, self.pending = split_finished(self.pending + text, len(self.pending))
        if SENTENCE_AT_END.search(self.pending):
            units.append(self.pending)
            self.pending = ""
        elif self.schedule:
            wanted = self.schedule[min(self.units + len(units), len(self.schedule) - 1)]
            cut = self.pending.rfind(" ", 0, len(self.pending) - 1)
            if len(self.pending) >= wanted and cut > 0:
                units.append(self.pending[:cut])
                self.pending = self.pending[cut + 1 :]
        self.units += len(units)
        return units

    def flush(self) -> list[str]:
        rest, self.pending = self.pending, ""
        self.units += bool(rest.strip())
        return [rest] if rest.strip() else []


def word_spans(text: str, start: float, stop: float) -> list[tuple[str, float, float]]:
    """Each word of a unit with its start and stop in seconds, estimated: the unit's time (exact:
    it is the audio we made) shared out by characters, a word's letters and the space after it.
    So they rise monotonically, cover every word once and end where the unit's audio ends."""
    words = text.split()
    total, at, spans = sum(len(w) + 1 for w in words), start, []
    for word in words:
        end = at + (stop - start) * (len(word) + 1) / total
        spans.append((word, round(at, 3), round(end, 3)))
        at = end
    return spans


def char_alignment(text: str, seconds: float) -> dict[str, list]:
    """ElevenLabs' alignment of a unit: each character with its start and duration in ms from the
    unit's start, the unit's time shared out evenly by character (as `word_spans` does)."""
    step = seconds * 1000 / max(1, len(text))
    starts = [round(i * step) for i in range(len(text))]
    ends = starts[1:] + [round(seconds * 1000)]
    return {"chars": list(text), "charStartTimesMs": starts,
            "charDurationsMs": [e - s for s, e in zip(starts, ends, strict=True)]}  # fmt: skip


class ContextFailed(Exception):
    """A unit could not be spoken: the message and code for the client."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class SpeechContext:
    """One stream of text in and audio out (a Gradium request, an ElevenLabs context).

    Units are spoken in order by one task, into one encoder, on one clock (samples sent). The
    protocol session is the `listener`: `audio(ctx, bytes)`, `spoken(ctx, unit, start, stop)`
    after each unit, `flushed(ctx)` when a flush's audio is out, `finished(ctx)` at the end and
    `failed(ctx, ContextFailed)`. `close` drops the text not yet flushed (the unit speaking now
    too, if it was not flushed); flushed text is still spoken in full, as the clients expect.
    """

    def __init__(self, service: Service, key, state, wire: WireFormat, listener,
                 schedule: tuple[int, ...] | None = None):  # fmt: skip
        self.service, self.key, self.state, self.listener = service, key, state, listener
        self.text = TextIn(service.settings.max_input_chars, schedule)
        self.rate = service.engine.sample_rate
        self.encoder = wire.encoder(self.rate)
        self.queue: asyncio.Queue = asyncio.Queue()  # (kind, text, index); None ends
        self.samples = 0  # at the model's rate, spoken so far: the clock of the timings
        self.queued = self.flushed = 0  # units queued; those before `flushed` are kept on close
        self.speaking: tuple[int, threading.Event] | None = None
        self.closing = self.ended = self.gone = False
        self.task = asyncio.create_task(self.run())

    # -- what the protocol calls ----------------------------------------------------------------

    def add(self, text: str):
        for unit in self.text.add(text):
            self._queue("unit", unit)

    def flush(self):
        for unit in self.text.flush():
            self._queue("unit", unit)
        self.flushed = self.queued
        self.queue.put_nowait(("flush", "", self.queued))

    def close(self):
        """Stop what was not flushed (within a step), speak what was, then finish."""
        self.text.pending, self.closing = "", True
        if self.speaking and self.speaking[0] >= self.flushed:
            self.speaking[1].set()
        self.end(flush=False)

    def end(self, flush: bool = True):
        """Everything sent is spoken, then the context finishes."""
        if flush:
            self.flush()
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(None)

    def cancel(self):
        """The client left: stop at once (a unit still waiting for a place leaves the queue)."""
        self.gone = True
        if self.speaking:
            self.speaking[1].set()
        self.task.cancel()

    def _queue(self, kind: str, text: str):
        self.queue.put_nowait((kind, text, self.queued))
        self.queued += 1

    # -- the task -------------------------------------------------------------------------------

    async def run(self):
        from websockets.exceptions import ConnectionClosed

        try:
            while (item := await self.queue.get()) is not None:
                kind, text, index = item
                if kind == "flush":
                    await self.listener.flushed(self)
                elif not (self.closing and index >= self.flushed):
                    await self.speak(text, index)
            tail = self.encoder.finish()
            if tail:
                await self.listener.audio(self, tail)
            await self.listener.finished(self)
        except ContextFailed as exc:
            await self.listener.failed(self, exc)
        except ConnectionClosed:
            pass  # the client left: the socket's handler cancels its contexts
        finally:
            self.encoder.close()

    async def speak(self, unit: str, index: int):
        """One unit through the Engine: its audio as it is made, then its timings."""
        service, loop, asked = self.service, asyncio.get_running_loop(), time.monotonic()
        script, start = speech_script(unit, service.engine.language), self.samples
        stop = threading.Event()
        self.speaking = (index, stop)
        timer = loop.call_later(service.settings.request_timeout, stop.set)
        try:
            audio = engine_audio(service.engine, script, self.state, stop, lambda: self.gone)
            async with contextlib.aclosing(audio):
                async for samples in audio:
                    if asked is not None:
                        seconds, asked = time.monotonic() - asked, None
                        service.engine.metrics.first_audio.labels("websocket").observe(seconds)
                    self.samples += samples.size
                    data = self.encoder.encode(samples)
                    if data:
                        await self.listener.audio(self, data)
        except (Busy, ClientGone) as exc:
            raise ContextFailed(str(exc) or "The server is busy: retry later.", "busy") from None
        except GenerationFailed:
            logger.exception("synthesis failed")
            message = "The model failed on this text and voice."
            raise ContextFailed(message, "synthesis_failed") from None
        finally:
            timer.cancel()
            self.speaking = None
        spoken = script_text(script)
        await self.listener.spoken(self, unit, spoken, start / self.rate, self.samples / self.rate)


class AgentSession:
    """What both protocols share: the socket, its contexts, bounded sends, and errors."""

    default_rate = 48000

    def __init__(self, service: Service, ws, query: dict[str, str]):
        self.service, self.ws, self.query = service, ws, query
        self.contexts: dict[Any, SpeechContext] = {}

    async def send(self, message: dict):
        """One JSON message; a client that stops reading is closed after --idle_timeout."""
        try:
            await asyncio.wait_for(self.ws.send(json.dumps(message)),
                                   self.service.settings.idle_timeout)  # fmt: skip
        except asyncio.TimeoutError:
            logger.warning("a WebSocket client stopped reading: its connection is closed")
            await self.ws.close(1008, "the client stopped reading")

    async def open_context(self, key, voice: str | None, wire: WireFormat, schedule=None):
        """A context with its voice loaded; ContextFailed (an unusable voice, too many
        contexts) is the caller's to tell."""
        if len(self.contexts) >= MAX_CONTEXTS:
            message = f"At most {MAX_CONTEXTS} contexts may be open on one socket."
            raise ContextFailed(message, "too_many_contexts")
        loop = asyncio.get_running_loop()
        try:
            state = await loop.run_in_executor(None, self.service.engine.voice, voice)
        except VoiceError as exc:
            raise ContextFailed(str(exc), voice_error_code(exc)) from None
        context = SpeechContext(self.service, key, state, wire, self, schedule)
        self.contexts[key] = context
        return context

    def busy(self) -> bool:
        return bool(self.contexts)

    def cancel(self):
        """The socket is gone: every context stops now and frees its place."""
        for context in self.contexts.values():
            context.cancel()
        self.contexts.clear()

    async def failed(self, context, exc: ContextFailed):
        """A context could not go on: it is gone, and its client told in the protocol's words."""
        self.contexts.pop(context.key, None)
        await self.error(str(exc), exc.code, context.key)

    async def handle(self, message: dict):
        raise NotImplementedError

    async def error(self, message: str, code: str, key=None):
        raise NotImplementedError


class GradiumSession(AgentSession):
    """Gradium's TTS protocol: `setup` → `ready`; `text`; `flush` → `flushed`; `end_of_stream` →
    the rest of the audio, `end_of_stream`, and the socket closed (unless the setup said
    `close_ws_on_eos: false`). Several requests share a socket when each setup names a
    `client_req_id` (Pipecat's way); every answer echoes it. Audio is base64 in `audio`
    messages, word timings are `text` messages with `start_s` / `stop_s`."""

    CODES = {"busy": 1013, "synthesis_failed": 1011}  # else 1008, a policy violation

    def __init__(self, service, ws, query):
        super().__init__(service, ws, query)
        self.close_on_eos = True

    async def handle(self, message: dict):
        kind, key = message.get("type"), message.get("client_req_id")
        if kind == "setup":
            await self.setup(message, key)
            return
        context = self.contexts.get(key)
        if context is None:
            await self.error(
                "Send a setup message first (for this client_req_id).", "no_setup", key
            )
            return
        if kind == "text":
            try:
                context.add(str(message.get("text", "")))
            except TextTooLong as exc:
                await self.error(str(exc), "too_long", key)
        elif kind == "flush":
            context.flush()
        elif kind == "end_of_stream":
            context.end()
        else:
            await self.error(f"Unknown message type {kind!r}.", "bad_message", key)

    async def setup(self, message: dict, key):
        if key in self.contexts:
            await self.error("This request was set up already.", "bad_message", key)
            return
        try:
            wire = wire_format(message.get("output_format", "pcm"), self.default_rate)
            voice = message.get("voice_id") or message.get("voice")
            await self.open_context(key, voice if isinstance(voice, str) else None, wire)
        except ContextFailed as exc:  # an unusable voice, too many requests on the socket
            await self.error(str(exc), exc.code, key)
            return
        except ValueError as exc:  # the output format
            await self.error(str(exc), "bad_setup", key)
            return
        if message.get("close_ws_on_eos") is False:
            self.close_on_eos = False
        await self.send(self.tagged({"type": "ready", "request_id": str(uuid.uuid4()),
                                     "sample_rate": wire.rate}, key))  # fmt: skip

    @staticmethod
    def tagged(message: dict, key) -> dict:
        return message if key is None else message | {"client_req_id": key}

    async def audio(self, context, data: bytes):
        message = {"type": "audio", "audio": base64.b64encode(data).decode()}
        await self.send(self.tagged(message, context.key))

    async def spoken(self, context, unit: str, spoken: str, start: float, stop: float):
        for word, begin, end in word_spans(unit, start, stop):
            message = {"type": "text", "text": word, "start_s": begin, "stop_s": end}
            await self.send(self.tagged(message, context.key))

    async def flushed(self, context):
        await self.send(self.tagged({"type": "flushed"}, context.key))

    async def finished(self, context):
        self.contexts.pop(context.key, None)
        await self.send(self.tagged({"type": "end_of_stream"}, context.key))
        if self.close_on_eos and not self.contexts:
            await self.ws.close(1000, "end of stream")

    async def error(self, message: str, code: str, key=None):
        """Gradium's error message, then the socket is closed with its code (as Gradium does)."""
        number = self.CODES.get(code, 1008)
        await self.send(self.tagged({"type": "error", "message": message, "code": number}, key))
        await self.ws.close(number, code)


class ElevenLabsSession(AgentSession):
    """ElevenLabs' `multi-stream-input` (contexts named by `context_id`) and `stream-input` (one
    context; `{"text": ""}` ends it). Text, `flush`, `close_context`, `close_socket`; answers are
    `audio` (base64) with `contextId`, an `alignment` / `normalizedAlignment` message after each
    unit (character times from the unit's start, as ElevenLabs' restart in every message), and
    `isFinal`. The voice and `output_format` come from the URL."""

    default_rate = 44100

    def __init__(self, service, ws, query, voice: str, multi: bool):
        super().__init__(service, ws, query)
        self.voice, self.multi, self.closing = voice, multi, False
        self.wire = wire_format(query.get("output_format", "mp3_44100_128"), self.default_rate)
        self.auto = query.get("auto_mode", "false").lower() == "true"

    async def handle(self, message: dict):
        if message.get("close_socket"):
            await self.close_socket()
            return
        key = (message.get("context_id") or message.get("contextId")) if self.multi else ""
        text = message.get("text")
        if key is None:  # multi-stream: a keep-alive ({"text": ""}) names no context
            if (isinstance(text, str) and text.strip()) or message.get("flush"):
                key = "default"
            else:
                return
        context = self.contexts.get(key) or await self.open(key, message)
        if context is None:
            return
        if isinstance(text, str):
            if text == "" and not self.multi:  # stream-input: the end of the text
                context.end()
                return
            try:
                context.add(text)
            except TextTooLong as exc:
                await self.error(str(exc), "too_long", key)
                return
        if message.get("flush"):
            context.flush()
        if message.get("close_context"):
            context.close()

    async def open(self, key, message: dict) -> SpeechContext | None:
        if message.get("close_context"):  # closing what is not open (any more): nothing to do
            return None
        schedule = None
        if not self.auto:
            wanted = (message.get("generation_config") or {}).get("chunk_length_schedule")
            ok = isinstance(wanted, list) and wanted and all(isinstance(n, int) for n in wanted)
            schedule = tuple(max(1, n) for n in wanted) if ok else AGENT_SCHEDULE
        try:
            return await self.open_context(key, self.voice, self.wire, schedule)
        except ContextFailed as exc:
            await self.error(str(exc), exc.code, key)
            return None

    async def close_socket(self):
        """Every context finishes what was flushed; then the socket closes."""
        self.closing = True
        for context in list(self.contexts.values()):
            context.close()
        if not self.contexts:
            await self.ws.close(1000, "close_socket")

    def tagged(self, message: dict, key) -> dict:
        return message | {"contextId": key} if self.multi else message

    async def audio(self, context, data: bytes):
        message = {"audio": base64.b64encode(data).decode(), "isFinal": None,
                   "alignment": None, "normalizedAlignment": None}  # fmt: skip
        await self.send(self.tagged(message, context.key))

    async def spoken(self, context, unit: str, spoken: str, start: float, stop: float):
        seconds, align = stop - start, char_alignment
        message = {"audio": None, "isFinal": None,
                   "alignment": align(unit.strip() + " ", seconds),
                   "normalizedAlignment": align(spoken.strip() + " ", seconds)}  # fmt: skip
        await self.send(self.tagged(message, context.key))

    async def flushed(self, context):
        pass  # ElevenLabs does not answer a flush

    async def finished(self, context):
        self.contexts.pop(context.key, None)
        await self.send(self.tagged({"isFinal": True}, context.key))
        if not self.multi or (self.closing and not self.contexts):
            await self.ws.close(1000, "done")

    async def error(self, message: str, code: str, key=None):
        """ElevenLabs' error message; a single-context socket is closed after it."""
        await self.send(self.tagged({"error": code, "message": message}, key))
        if not self.multi:
            await self.ws.close(1008 if code != "busy" else 1013, code)


AGENT_ROUTES = (
    (re.compile(r"/api/speech/tts"), None),
    (re.compile(r"/v1/text-to-speech/([^/]{1,200})/multi-stream-input"), True),
    (re.compile(r"/v1/text-to-speech/([^/]{1,200})/stream-input"), False),
)


def agent_route(path: str):
    """(voice, multi) for an ElevenLabs path, (None, None) for Gradium's; None if unknown."""
    for pattern, multi in AGENT_ROUTES:
        if match := pattern.fullmatch(path):
            voice = unquote(match.group(1)) if match.groups() else None
            return voice, multi
    return None


def agent_key_ok(headers, key: str | None) -> bool:
    """The API key as each client sends it: xi-api-key (ElevenLabs), x-api-key (Gradium), or
    Authorization: Bearer."""
    if not key:
        return True
    return key_given(key, headers.get("xi-api-key"), headers.get("x-api-key"), bearer(headers))


class AgentServer:
    """The voice-agent WebSocket server on its own event loop thread; `close` stops both.

    Bounded as HTTP is: at most --max_connections sockets, messages of --max_body_kb, idle
    sockets closed after --idle_timeout (ElevenLabs' `inactivity_timeout`, up to 300 s, when a
    client asks for longer)."""

    def __init__(self, service: Service, host: str, port: int, tls=None):
        self.service, self.sessions = service, set()
        self.limit = service.settings.max_body_kb * 1024
        self.loop = LoopThread("websocket")
        try:
            self.ws_server = self.loop.run(self.start(host, port, tls))
        except (OSError, concurrent.futures.TimeoutError) as exc:
            self.loop.stop()
            raise ProtocolServerError(port_unusable("WebSocket", host, port, exc)) from None
        self.port = next(iter(self.ws_server.sockets)).getsockname()[1]
        scheme = "wss" if tls else "ws"
        logger.info("voice agents (Gradium, ElevenLabs) on %s://%s:%s/", scheme, host, self.port)

    async def start(self, host: str, port: int, tls):
        from websockets.asyncio.server import serve

        return await serve(self.connection, host, port, ssl=tls, max_size=4 * self.limit,
                           process_request=self.check, server_header=None)  # fmt: skip

    def check(self, connection, request):
        """Before the upgrade: a known path, the API key, a free connection."""
        if agent_route(urlsplit(request.path).path) is None:
            return connection.respond(404, "Unknown path: use /api/speech/tts (Gradium) or /v1/"
                                      "text-to-speech/<voice>/multi-stream-input.\n")  # fmt: skip
        if not agent_key_ok(request.headers, self.service.settings.api_key):
            return connection.respond(401, "Incorrect or missing API key (send xi-api-key, "
                                      "x-api-key or Authorization: Bearer).\n")  # fmt: skip
        if len(self.sessions) >= self.service.settings.max_connections:
            return connection.respond(503, "Too many connections: retry later.\n")
        return None

    async def connection(self, ws):
        """One socket: messages in, each handled by its protocol's session, until it closes."""
        from websockets.exceptions import ConnectionClosed

        parts = urlsplit(ws.request.path)
        query = dict(parse_qsl(parts.query))
        voice, multi = agent_route(parts.path)
        idle = float(self.service.settings.idle_timeout)
        if multi is None:
            session = GradiumSession(self.service, ws, query)
        else:
            try:
                session = ElevenLabsSession(self.service, ws, query, voice, multi)
            except ValueError as exc:
                await ws.send(json.dumps({"error": "invalid_output_format", "message": str(exc)}))
                return await ws.close(1008, "invalid output_format")
            with contextlib.suppress(ValueError):
                idle = max(idle, min(300.0, float(query.get("inactivity_timeout", 0))))
        self.sessions.add(session)
        try:
            with self.service.engine.metrics.session("websocket"):
                await self.read_messages(session, ws, idle)
        except ConnectionClosed:
            pass
        finally:
            self.sessions.discard(session)
            session.cancel()

    async def read_messages(self, session: AgentSession, ws, idle: float):
        """Messages until the socket closes or stays idle (nothing speaking) for `idle` s."""
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), idle)
            except asyncio.TimeoutError:
                if session.busy():
                    continue
                await ws.close(1000, "idle")
                return
            message = await self.parse(session, raw)
            if message is not None:
                await session.handle(message)

    async def parse(self, session: AgentSession, raw) -> dict | None:
        """A client message as a JSON object, or the protocol's error."""
        if len(raw) > self.limit:
            await session.error(f"A message may hold at most {self.limit} bytes.", "too_large")
            await session.ws.close(1009, "message too big")
            return None
        try:
            message = json.loads(raw)
            if isinstance(message, dict):
                return message
        except (ValueError, RecursionError):
            pass
        await session.error("Send each message as one JSON object.", "bad_message")
        return None

    async def stop(self):
        self.ws_server.close()
        await self.ws_server.wait_closed()

    def close(self):
        """Close the listening socket and every connection, then stop the loop's thread."""
        with contextlib.suppress(Exception):
            self.loop.run(self.stop())
        self.loop.stop()


# =================================================================================================
# Main
# =================================================================================================


def user_dir(kind: str) -> Path:
    """The per-user folder of a kind ("cache" or "data") for this server, XDG-style."""
    env, fallback = {
        "cache": ("XDG_CACHE_HOME", ".cache"),
        "data": ("XDG_DATA_HOME", ".local/share"),
    }[kind]
    return Path(os.environ.get(env) or Path.home() / fallback) / SERVER_NAME


def default_max_batch(steps) -> int:
    """Streams at most: batched, what a device holds; otherwise one generation per two cores.

    A batch slot holds the KV regions of the longest sentence, so the default also leaves half of
    the device's free memory to everything else (a small GPU gets fewer slots, not an OOM).
    """
    if steps is None:
        return max(1, usable_cores() // 2)
    device = str(steps.device)
    wanted = 128 if device.startswith("cuda") else 16
    free = free_memory(device)
    return wanted if free is None else max(1, min(wanted, free // 2 // steps.slot_bytes()))


def build_server(settings: Settings, model=None, steps=None) -> SpeechServer:
    """Load (or take) the model, pre-encode the default voice, and assemble the application.

    steps: the model's batched steps (by default `pocket_steps`: pocket-tts's, or None)."""
    model = load_model(settings) if model is None else model
    if steps is None:  # its regions hold the longest voice prompt a request may bring
        steps = pocket_steps(model, settings.precision, settings.max_reference_seconds)
    cache_root = Path(settings.cache_dir) if settings.cache_dir else user_dir("cache")
    fingerprint = model_fingerprint(model, settings.model_path)  # voices are encoded in float32
    latents = cache_root / "latents" / fingerprint
    voices_dir = Path(settings.voices_dir) if settings.voices_dir else user_dir("data") / "voices"
    remove_leftovers(latents)  # a kill -9 mid-write leaves these
    remove_leftovers(voices_dir)
    engine = Engine(
        model,
        LatentCache(latents, settings.voice_cache_size),
        settings.max_batch or default_max_batch(steps),  # Settings stay as the operator set them
        settings.max_queue,
        settings.queue_timeout,
        settings.max_reference_seconds,
        settings.realtime_margin,
        steps,
    )
    logger.info("precision: %s (%s)", engine.precision.name, engine.precision.reason)
    voices = VoiceCatalog(
        builtin_voice_names(model),
        voices_dir,
        settings.default_voice,
        engine.language,
        load_voice_map(settings.voice_map),
        settings.allow_remote_voices,
    )
    engine.use_voices(voices)
    engine.warm_up(engine.default_state)  # the first request must not pay for it
    return SpeechServer(settings, engine)


class LogFlood(logging.Filter):
    """At most `burst` records of one message per `seconds` (a client that provokes the same
    warning 100,000 times must not fill the disk); the next one let through says how many of its
    kind were left out."""

    def __init__(self, burst: int = 20, seconds: float = 60.0):
        super().__init__()
        self.burst, self.seconds = burst, seconds
        self.seen: dict[tuple, list] = {}  # (logger, message) -> [window start, count, left out]
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, str(record.msg)), time.monotonic()
        with self.lock:
            if len(self.seen) > 10_000:  # messages are templates: a few hundred kinds at most
                self.seen.clear()
            window = self.seen.setdefault(key, [now, 0, 0])
            if now - window[0] > self.seconds:
                if window[2]:
                    record.msg = f"{record.msg} [{window[2]} more like it were left out]"
                window[:] = [now, 0, 0]
            window[1] += 1
            if window[1] > self.burst:
                window[2] += 1
                return False
        return True


def unusable_port(settings: Settings) -> str | None:
    """Why a port this server is to listen on cannot be opened, said before the model loads (a
    minute on a first start) rather than after; None when all can. The servers bind them later."""
    ports = [("HTTP", settings.host, settings.port)]
    if settings.wyoming_port:
        ports.append(("Wyoming", settings.wyoming_host or settings.host, settings.wyoming_port))
    if settings.ws_port:
        ports.append(("WebSocket", settings.ws_host or settings.host, settings.ws_port))
    for name, host, port in ports:
        try:
            socket.create_server((host, port)).close()  # SO_REUSEADDR, as the servers bind
        except OSError as exc:
            return port_unusable(name, host, port, exc)
    return None


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    flood = LogFlood()
    for handler in logging.getLogger().handlers:
        handler.addFilter(flood)
    if problem := unusable_port(settings):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        server = build_server(settings)
    except (ModelLoadError, VoiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        http, protocols = http_server(server.app, settings, server.engine.max_batch), []
    except OSError as exc:  # taken while the model loaded
        print(f"error: {port_unusable('HTTP', settings.host, settings.port, exc)}", file=sys.stderr)
        server.engine.close()
        return 2
    service = Service(settings, server.engine)  # what Wyoming and the WebSockets use
    try:
        if settings.wyoming_port:
            host = settings.wyoming_host or settings.host
            protocols.append(WyomingServer(service, host, settings.wyoming_port,
                                           settings.wyoming_zeroconf))  # fmt: skip
        if settings.ws_port:
            host = settings.ws_host or settings.host
            protocols.append(AgentServer(service, host, settings.ws_port, agent_tls(settings)))
    except ProtocolServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for protocol in protocols:
            protocol.close()
        http.close()
        server.engine.close()
        return 2
    logger.info(
        "serving %s on http://%s:%s/ (device %s, streaming by default: %s)",
        settings.model_path,
        settings.host,
        http.effective_port,
        server.device,
        settings.stream,
    )
    signal.signal(signal.SIGTERM, lambda *_: drain_then_exit(http, server, settings.drain_seconds))
    with contextlib.suppress(KeyboardInterrupt):
        http.run()
    close_http(http)
    for protocol in protocols:  # every thread and socket started is stopped
        protocol.close()
    server.engine.close()
    return 0


def agent_tls(settings: Settings):
    """The TLS context of --ws_tls_cert / --ws_tls_key, or None (plain ws://)."""
    if not (settings.ws_tls_cert or settings.ws_tls_key):
        return None
    import ssl

    if not (settings.ws_tls_cert and settings.ws_tls_key):
        raise ProtocolServerError("--ws_tls_cert and --ws_tls_key go together.")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.ws_tls_cert, settings.ws_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ProtocolServerError(f"--ws_tls_cert / --ws_tls_key: {exc}") from None
    return context


class JsonErrorTask(ErrorTask):
    """waitress's own refusals (a body over the limit, a malformed request) as OpenAI errors."""

    def execute(self):
        error = self.request.error
        body = json.dumps({"error": {"message": f"{error.reason}: {error.body}",
                                     "type": "invalid_request_error", "param": None,
                                     "code": error.reason.lower().replace(" ", "_")}})  # fmt: skip
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body.encode())


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def http_server(app, settings: Settings, streams: int = 0, **overrides):
    """waitress serving `app`, every limit set deliberately.

    Reading requests is asynchronous, so idle and slow clients hold a connection but no thread:
    `max_connections` bounds them and `idle_timeout` closes the idle ones. Bodies over the
    largest upload are refused from their headers, before they are read.
    """
    import waitress.server

    options = {
        "host": settings.host,
        "port": settings.port,
        # a thread per stream (`streams`: the Engine's max_batch), per waiting one, and a few
        "threads": (streams or settings.max_batch or 16) + settings.max_queue + 8,
        "channel_request_lookahead": 1,  # keep reading sockets, so hang-ups are seen at once
        "connection_limit": settings.max_connections,
        "channel_timeout": settings.idle_timeout,
        "cleanup_interval": max(1, min(30, settings.idle_timeout // 2)),
        "backlog": 1024,
        "max_request_header_size": 64 * 1024,
        "max_request_body_size": max_body_bytes(settings),
        "ident": None,
    } | overrides
    raise_open_files_limit(settings.max_connections + 64)
    server = waitress.server.create_server(app, **options)
    server.channel_class = JsonErrorChannel
    return server


def raise_open_files_limit(wanted: int):
    """Each connection is a file descriptor: raise the soft limit where it is lower."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def stop_serving(http):
    """Make `http.run()` return: every socket closed from the loop's own thread (waitress has no
    public stop; closing them under its select() from another thread is a race: EBADF there).

    pull_trigger queues the thunk, then writes to the trigger's pipe: a loop that another thread
    woke (a worker flushing its last bytes) can run the thunk, closing that pipe, before the
    write, which then fails with EBADF although all is closed."""

    def close_all():
        for dispatcher in list(http._map.values()):
            dispatcher.close()

    with contextlib.suppress(OSError):
        http.trigger.pull_trigger(close_all)


def close_http(http):
    """After `http.run()` returned: stop waitress's worker threads (its own run() does so only
    on KeyboardInterrupt) and close its trigger."""
    http.task_dispatcher.shutdown()
    http.close()


def drain_then_exit(http, server: SpeechServer, seconds: float):
    """SIGTERM: take no new connections, let running streams finish (bounded), then exit.

    The main thread returns from `http.run()`: no reliance on SIGINT, which a shell ignores in
    the processes it starts in the background (`cmd &`, nohup)."""
    logger.info("SIGTERM: finishing %d running requests (at most %.0f s)",
                server.engine.active + server.engine.waiting, seconds)  # fmt: skip
    http.accepting = False  # waitress stops accepting; open connections keep being served
    server.draining = True

    def wait_and_stop():
        deadline = time.monotonic() + seconds
        while server.engine.active + server.engine.waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # let the last bytes leave
        stop_serving(http)

    threading.Thread(target=wait_and_stop, daemon=True).start()


# =================================================================================================
# Page (HTML/CSS/JS) and logo, embedded so that this file runs alone
# =================================================================================================

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>pocket-tts studio</title>
<link rel="icon" type="image/svg+xml" href="/favicon.svg">
<style>
/* ---- theme: light by default, dark by prefers-color-scheme (text contrast >= 4.5:1) --------- */
:root {
  --bg: #f6f5f2; --panel: #ffffff; --ink: #181c26; --muted: #5b6270; --line: #e3e1dc;
  --accent: #b83a14; --fill: #c2410c; --fill-ink: #ffffff; --soft: #fbe9e2; --danger: #b42318;
  --focus: #2f6fed; --wave: #d9d6cf;
  --shadow: 0 1px 2px rgba(0,0,0,.05), 0 4px 16px rgba(0,0,0,.05);
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #14161c; --panel: #1d2029; --ink: #eceef3; --muted: #9aa1b0; --line: #2e3240;
    --accent: #ff7a5c; --fill: #ff7a5c; --fill-ink: #1a0d08; --soft: #3a221c; --danger: #ff6b6b;
    --focus: #7aa2ff; --wave: #3a3f4e; --shadow: none;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
:focus-visible { outline: 2px solid var(--focus); outline-offset: 2px; }
[hidden] { display: none !important; }
.wrap { max-width: 1120px; margin: 0 auto; padding: 20px 20px 48px; }
.sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0);
  white-space: nowrap; }

/* ---- header and banners -------------------------------------------------------------------- */
header { display: flex; align-items: center; gap: 14px; margin-bottom: 18px; flex-wrap: wrap; }
header img { width: 48px; height: 48px; object-fit: cover; object-position: left; }
header h1 { font-size: 26px; margin: 0; letter-spacing: -.5px; font-weight: 600; }
header h1 span { color: var(--accent); margin-left: .12em; }
.status { margin-left: auto; display: flex; gap: 10px; align-items: center; font-size: 13px;
  color: var(--muted); }
.banner { border: 1px solid var(--danger); border-radius: 12px; padding: 10px 14px;
  margin-bottom: 16px; background: var(--panel); }

/* ---- layout: compose and voices on the left; player and results beside them ---------------- */
main { display: grid; gap: 18px; grid-template-columns: minmax(0, 1.35fr) minmax(0, 1fr);
  grid-template-areas: "key key" "compose side" "voices side"; align-items: start; }
#key-card { grid-area: key; } #compose { grid-area: compose; } #voices { grid-area: voices; }
.side { grid-area: side; display: grid; gap: 18px; }
@media (max-width: 900px) {
  main { grid-template-columns: minmax(0, 1fr);
    grid-template-areas: "key" "compose" "side" "voices"; }
}
/* A phone: the player stays on screen while the page scrolls (it would sit below the form), and
   what a finger presses is 44 px tall. A touch screen has no keyboard shortcut to show. */
@media (max-width: 600px) {
  #player:not([hidden]) { position: fixed; left: 8px; right: 8px; bottom: 8px; z-index: 5;
    max-height: 45vh; overflow: auto; }
  body:has(#player:not([hidden])) { padding-bottom: 46vh; }
}
@media (max-width: 600px), (pointer: coarse) {
  .list button, .transport button { min-height: 44px; min-width: 44px; }
}
@media (hover: none) and (pointer: coarse) { #shortcut { display: none; } }
section { background: var(--panel); border: 1px solid var(--line); border-radius: 14px;
  padding: 18px; box-shadow: var(--shadow); min-width: 0; }
h2 { font-size: 14px; text-transform: uppercase; letter-spacing: .6px; color: var(--muted);
  margin: 0 0 12px; font-weight: 600; }
h3 { font-size: 14px; margin: 16px 0 2px; font-weight: 600; }
.title-row { display: flex; justify-content: space-between; align-items: baseline; gap: 8px; }

/* ---- controls ------------------------------------------------------------------------------ */
label { font-size: 13px; color: var(--muted); display: block; margin-bottom: 4px; }
textarea, select, input[type=text], input[type=password] { width: 100%; font: inherit;
  color: inherit; background: var(--bg); border: 1px solid var(--line); border-radius: 10px;
  padding: 9px 11px; }
textarea { min-height: 150px; resize: vertical; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin-top: 12px; }
@media (max-width: 520px) { .grid { grid-template-columns: 1fr; } }
.wide { grid-column: 1 / -1; }
.inline { display: flex; gap: 8px; align-items: center; }
.inline > :first-child { flex: 1; min-width: 0; }
button { font: inherit; cursor: pointer; white-space: nowrap; border-radius: 10px;
  border: 1px solid var(--line); background: var(--panel); color: var(--ink); padding: 7px 12px; }
button:hover:not(:disabled) { border-color: var(--accent); }
button:disabled { opacity: .55; cursor: not-allowed; }
.chips { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 10px; align-items: center; }
.chip { border-radius: 999px; font-size: 13px; padding: 5px 12px; }
.link { border: 0; background: none; color: var(--accent); padding: 2px 4px;
  text-decoration: underline; font-size: 13px; }
.primary { background: var(--fill); color: var(--fill-ink); border-color: var(--fill);
  font-weight: 600; padding: 10px 22px; }
.primary.stop { background: var(--ink); border-color: var(--ink); color: var(--bg); }
.counter { font-size: 12px; color: var(--muted); text-align: right; margin-top: 4px; }
.counter.over { color: var(--danger); font-weight: 600; }
.speed { display: flex; align-items: center; gap: 8px; }
.speed input { flex: 1; accent-color: var(--fill); min-width: 0; }
.speed output { min-width: 44px; text-align: right; font-variant-numeric: tabular-nums; }
.actions { display: flex; align-items: center; gap: 14px; margin-top: 16px; flex-wrap: wrap; }
.hint, .metrics { font-size: 13px; color: var(--muted); margin: 6px 0 0; }
.metrics { margin: 0; font-variant-numeric: tabular-nums; }
kbd { font: 12px ui-monospace, monospace; border: 1px solid var(--line); border-radius: 4px;
  padding: 0 4px; }
.error { color: var(--danger); font-size: 14px; margin: 10px 0 0; }
.error::before { content: "⚠ "; }

/* ---- player -------------------------------------------------------------------------------- */
.now { display: flex; justify-content: space-between; gap: 10px; font-size: 14px; }
.now b { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#wave { width: 100%; height: 72px; display: block; margin: 10px 0; cursor: pointer; }
.transport { display: flex; align-items: center; gap: 8px; flex-wrap: wrap; }
.transport input[type=range] { flex: 1; min-width: 120px; accent-color: var(--fill); }
.time { font-size: 13px; font-variant-numeric: tabular-nums; color: var(--muted); }
.meter { width: 100%; height: 6px; border-radius: 3px; background: var(--wave); overflow: hidden;
  margin-top: 10px; }
.meter div { height: 100%; width: 0; background: var(--fill); transition: width 60ms linear; }

/* ---- results and voices -------------------------------------------------------------------- */
.list { list-style: none; padding: 0; margin: 8px 0 0; display: grid; gap: 8px;
  grid-template-columns: minmax(0, 1fr); }  /* an auto column grows to a row's unwrapped text */
.list li { display: flex; align-items: center; gap: 8px; background: var(--bg);
  border-radius: 10px; padding: 8px 8px 8px 12px; font-size: 14px; flex-wrap: wrap; }
.list li[aria-current=true] { outline: 2px solid var(--fill); }
.list .grow { flex: 1 1 180px; min-width: 0; }  /* the buttons wrap below it on phones */
.tiles { grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); }
.tiles li { border: 1px solid var(--line); padding: 10px 12px; align-content: space-between; }
.tiles .grow { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.tiles li.selected { border-color: var(--fill); box-shadow: inset 0 0 0 1px var(--fill); }
.tiles li.empty { grid-column: 1 / -1; border: 0; }
[aria-pressed=true] { border-color: var(--fill); color: var(--accent); font-weight: 600; }
.buttons { display: flex; gap: 6px; flex-wrap: wrap; }
.list .meta { font-size: 12px; color: var(--muted); }
.snippet { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.small { padding: 3px 9px; font-size: 13px; }
.badge { font-size: 11px; border: 1px solid var(--line); border-radius: 999px; padding: 0 7px;
  color: var(--muted); }
.empty { color: var(--muted); font-size: 14px; margin: 4px 0 0; }
.drop { display: block; border: 1.5px dashed var(--line); border-radius: 12px; padding: 16px;
  text-align: center; color: var(--muted); cursor: pointer; }
.drop:hover, .drop:focus-within { border-color: var(--accent); color: var(--ink); }
.drop input { position: absolute; opacity: 0; width: 1px; height: 1px; }
#dropzone { position: fixed; inset: 0; display: grid; place-items: center; z-index: 10;
  background: color-mix(in srgb, var(--bg) 85%, transparent); border: 3px dashed var(--fill);
  font-size: 22px; font-weight: 600; pointer-events: none; }
dialog { border: 1px solid var(--line); border-radius: 14px; background: var(--panel);
  color: var(--ink); max-width: 420px; padding: 20px; }
dialog::backdrop { background: rgba(0, 0, 0, .4); }
dialog .actions { justify-content: flex-end; }
.danger { background: var(--danger); border-color: var(--danger); color: #fff; font-weight: 600; }
@media (prefers-color-scheme: dark) { .danger { color: #1a0808; } }
</style>
</head>
<body>
<div class="wrap">
  <header>
    <img src="/pocket-tts-logo.png" alt="" width="48" height="48">
    <h1>pocket<span>tts</span> studio</h1>
    <div class="status">
      <span id="status">connecting…</span>
      <button type="button" id="key-change" class="small" hidden>Change key</button>
    </div>
  </header>

  <div id="offline" class="banner" role="alert" hidden>
    Can't reach the server. It may have stopped or be restarting; this page retries by itself.
  </div>

  <main>
    <!-- API key: asked only when the server has one ------------------------------------------- -->
    <section id="key-card" aria-labelledby="key-title" hidden>
      <h2 id="key-title">API key</h2>
      <form id="key-form">
        <label for="api-key">This server asks for an API key. It is kept in this browser
          only.</label>
        <div class="inline">
          <input type="text" name="username" autocomplete="username" value="pocket-tts" hidden>
          <input id="api-key" type="password" autocomplete="current-password" required>
          <button type="submit" id="key-save">Use key</button>
          <button type="button" id="key-forget" hidden>Forget key</button>
          <button type="button" id="key-cancel" hidden>Cancel</button>
        </div>
        <p id="key-error" class="error" role="alert" hidden></p>
      </form>
    </section>

    <!-- Compose: text, voice, format, speed, generate ----------------------------------------- -->
    <section id="compose" aria-labelledby="compose-title">
      <h2 id="compose-title">Text</h2>
      <div class="chips" role="group" aria-label="Example texts">
        <button type="button" class="chip" data-prompt="greeting">Short greeting</button>
        <button type="button" class="chip" data-prompt="numbers">Numbers &amp; dates</button>
        <button type="button" class="chip" data-prompt="long">Long passage</button>
        <span id="undo-note" class="hint" hidden>Your text was replaced.
          <button type="button" id="undo" class="link">Undo</button></span>
      </div>
      <label for="text">What should it say?</label>
      <textarea id="text" spellcheck="true"></textarea>
      <div id="counter" class="counter"></div>
      <div id="counter-alert" class="sr-only" aria-live="polite"></div>
      <div class="grid">
        <div class="wide"><label for="voice">Voice</label>
          <div class="inline"><select id="voice"></select>
            <button type="button" id="voice-preview" class="small"
                    aria-label="Preview the selected voice">Preview</button></div></div>
        <div><label for="format">Format</label>
          <select id="format">
            <option value="mp3">MP3</option><option value="opus">Opus</option>
            <option value="aac">AAC</option><option value="flac">FLAC</option>
            <option value="wav">WAV</option><option value="pcm">PCM (raw)</option>
          </select></div>
        <div><label for="speed">Speed</label>
          <div class="speed">
            <input id="speed" type="range" min="0.25" max="4" step="0.05" value="1">
            <output id="speed-out" for="speed">1.00×</output></div></div>
      </div>
      <div class="actions">
        <button type="button" id="generate" class="primary">Generate</button>
        <span class="hint" id="shortcut"><kbd>Ctrl</kbd>/<kbd>⌘</kbd> + <kbd>Enter</kbd></span>
        <p id="metrics" class="metrics" aria-live="polite"></p>
      </div>
      <p id="compose-error" class="error" role="alert" hidden></p>
    </section>

    <div class="side">
      <!-- The one player: every format, while it streams and after ---------------------------- -->
      <section id="player" aria-labelledby="player-title" hidden>
        <h2 id="player-title">Player</h2>
        <div class="now"><b id="now-title"></b><span id="now-meta" class="time"></span></div>
        <canvas id="wave" aria-hidden="true"></canvas>
        <div class="transport">
          <button type="button" id="play">Play</button>
          <button type="button" id="stop">Stop</button>
          <input id="seek" type="range" min="0" max="0" step="0.01" value="0" aria-label="Position">
          <span id="time" class="time">0:00 / 0:00</span>
        </div>
        <div class="meter" aria-hidden="true"><div id="level"></div></div>
        <p id="player-note" class="hint" hidden></p>
      </section>

      <!-- Results of this session ------------------------------------------------------------- -->
      <section id="results-card" aria-labelledby="results-title">
        <div class="title-row"><h2 id="results-title">Results</h2>
          <button type="button" id="clear-results" class="small" hidden>Clear all</button></div>
        <p id="results-empty" class="empty">Generated audio appears here. This browser keeps
          it for next time.</p>
        <p id="removed" class="hint" aria-live="polite" hidden><span id="removed-text"></span>
          <button type="button" id="undo-remove" class="link">Undo</button></p>
        <p id="save-error" class="error" role="alert" hidden></p>
        <ul id="results" class="list"></ul>
      </section>
    </div>

    <!-- Voices: clone by upload or drop; preview; remove uploads ------------------------------ -->
    <section id="voices" aria-labelledby="voices-title">
      <h2 id="voices-title">Voices</h2>
      <label class="drop">
        <input id="clone-file" type="file" accept="audio/*,.wav,.mp3,.flac,.ogg,.opus,.m4a,.webm">
        <span id="drop-text">Drop a recording anywhere on this page, or click to choose one.<br>
          5–30 s of clear speech works best.</span>
      </label>
      <div class="inline" style="margin-top: 10px">
        <input id="clone-name" type="text" placeholder="Voice name" aria-label="Voice name"
               maxlength="64">
        <button type="button" id="clone-add" disabled>Add voice</button>
      </div>
      <p id="clone-error" class="error" role="alert" hidden></p>
      <h3 id="mine-title">Your voices</h3>
      <p class="hint">Uploaded from this page.</p>
      <ul id="my-voices" class="list tiles" aria-labelledby="mine-title"></ul>
      <h3 id="theirs-title">On the server</h3>
      <p class="hint">Built into the model or put in the server's voices folder.</p>
      <ul id="server-voices" class="list tiles" aria-labelledby="theirs-title"></ul>
      <p id="voices-alert" class="sr-only" aria-live="polite"></p>
      <p id="voices-error" class="error" role="alert" hidden></p>
      <details id="aliases" class="hint" hidden>
        <summary>OpenAI voice names</summary>
        <p>Apps made for OpenAI may ask for its voice names; each speaks as one of the voices
          above: <span id="alias-list"></span>.</p>
      </details>
    </section>
  </main>
</div>

<div id="dropzone" hidden>Drop the recording to clone its voice</div>
<dialog id="confirm" aria-labelledby="confirm-text">
  <p id="confirm-text"></p>
  <div class="actions">
    <button type="button" value="cancel" id="confirm-cancel">Cancel</button>
    <button type="button" value="ok" id="confirm-ok" class="danger">Remove</button>
  </div>
</dialog>
<script>
"use strict";
// ---- constants and small helpers ------------------------------------------------------------
const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "pocket-tts-api-key";
const MIME = { mp3: "audio/mpeg", opus: "audio/ogg", aac: "audio/aac", flac: "audio/flac",
               wav: "audio/wav", pcm: "audio/pcm" };
const PREVIEW_TEXT = "Hello! This is how I sound.";
const PROMPTS = {
  greeting: "Hello! I'm pocket-tts, a small text-to-speech model running right here on " +
            "this machine.",
  numbers: "On 3 May 2026 at 10:30, the little shop sold 1,234 tickets at $12.50 each: " +
           "a 15% jump on the 2nd quarter, with 21°C of sunshine outside.",
  long: "The lighthouse keeper climbed the spiral stairs every evening, counting the steps " +
        "as his father had taught him. There were one hundred and twelve of them, worn smooth " +
        "in the middle by a century of boots. At the top he trimmed the wick, wiped the great " +
        "lens, and watched the first beam sweep across the water. Far out, a fishing boat " +
        "turned toward the harbour. He never learned the names of the sailors he guided home, " +
        "and he liked it that way. The light did not ask who was out there. It simply kept " +
        "turning, patient and bright, until the morning came back over the hills.",
};
const ui = { maxChars: 4096, defaultVoice: null, auth: false, job: null, takes: [],
             previews: new Map(), undoText: "", over: false, cloneFile: null, removed: [] };
let apiKey = localStorage.getItem(KEY_STORAGE) || "";

const codePoints = (text) => [...text].length;  // how the server counts characters
const clock = (s) => `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;

function fileSize(bytes) {
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1024 * 1024) return `${Math.round(bytes / 1024)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function joinBytes(chunks) {  // one array, copied once
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  chunks.reduce((at, c) => { out.set(c, at); return at + c.length; }, 0);
  return out;
}
const concat = (a, b) => (a.length ? joinBytes([a, b]) : b);  // nothing pending: no copy

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/** A small button of a list row; `label` is what a screen reader says (it names the row). */
function rowButton(text, label, action) {
  const button = element("button", { type: "button", className: "small", textContent: text });
  button.setAttribute("aria-label", label);
  button.addEventListener("click", action);
  return button;
}

// ---- talking to the server: the key, plain-word errors, a banner while it is unreachable ----
class ApiError extends Error {
  constructor(message, details = {}) { super(message); Object.assign(this, details); }
}

const FIELD_WORDS = { input: "the text", voice: "the voice", file: "the recording",
                      audio_sample: "the recording", name: "the name", speed: "the speed",
                      response_format: "the format" };

/** An OpenAI error object, told in plain words (no API field names, no status codes). */
function plainWords(status, { message = "", code } = {}) {
  if (status === 401) return "This needs the server's API key.";
  if (status === 413) return "That file is too large for this server.";
  if (status === 429 || status === 503) return "The server is busy. Try again in a moment.";
  if (status >= 500) return "The server ran into a problem. Try again, or see the server's log.";
  if (code === "voice_not_found") return "That voice is no longer on the server. Pick another.";
  if (code === "voice_in_use") return "This voice is the server's default, so it stays.";
  const words = message.replace(/'(\w+)'/g, (quoted, field) => FIELD_WORDS[field] || quoted);
  return words.charAt(0).toUpperCase() + words.slice(1) || "The request was refused.";
}

/** Whether the server answers: a banner while it does not, retried every 3 s; an idle page
 * asks every 5 s while it is in view, so it notices a server that went away. When the server is
 * back, the errors it caused are cleared and the page reloads its status and voices. */
const connection = {
  timer: null,
  down() {
    $("offline").hidden = false;
    this.timer = this.timer || setInterval(() => this.probe(), 3000);
  },
  up() {
    if (!this.timer) return;
    clearInterval(this.timer);
    this.timer = null;
    $("offline").hidden = true;
    document.querySelectorAll("[data-cause=offline]").forEach((box) => clearError(box.id));
    refresh();
  },
  async probe() {
    try {
      if ((await fetch("/health", { cache: "no-store" })).ok) this.up();
    } catch (_) { /* still down */ }
  },
  async check() {  // one question, from an idle page or after a cut-off stream
    if (this.timer) return;
    try { await fetch("/health", { cache: "no-store" }); } catch (_) { this.down(); }
  },
  watch() {
    setInterval(() => { if (document.visibilityState === "visible") this.check(); }, 5000);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.check();
    });
  },
};

const OFFLINE = "Can't reach the server. Check that it is running, then try again.";
const CUT_OFF = "The connection to the server broke off during this take. What arrived can " +
                "still be played.";

/** fetch() against the API: adds the key; failures become ApiErrors in plain words. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey) headers.set("Authorization", "Bearer " + apiKey);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    connection.down();
    throw new ApiError(OFFLINE, { offline: true });
  }
  connection.up();
  if (response.ok) return response;
  let details = {};
  try { details = (await response.json()).error || {}; } catch (_) { /* not JSON */ }
  if (response.status === 401) {  // with no key saved, the card's own words say what to do
    keys.ask(apiKey ? "The saved key is not accepted. Enter the current one." : "");
  }
  throw new ApiError(plainWords(response.status, details),
                     { status: response.status, code: details.code, param: details.param });
}

/** An error shown where it happened (a 401 is handled by the key card instead). One that the
 * server's absence caused is marked, so that it goes when the server is back. */
function showError(where, error) {
  if (error.name === "AbortError" || error.status === 401) return;
  const box = $(where);
  box.textContent = error.message || String(error);
  box.dataset.cause = error.offline ? "offline" : "";
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
}
function clearError(where) { $(where).hidden = true; $(where).textContent = ""; }

// ---- the API key: asked once, checked before it is kept ---------------------------------------
const keys = {
  ask(message = "") {
    $("key-card").hidden = false;
    $("key-forget").hidden = $("key-cancel").hidden = !apiKey;
    updateCounter();
    $("api-key").value = apiKey;
    if (message) showError("key-error", new Error(message));
    $("api-key").focus();
  },
  async submit(event) {
    event.preventDefault();
    const candidate = $("api-key").value.trim();
    clearError("key-error");
    let status;
    try {  // a listing that needs the key: 401 means it is wrong
      const probe = `/v1/voices/${encodeURIComponent(ui.defaultVoice || "default")}`;
      status = (await fetch(probe, { headers: { Authorization: "Bearer " + candidate } })).status;
    } catch (_) {
      showError("key-error", new Error(OFFLINE));
      return;
    }
    if (status === 401) {
      showError("key-error", new Error("That key was not accepted. Check it and try again."));
      return;
    }
    apiKey = candidate;
    localStorage.setItem(KEY_STORAGE, apiKey);
    this.close();
    $("key-change").hidden = false;
    refresh();
  },
  close() {  // the card goes; Generate is back at once
    $("key-card").hidden = true;
    clearError("key-error");
    updateCounter();
  },
  forget() {
    apiKey = "";
    localStorage.removeItem(KEY_STORAGE);
    this.ask();
  },
};

// ---- decoding: every format to float samples as its bytes arrive --------------------------------
// pcm and wav are 16-bit samples; mp3, aac, opus and flac are cut into whole frames (the
// "framers" below) for WebCodecs' AudioDecoder. Without WebCodecs a take plays once complete.

/** 16-bit PCM (pcm, or wav after its header). */
class PcmDecoder {
  constructor(hasHeader, sink) {
    Object.assign(this, { sink, inHeader: hasHeader, pending: new Uint8Array(0), rate: 24000 });
    this.pcm = [];  // the sample bytes, for the saved file
  }
  push(bytes) {
    let data = concat(this.pending, bytes);
    if (this.inHeader) {
      const at = wavDataOffset(data);
      if (at < 0) { this.pending = data; return; }
      this.rate = new DataView(data.buffer, data.byteOffset).getUint32(24, true);
      data = data.subarray(at);
      this.inHeader = false;
    }
    const even = data.length - (data.length % 2);
    this.pending = data.slice(even);
    if (!even) return;
    const chunk = data.slice(0, even);
    this.pcm.push(chunk);
    const ints = new Int16Array(chunk.buffer, chunk.byteOffset, even / 2);
    this.sink(Float32Array.from(ints, (v) => v / 32768), this.rate);
  }
  async end() {}
}

function wavDataOffset(bytes) {  // where the samples start, after the "data" chunk header
  for (let i = 12; i + 8 <= bytes.length; i++) {
    if (String.fromCharCode(...bytes.subarray(i, i + 4)) === "data") return i + 8;
  }
  return -1;
}

/** Compressed formats through WebCodecs; the whole file through decodeAudioData otherwise. */
class CodecDecoder {
  constructor(format, sink) {
    Object.assign(this, { sink, framer: FRAMERS[format](), decoder: null, bytes: [], samples: 0 });
    this.streaming = "AudioDecoder" in window;
  }
  push(bytes) {
    this.bytes.push(bytes);
    if (this.streaming) this.framer.push(bytes).forEach((frame) => this.decode(frame));
  }
  decode(frame) {
    if (!this.decoder) {
      this.decoder = new AudioDecoder({
        output: (data) => this.output(data),
        error: () => { this.streaming = false; },  // e.g. a codec this browser lacks
      });
      this.decoder.configure(this.framer.config);
    }
    if (this.decoder.state !== "configured") return;
    const timestamp = this.samples;  // only their order matters here
    this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, data: frame }));
  }
  output(data) {
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    this.samples += samples.length;
    this.sink(samples, data.sampleRate);
    data.close();
  }
  async end() {
    if (this.streaming) {
      this.framer.end().forEach((frame) => this.decode(frame));
      if (this.decoder?.state === "configured") await this.decoder.flush().catch(() => {});
    }
    if (this.samples) return;  // it streamed
    this.streaming = false;
    const blob = new Blob(this.bytes);
    const audio = await new OfflineAudioContext(1, 1, 24000)
      .decodeAudioData(await blob.arrayBuffer());
    this.samples = audio.length;
    this.sink(audio.getChannelData(0), audio.sampleRate);
  }
}

/** A framer over a byte stream: `scan(buf)` returns [frames, bytes used]. */
function framer(scan) {
  let buffer = new Uint8Array(0);
  const state = {
    config: null,
    push(bytes) {
      buffer = concat(buffer, bytes);
      const [frames, used] = scan(buffer, state, false);
      buffer = buffer.slice(used);
      return frames;
    },
    end() { return scan(buffer, state, true)[0]; },
  };
  return state;
}

const MP3_KBPS = [[0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],   // MPEG-2/2.5
                  [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320]];  // MPEG-1
const MP3_RATES = { 3: [44100, 48000, 32000], 2: [22050, 24000, 16000], 0: [11025, 12000, 8000] };
const AAC_RATES = [96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025,
                   8000, 7350];

const FRAMERS = {
  /** MPEG audio layer III frames, found by their sync word and sized from their header. */
  mp3: () => framer((b, state) => {
    const frames = [];
    let i = 0;
    while (i + 4 <= b.length) {
      const version = (b[i + 1] >> 3) & 3, layer = (b[i + 1] >> 1) & 3;
      const kbps = MP3_KBPS[version === 3 ? 1 : 0][b[i + 2] >> 4];
      const rate = (MP3_RATES[version] || [])[(b[i + 2] >> 2) & 3];
      if (b[i] !== 0xff || (b[i + 1] & 0xe0) !== 0xe0 || layer !== 1 || !kbps || !rate) {
        i++;
        continue;
      }
      const padding = (b[i + 2] >> 1) & 1;
      const size = Math.floor(((version === 3 ? 144 : 72) * kbps * 1000) / rate) + padding;
      if (i + size > b.length) break;
      const channels = (b[i + 3] >> 6) === 3 ? 1 : 2;
      state.config ||= { codec: "mp3", sampleRate: rate, numberOfChannels: channels };
      frames.push(b.slice(i, i + size));
      i += size;
    }
    return [frames, i];
  }),

  /** AAC in ADTS: raw frames, with the AudioSpecificConfig built from the first header. */
  aac: () => framer((b, state) => {
    const frames = [];
    let i = 0;
    while (i + 7 <= b.length) {
      if (b[i] !== 0xff || (b[i + 1] & 0xf6) !== 0xf0) { i++; continue; }
      const size = ((b[i + 3] & 3) << 11) | (b[i + 4] << 3) | (b[i + 5] >> 5);
      const header = b[i + 1] & 1 ? 7 : 9;
      if (size <= header) { i++; continue; }
      if (i + size > b.length) break;
      if (!state.config) {
        const object = (b[i + 2] >> 6) + 1, index = (b[i + 2] >> 2) & 15;
        const channels = ((b[i + 2] & 1) << 2) | (b[i + 3] >> 6);
        const description = new Uint8Array([(object << 3) | (index >> 1),
                                            ((index & 1) << 7) | (channels << 3)]);
        state.config = { codec: `mp4a.40.${object}`, sampleRate: AAC_RATES[index],
                         numberOfChannels: channels, description };
      }
      frames.push(b.slice(i + header, i + size));
      i += size;
    }
    return [frames, i];
  }),

  /** Opus packets out of Ogg pages; the first packet (OpusHead) configures the decoder. */
  opus: () => {
    let packet = new Uint8Array(0), count = 0;
    return framer((b, state) => {
      const frames = [];
      let i = 0;
      while (i + 27 <= b.length && i + 27 + b[i + 26] <= b.length) {
        const segments = b.subarray(i + 27, i + 27 + b[i + 26]);
        const size = segments.reduce((n, s) => n + s, 0);
        let at = i + 27 + segments.length;
        if (at + size > b.length) break;
        for (const lacing of segments) {
          packet = concat(packet, b.slice(at, at + lacing));
          at += lacing;
          if (lacing === 255) continue;  // the packet goes on in the next segment
          if (count === 0) {
            state.config = { codec: "opus", sampleRate: 48000, numberOfChannels: packet[9],
                             description: packet };
          } else if (count > 1) {
            frames.push(packet);  // packet 1 is OpusTags
          }
          count++;
          packet = new Uint8Array(0);
        }
        i = at;
      }
      return [frames, i];
    });
  },

  /** FLAC frames: each ends where the next frame header (checked by its CRC-8) begins. */
  flac: () => framer((b, state, final) => {
    const frames = [];
    let i = 0;
    if (!state.config) {
      let at = 4, last = false;
      while (!last && at + 4 <= b.length) {
        last = (b[at] & 0x80) !== 0;
        at += 4 + ((b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]);
      }
      if (!last || at > b.length) return [frames, 0];
      const info = b.subarray(8, 42);  // STREAMINFO
      const rate = (info[10] << 12) | (info[11] << 4) | (info[12] >> 4);
      state.config = { codec: "flac", sampleRate: rate,
                       numberOfChannels: ((info[12] >> 1) & 7) + 1, description: b.slice(0, at) };
      i = at;
    }
    for (;;) {
      let next = i + 2;
      while (next < b.length && flacHeaderAt(b, next) === false) next++;
      if (next >= b.length || flacHeaderAt(b, next) === null) {
        if (final && i < b.length) frames.push(b.slice(i));
        return [frames, final ? b.length : i];
      }
      frames.push(b.slice(i, next));
      i = next;
    }
  }),
};

/** Whether a FLAC frame header starts at b[i]: true, false, or null (not enough bytes yet). */
function flacHeaderAt(b, i) {
  if (b[i] !== 0xff || (b[i + 1] & 0xfe) !== 0xf8) return false;
  if (i + 6 > b.length) return null;
  const sizeCode = b[i + 2] >> 4, rateCode = b[i + 2] & 15;
  if (sizeCode === 0 || rateCode === 15 || (b[i + 3] & 1) || (b[i + 3] >> 4) > 10) return false;
  let at = i + 4;
  const lead = Math.clz32(~(b[at] << 24));  // UTF-8 style coded frame number: its byte count
  if (lead === 1 || lead > 7) return false;
  at += lead === 0 ? 1 : lead;
  at += sizeCode === 6 ? 1 : sizeCode === 7 ? 2 : 0;
  at += rateCode === 12 ? 1 : rateCode === 13 || rateCode === 14 ? 2 : 0;
  if (at >= b.length) return null;
  let crc = 0;
  for (let k = i; k < at; k++) {
    crc ^= b[k];
    for (let bit = 0; bit < 8; bit++) crc = ((crc << 1) ^ (crc & 0x80 ? 0x07 : 0)) & 0xff;
  }
  return crc === b[at];
}

function makeDecoder(format, sink) {
  if (format === "pcm" || format === "wav") return new PcmDecoder(format === "wav", sink);
  return new CodecDecoder(format, sink);
}

// ---- saved files: every one states its real length ----------------------------------------------
function wavFile(pcmChunks, rate) {  // a WAV with its real sizes, from 16-bit mono PCM
  const size = pcmChunks.reduce((n, c) => n + c.length, 0);
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((ch, i) => header.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); header.setUint32(4, 36 + size, true); text(8, "WAVEfmt ");
  header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
  header.setUint32(24, rate, true); header.setUint32(28, rate * 2, true);
  header.setUint16(32, 2, true); header.setUint16(34, 16, true);
  text(36, "data"); header.setUint32(40, size, true);
  return new Blob([header, ...pcmChunks], { type: "audio/wav" });
}

function flacWithLength(chunks, samples) {  // a streamed FLAC's STREAMINFO says 0 samples
  const bytes = joinBytes(chunks);
  if (bytes.length > 26) {  // 36-bit total in STREAMINFO bytes 13..17 (file offsets 21..25)
    bytes[21] = (bytes[21] & 0xf0) | (Math.floor(samples / 2 ** 32) & 0x0f);
    new DataView(bytes.buffer).setUint32(22, samples >>> 0);
  }
  return new Blob([bytes], { type: MIME.flac });
}

function savedFile(take, decoder) {
  if (take.format === "wav") return wavFile(decoder.pcm, decoder.rate);
  if (take.format === "pcm") return new Blob(decoder.pcm, { type: MIME.pcm });
  if (take.format === "flac") return flacWithLength(decoder.bytes, decoder.samples);
  return new Blob(decoder.bytes, { type: MIME[take.format] });
}

// ---- the player: one transport for every take, while it streams and after --------------------
// A take's audio is a list of AudioBuffers (its decoded chunks). One AudioContext plays the
// current take; loading another stops it, so two takes never sound at once.
const player = {
  ctx: null, analyser: null, take: null, sources: new Set(),
  playing: false, looping: false, origin: 0, offset: 0,  // position: ctx time - origin

  context() {
    if (!this.ctx) {
      this.ctx = new AudioContext();
      this.analyser = this.ctx.createAnalyser();
      this.analyser.fftSize = 1024;
      this.analyser.connect(this.ctx.destination);
    }
    return this.ctx;
  },
  load(take) {
    this.stop();
    this.take = take;
    $("player").hidden = false;
    $("now-title").textContent = take.title;
    $("now-meta").textContent = `${take.voice} · ${take.meta()}`;
    $("player-note").hidden = true;
    renderResults();
  },
  /** Forget the current take: its sound stops and the player goes away. */
  close() {
    this.stop();
    this.take = null;
    $("player").hidden = true;
  },
  /** A take's next chunk: scheduled at once if it is the take playing. */
  append(take, samples, rate) {
    const buffer = new AudioBuffer({ length: samples.length, sampleRate: rate });
    buffer.copyToChannel(samples, 0);
    const entry = { at: take.duration, buffer };
    take.buffers.push(entry);
    take.duration += buffer.duration;
    const added = peaks(samples, rate);
    take.peaks.push(...added);
    take.loudest = Math.max(take.loudest, ...added);
    if (take !== this.take) return;
    if (!this.playing) { this.render(); return; }
    const now = this.ctx.currentTime;
    if (this.origin + entry.at < now) this.origin = now + 0.05 - entry.at;  // waited for audio
    this.start(entry, this.origin + entry.at, 0);
  },
  play() {
    if (!this.take) return;
    if (this.take.complete && this.offset >= this.take.duration - 0.01) this.offset = 0;
    this.from(this.offset);
  },
  pause() {
    if (!this.playing) return;
    this.offset = this.position();
    this.silence();
    this.ctx.suspend();
  },
  stop() {
    this.offset = 0;
    if (this.ctx) { this.silence(); this.ctx.suspend(); }
  },
  seek(seconds) {
    seconds = Math.max(0, Math.min(seconds, this.take ? this.take.duration : 0));
    if (this.playing) this.from(seconds);
    else { this.offset = seconds; this.render(); }  // time, waveform and label at once
  },
  toggle() { if (this.playing) this.pause(); else this.play(); },
  position() {
    if (!this.take) return 0;
    const at = this.playing ? this.ctx.currentTime - this.origin : this.offset;
    return Math.max(0, Math.min(at, this.take.duration));
  },
  /** Play the current take from `seconds`, chunk by chunk. */
  from(seconds) {
    this.silence();
    const ctx = this.context();
    ctx.resume();
    this.playing = true;
    this.origin = ctx.currentTime + 0.05 - seconds;
    for (const entry of this.take.buffers) {
      const skip = seconds - entry.at;
      if (skip >= entry.buffer.duration) continue;
      this.start(entry, this.origin + entry.at + Math.max(0, skip), Math.max(0, skip));
    }
    if (!this.looping) requestAnimationFrame(() => this.frame());
    this.looping = true;
    this.render();  // the label says Pause at once
  },
  start(entry, when, skip) {
    const source = this.ctx.createBufferSource();
    source.buffer = entry.buffer;
    source.connect(this.analyser);
    source.onended = () => this.sources.delete(source);
    this.sources.add(source);
    source.start(when, skip);
  },
  silence() {
    this.playing = false;
    for (const source of this.sources) { source.onended = null; source.stop(); }
    this.sources.clear();
    this.render();
  },
  /** Each animation frame while playing: the end of a complete take, the UI. */
  frame() {
    this.looping = this.playing;
    if (!this.playing) return;
    if (this.take.complete && this.position() >= this.take.duration) {
      this.offset = this.take.duration;
      this.silence();
      this.ctx.suspend();
      return;
    }
    this.render();
    requestAnimationFrame(() => this.frame());
  },
  render() {
    const take = this.take;
    if (!take) return;
    const position = this.position();
    $("play").textContent = this.playing ? "Pause" : "Play";
    $("seek").max = take.duration.toFixed(2);
    $("seek").value = position.toFixed(2);
    $("seek").setAttribute("aria-valuetext", `${clock(position)} of ${clock(take.duration)}`);
    $("time").textContent = `${clock(position)} / ${clock(take.duration)}`;
    $("level").style.width = `${this.playing ? Math.round(100 * this.level()) : 0}%`;
    drawWave(take, position);
  },
  level() {  // the loudest sample sounding now, against the take's loudest: 0..1
    const data = new Float32Array(this.analyser.fftSize);
    this.analyser.getFloatTimeDomainData(data);
    const peak = data.reduce((loudest, v) => Math.max(loudest, Math.abs(v)), 0);
    return Math.min(1, peak / this.take.loudest);
  },
};

const PEAKS_PER_SECOND = 50;
function peaks(samples, rate) {  // loudest sample per 20 ms, for the waveform and meter
  const step = Math.round(rate / PEAKS_PER_SECOND), out = [];
  for (let i = 0; i < samples.length; i += step) {
    let peak = 0;
    const end = Math.min(i + step, samples.length);
    for (let k = i; k < end; k++) peak = Math.max(peak, Math.abs(samples[k]));
    out.push(peak);
  }
  return out;
}

function drawWave(take, position) {
  const canvas = $("wave"), ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth * ratio, height = canvas.clientHeight * ratio;
  if (canvas.width !== width || canvas.height !== height) Object.assign(canvas, { width, height });
  const g = canvas.getContext("2d"), style = getComputedStyle(document.documentElement);
  g.clearRect(0, 0, width, height);
  const bars = Math.max(1, Math.floor(width / (3 * ratio))), n = take.peaks.length;
  const played = take.duration ? position / take.duration : 0;
  for (let bar = 0; bar < bars && n; bar++) {
    const from = Math.floor((bar * n) / bars);
    const to = Math.max(from + 1, Math.floor(((bar + 1) * n) / bars));
    const peak = Math.max(...take.peaks.slice(from, to));
    const h = Math.max(ratio, (peak / take.loudest) * height * 0.95);  // quiet takes fill it
    g.fillStyle = style.getPropertyValue(bar / bars < played ? "--fill" : "--wave");
    g.fillRect(bar * 3 * ratio, (height - h) / 2, 2 * ratio, h);
  }
}

// ---- generation: a request streamed into a take, played while it arrives ----------------------
let takeCount = 0;

/** A take's title: the first words of its text. */
function firstWords(text, words = 6, chars = 48) {
  const all = text.trim().split(/\s+/), head = all.slice(0, words).join(" ");
  return all.length > words || head.length > chars ? `${head.slice(0, chars)}…` : head;
}

function newTake({ voice, text, format, speed, created = Date.now() }) {
  return {
    id: ++takeCount, key: `${created}-${takeCount}`, created, voice, text, format, speed,
    title: firstWords(text), buffers: [], peaks: [], loudest: 1e-4, duration: 0,
    complete: false, file: null,
    meta() { return `${format.toUpperCase()} · ${speed.toFixed(2)}×`; },
  };
}

/** POST the request and feed its audio to `take` (and the player, if it holds the take). */
async function stream(request, take, signal) {
  const decoder = makeDecoder(request.response_format, (samples, rate) => {
    take.firstAudio ??= performance.now() - take.started;
    player.append(take, samples, rate);
  });
  take.started = performance.now();
  const response = await api("/v1/audio/speech", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(request), signal,
  });
  const reader = response.body.getReader();
  for (;;) {
    const { value, done } = await reader.read().catch((error) => {
      if (error.name === "AbortError") throw error;
      connection.check();  // a server that went away: the banner, and recovery when it is back
      throw new ApiError(CUT_OFF, { offline: true });
    });
    if (done) break;
    decoder.push(value);
  }
  await decoder.end();
  if (decoder.streaming === false && take === player.take) {
    const format = take.format.toUpperCase();
    $("player-note").textContent = `This browser plays ${format} once it is complete.`;
    $("player-note").hidden = false;
  }
  take.complete = true;
  take.file = savedFile(take, decoder);
  take.elapsed = (performance.now() - take.started) / 1000;
}

/** Run one request as the current job: the Generate button stops it. */
async function run(request, take, where) {
  player.context().resume();  // created inside the click, so the browser lets it sound
  const job = new AbortController();
  ui.job = job;
  setBusy(true);
  clearError(where);
  player.load(take);
  player.play();
  try {
    await stream(request, take, job.signal);
    return true;
  } catch (error) {
    if (error.name === "AbortError") $("metrics").textContent = "Stopped.";
    else { $("metrics").textContent = ""; showError(where, error); }
    endTake(take);
    if (error.code === "voice_not_found") await forgetVanishedVoice(where);
    return false;
  } finally {
    ui.job = null;
    setBusy(false);
    player.render();
  }
}

/** The chosen voice is gone from the server: list the voices again, fall back to the default,
 * and say so beside the error. */
async function forgetVanishedVoice(where) {
  try { await loadVoices(""); } catch (_) { return; }  // unreachable: the banner says so
  const chosen = $("voice").selectedOptions[0];
  $(where).textContent = "That voice is no longer on the server: " +
    `${chosen ? chosen.textContent : "the default voice"} is selected instead.`;
}

/** A take stopped or failed: its sound stops too; what arrived stays playable, or the
 * player goes away if nothing did. */
function endTake(take) {
  take.complete = true;
  if (player.take !== take) return;
  if (take.duration === 0) player.close();
  else player.stop();
}

async function generate() {
  if (ui.job) { ui.job.abort(); return; }
  const text = $("text").value;
  if (!canGenerate()) return;
  const voice = $("voice").value;
  const request = { model: "pocket-tts", input: text, voice, response_format: $("format").value,
                    speed: Number($("speed").value), stream: true };
  const take = newTake({ voice: voice || ui.defaultVoice, text, format: request.response_format,
                         speed: request.speed });
  $("metrics").textContent = "Generating…";
  if (!(await run(request, take, "compose-error"))) return;
  const speedUp = (take.duration / take.elapsed).toFixed(1);
  $("metrics").textContent = `First audio ${Math.round(take.firstAudio)} ms · ` +
    `${take.duration.toFixed(1)} s of audio · ${speedUp}× real time`;
  keepTake(take);
  if (text === ui.undoText) $("undo-note").hidden = true;
}

/** A voice's short sample, generated once and kept in the page. */
async function preview(voice, where) {
  if (ui.job) return;
  const cached = ui.previews.get(voice);
  if (cached) { player.load(cached); player.play(); return; }
  const take = newTake({ voice: voice || ui.defaultVoice, text: PREVIEW_TEXT, format: "pcm",
                         speed: 1 });  // voice "" is the server's default
  take.title = `${take.voice} (preview)`;
  const request = { input: PREVIEW_TEXT, voice, response_format: "pcm", stream: true };
  if (await run(request, take, where)) ui.previews.set(voice, take);
}

function setBusy(busy) {
  const button = $("generate");
  button.textContent = busy ? "Stop" : "Generate";
  button.classList.toggle("stop", busy);
  button.setAttribute("aria-label", busy ? "Stop generating" : "Generate speech");
  for (const b of document.querySelectorAll("[data-preview], #voice-preview")) b.disabled = busy;
  updateCounter();
}

// ---- results: kept in this browser; play, download or save as, remove with an undo --------------
// Each result is kept in IndexedDB as its file and its 16-bit samples, so that it plays again
// after a reload. The newest KEEP.takes within KEEP.bytes are kept; older ones go.
const KEEP = { takes: 50, bytes: 200 * 1024 * 1024 };

/** The results store: one IndexedDB object store of take records, keyed by `key`. */
const shelf = {
  db: null,
  async open() {
    this.db ??= await new Promise((resolve, reject) => {
      const request = indexedDB.open("pocket-tts-studio", 1);
      request.onupgradeneeded = () => request.result.createObjectStore("takes", { keyPath: "key" });
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
    return this.db;
  },
  /** One transaction: `work(store)` queues requests; resolves with the last one's result. */
  async run(mode, work) {
    const tx = (await this.open()).transaction("takes", mode);
    const request = work(tx.objectStore("takes"));
    return new Promise((resolve, reject) => {
      tx.oncomplete = () => resolve(request?.result);
      tx.onerror = tx.onabort = () => reject(tx.error);
    });
  },
  all() { return this.run("readonly", (store) => store.getAll()); },
  put(records) { return this.run("readwrite", (store) => records.forEach((r) => store.put(r))); },
  remove(keys) { return this.run("readwrite", (store) => keys.forEach((k) => store.delete(k))); },
};

/** What is stored of a take: its file, and its samples as 16-bit PCM to play it again. */
function takeRecord(take) {
  const rate = take.buffers[0]?.buffer.sampleRate ?? 24000;
  const samples = new Int16Array(sampleCount(take));
  let at = 0;
  for (const { buffer } of take.buffers) {
    buffer.getChannelData(0).forEach((v, i) => {
      samples[at + i] = Math.max(-32768, Math.min(32767, Math.round(v * 32768)));
    });
    at += buffer.length;
  }
  const { key, created, voice, text, format, speed, file } = take;
  return { key, created, voice, text, format, speed, file, rate, samples };
}

function restoredTake(record) {
  const take = Object.assign(newTake(record), { key: record.key, file: record.file });
  player.append(take, Float32Array.from(record.samples, (v) => v / 32768), record.rate);
  take.complete = true;
  return take;
}

const sampleCount = (take) => take.buffers.reduce((n, entry) => n + entry.buffer.length, 0);
const storedBytes = (take) => take.file.size + 2 * sampleCount(take);

function storeTakes(takes) {
  shelf.put(takes.map(takeRecord)).catch((error) => showError("save-error",
    new Error(`This browser could not keep the result for later (${error?.message}).`)));
}

/** A finished take: first in the list and stored; the oldest go past the cap. */
function keepTake(take) {
  ui.takes.unshift(take);
  let bytes = 0;
  const over = ui.takes.filter((t, i) => (bytes += storedBytes(t)) > KEEP.bytes || i >= KEEP.takes);
  ui.takes = ui.takes.filter((t) => !over.includes(t));
  storeTakes([take]);
  if (over.length) shelf.remove(over.map((t) => t.key)).catch(() => {});
  renderResults();
}

async function restoreTakes() {
  try {
    const records = await shelf.all();
    ui.takes = records.sort((a, b) => b.created - a.created).map(restoredTake);
  } catch (_) { return; }  // no IndexedDB (a private window may refuse it): this session only
  renderResults();
}

function renderResults() {
  const list = $("results");
  list.replaceChildren(...ui.takes.map(resultItem));
  $("results-empty").hidden = ui.takes.length > 0;
  $("clear-results").hidden = ui.takes.length === 0;
}

const TIME = { hour: "2-digit", minute: "2-digit" };
function when(created) {  // "14:05" today, "3 Dec, 14:05" before
  const date = new Date(created), today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString([], TIME)
    : date.toLocaleString([], { day: "numeric", month: "short", ...TIME });
}

function resultItem(take) {
  const item = element("li", { ariaCurrent: String(take === player.take) });
  const about = element("div", { className: "grow" },
    element("div", { className: "snippet" }, element("b", { textContent: take.title })),
    element("div", { className: "meta", textContent: `${take.voice} · ${when(take.created)} · ` +
      `${take.meta()} · ${take.duration.toFixed(1)} s · ${fileSize(take.file.size)}` }));
  const name = `“${take.title}”, ${when(take.created)}`;
  const button = (text, action) => rowButton(text, `${text} ${name}`, action);
  const buttons = element("div", { className: "buttons" },
    button("Play", () => { player.load(take); player.play(); }),
    button("Download", () => download(take)));
  if ("showSaveFilePicker" in window) {
    buttons.append(button("Save as…", () => saveAs(take).catch((e) => showError("save-error", e))));
  }
  buttons.append(button("Delete", () => removeTakes([take])));
  item.append(about, buttons);
  return item;
}

/** Take results off the list and out of storage; Undo puts them back until the next removal. */
function removeTakes(takes) {
  if (takes.includes(player.take)) player.close();
  ui.takes = ui.takes.filter((t) => !takes.includes(t));
  ui.removed = takes;
  shelf.remove(takes.map((t) => t.key)).catch(() => {});
  $("removed-text").textContent = takes.length === 1 ? `Removed “${takes[0].title}”.`
    : `Removed ${takes.length} results.`;
  $("removed").hidden = false;
  renderResults();
}

function undoRemove() {
  ui.takes = [...ui.takes, ...ui.removed].sort((a, b) => b.created - a.created);
  storeTakes(ui.removed);
  ui.removed = [];
  $("removed").hidden = true;
  renderResults();
}

function fileName(take) {
  const stamp = new Date(take.created).toISOString().slice(0, 19).replace(/[:T]/g, "-");
  const voice = take.voice.replace(/[^\w.-]+/g, "_").slice(0, 40);
  return `pocket-tts-${voice}-${stamp}.${take.format}`;
}

function download(take) {  // one click: the browser's downloads folder
  const link = element("a", { href: URL.createObjectURL(take.file), download: fileName(take) });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

async function saveAs(take) {  // the system's save dialog: a folder and a name
  let handle;
  try {
    handle = await window.showSaveFilePicker({ suggestedName: fileName(take),
      types: [{ description: `${take.format.toUpperCase()} audio`,
                accept: { [MIME[take.format]]: [`.${take.format}`] } }] });
  } catch (error) {
    if (error.name === "AbortError") return;  // the user closed the dialog
    throw error;
  }
  const writable = await handle.createWritable();
  await writable.write(take.file);
  await writable.close();
}

// ---- voices: the menu, previews, cloning (pick or drop anywhere), removal after a question -----
/** "English model on CPU": what a person needs from /health (details in its tooltip). */
function serverWords({ language = "english", device = "cpu" }) {
  const name = language.charAt(0).toUpperCase() + language.slice(1);
  return `${name} model on ${device.startsWith("cuda") ? "GPU" : device.toUpperCase()}`;
}

async function loadStatus() {
  const health = await (await api("/health")).json();
  ui.maxChars = health.max_input_chars || ui.maxChars;
  ui.defaultVoice = health.default_voice;
  ui.auth = health.auth;
  $("key-change").hidden = !health.auth || !apiKey;
  if (health.auth && !apiKey) keys.ask();  // listings are open: ask before the first 401
  $("status").textContent = serverWords(health);
  $("status").title = `Model ${health.model}, ${health.precision ?? "float32"} on ` +
    `${health.device}; ${health.voices} voices`;
  updateCounter();
}

async function loadVoices(select) {
  const listing = await (await api("/v1/voices")).json();
  ui.defaultVoice = listing.default;
  const current = select ?? $("voice").value;
  const voice = $("voice");
  voice.replaceChildren();
  if (!listing.data.some((v) => v.id === listing.default)) {
    // A default given as a file path is not a listed name: "" asks the server for its default.
    voice.append(new Option(`${listing.default} (default)`, ""));
  }
  const groups = [["Your voices", (v) => v.origin === "upload"],
                  ["Voices folder", (v) => v.origin === "folder"],
                  ["Built-in voices", (v) => v.kind === "builtin"]];
  for (const [label, belongs] of groups) {
    const entries = listing.data.filter(belongs);
    if (!entries.length) continue;
    const group = element("optgroup", { label });
    for (const v of entries) group.append(new Option(v.default ? `${v.id} (default)` : v.id, v.id));
    voice.append(group);
  }
  const known = (id) => [...voice.options].some((o) => o.value === id);
  voice.value = known(current) && current ? current : known(listing.default) ? listing.default : "";
  const aliases = listing.data.filter((v) => v.kind === "openai");  // API names, not voices
  $("aliases").hidden = !aliases.length;
  $("alias-list").textContent = aliases.map((v) => `${v.id} → ${v.maps_to}`).join(", ");
  const inUse = new Set(aliases.map((v) => v.maps_to));
  renderVoices($("my-voices"), listing.data.filter((v) => v.origin === "upload"), inUse, true);
  const onServer = listing.data.filter((v) => v.origin === "folder" || v.kind === "builtin");
  renderVoices($("server-voices"), onServer, inUse, false);
  markSelectedVoice();
}

/** A tile per voice: its name, a sample to play, Use, and Remove for your own. */
function renderVoices(list, voices, inUse, removable) {
  list.replaceChildren(...voices.map((v) => {
    const item = element("li", {}, element("b", { className: "grow", textContent: v.id }));
    item.dataset.voice = v.id;
    if (v.default) item.append(element("span", { className: "badge", textContent: "default" }));
    const button = (text, action) => rowButton(text, `${text} voice ${v.id}`, action);
    const listen = button("▶ Preview", () => preview(v.id, "voices-error"));
    listen.setAttribute("aria-label", `Preview voice ${v.id}`);
    listen.dataset.preview = v.id;
    listen.disabled = Boolean(ui.job);
    const use = button("Use", () => useVoice(v.id));
    use.dataset.use = v.id;
    const buttons = element("div", { className: "buttons" }, listen, use);
    if (removable && !v.default && !inUse.has(v.id)) {
      buttons.append(button("Remove", () => removeVoice(v.id)));
    }
    item.append(buttons);
    return item;
  }));
  if (!voices.length) {
    list.append(element("li", { className: "empty", textContent: removable
      ? "None yet: add a recording above." : "None." }));
  }
}

function useVoice(id) {
  $("voice").value = id;
  markSelectedVoice();
  $("voices-alert").textContent = `${id} will speak the next take.`;
  $("text").focus();
}

/** The voice the menu has selected is marked in the Voices card, and its Use says so. */
function markSelectedVoice() {
  const chosen = $("voice").value || ui.defaultVoice;
  for (const tile of document.querySelectorAll("#voices li[data-voice]")) {
    const selected = tile.dataset.voice === chosen;
    tile.classList.toggle("selected", selected);
    const use = tile.querySelector("[data-use]");
    use.textContent = selected ? "✓ Selected" : "Use";
    use.setAttribute("aria-pressed", String(selected));
  }
}

function pickCloneFile(file) {
  if (!file) return;
  ui.cloneFile = file;
  $("drop-text").textContent = `${file.name} (${fileSize(file.size)})`;
  const stem = file.name.replace(/\.[^.]+$/, "").slice(0, 64);
  if (!$("clone-name").value) $("clone-name").value = stem;
  $("clone-add").disabled = false;
  clearError("clone-error");
}

async function addVoice() {
  if (!ui.cloneFile) return;
  clearError("clone-error");
  const button = $("clone-add");
  button.disabled = true;
  button.textContent = "Adding…";
  try {
    const form = new FormData();
    form.append("name", $("clone-name").value.trim());
    form.append("file", ui.cloneFile, ui.cloneFile.name);
    const voice = await (await api("/v1/voices", { method: "POST", body: form })).json();
    ui.cloneFile = null;
    $("clone-file").value = "";
    $("clone-name").value = "";
    $("drop-text").textContent = `Added “${voice.id}”. Drop another recording to add more.`;
    await loadVoices(voice.id);
  } catch (error) {
    showError("clone-error", error);
  } finally {
    button.textContent = "Add voice";
    button.disabled = !ui.cloneFile;
  }
}

function confirmRemove(name) {
  const dialog = $("confirm");
  $("confirm-text").textContent =
    `Remove the voice “${name}”? Its recording is deleted from the server.`;
  return new Promise((resolve) => {
    const answer = (ok) => () => { dialog.close(); resolve(ok); };
    $("confirm-ok").onclick = answer(true);
    $("confirm-cancel").onclick = answer(false);
    dialog.oncancel = answer(false);  // Escape
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

async function removeVoice(name) {
  clearError("voices-error");
  if (!(await confirmRemove(name))) return;
  try {
    await api(`/v1/voices/${encodeURIComponent(name)}`, { method: "DELETE" });
    ui.previews.delete(name);
    await loadVoices($("voice").value === name ? "" : undefined);
  } catch (error) {
    showError("voices-error", error);
  }
}

// ---- wiring ------------------------------------------------------------------------------------
function canGenerate() {  // some text, within the limit, and no key being asked for
  const length = codePoints($("text").value);
  return $("text").value.trim() !== "" && length <= ui.maxChars && $("key-card").hidden;
}

function updateCounter() {
  const length = codePoints($("text").value), over = length > ui.maxChars;
  const limit = ui.maxChars.toLocaleString();
  $("counter").textContent = `${length.toLocaleString()} / ${limit} characters`;
  $("counter").classList.toggle("over", over);
  if (over !== ui.over) {  // announced when it changes, not on every keystroke
    ui.over = over;
    $("counter-alert").textContent = over
      ? `The text is over the ${ui.maxChars.toLocaleString()}-character limit.` : "";
  }
  $("generate").disabled = !ui.job && !canGenerate();
}

function usePrompt(name) {
  const previous = $("text").value;
  const typed = previous.trim() !== "" && !Object.values(PROMPTS).includes(previous);
  $("text").value = PROMPTS[name];
  ui.undoText = typed ? previous : "";
  $("undo-note").hidden = !typed;
  updateCounter();
  $("text").focus();
}

function undoPrompt() {
  $("text").value = ui.undoText;
  $("undo-note").hidden = true;
  updateCounter();
  $("text").focus();
}

function refresh() {
  loadStatus().then(() => loadVoices()).catch((error) => showError("compose-error", error));
}

/** Drop a recording anywhere on the page: it is cloned at once. */
function wireDropAnywhere() {
  let depth = 0;
  const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth++;
    $("dropzone").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    if (--depth > 0) return;
    depth = 0;
    $("dropzone").hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("dropzone").hidden = true;
    const file = event.dataTransfer?.files[0];
    if (!file) return;
    pickCloneFile(file);
    $("voices").scrollIntoView({ block: "nearest" });
    addVoice();
  });
}

document.querySelectorAll("[data-prompt]").forEach((chip) => {
  chip.addEventListener("click", () => usePrompt(chip.dataset.prompt));
});
$("undo").addEventListener("click", undoPrompt);
$("text").addEventListener("input", updateCounter);
$("speed").addEventListener("input", () => {
  $("speed-out").textContent = Number($("speed").value).toFixed(2) + "×";
});
$("generate").addEventListener("click", generate);
$("voice").addEventListener("change", markSelectedVoice);
$("voice-preview").addEventListener("click", () => preview($("voice").value, "compose-error"));
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    generate();
  }
});
$("play").addEventListener("click", () => player.toggle());
$("stop").addEventListener("click", () => player.stop());
$("seek").addEventListener("input", () => player.seek(Number($("seek").value)));
$("seek").addEventListener("keydown", (event) => {  // arrows step 5 s; Space plays or pauses
  const step = { ArrowLeft: -5, ArrowDown: -5, ArrowRight: 5, ArrowUp: 5 }[event.key];
  if (step === undefined && event.key !== " ") return;
  event.preventDefault();
  if (step === undefined) player.toggle();
  else player.seek(player.position() + step);
});
$("wave").addEventListener("click", (event) => {
  const box = $("wave").getBoundingClientRect();
  if (player.take) player.seek(((event.clientX - box.left) / box.width) * player.take.duration);
});
$("clear-results").addEventListener("click", () => removeTakes(ui.takes));
$("undo-remove").addEventListener("click", undoRemove);
$("clone-file").addEventListener("change", () => pickCloneFile($("clone-file").files[0]));
$("clone-add").addEventListener("click", addVoice);
$("key-form").addEventListener("submit", (event) => keys.submit(event));
$("key-forget").addEventListener("click", () => keys.forget());
$("key-change").addEventListener("click", () => keys.ask());
$("key-cancel").addEventListener("click", () => keys.close());  // the saved key stays
wireDropAnywhere();
connection.watch();

$("text").value = PROMPTS.greeting;
updateCounter();
refresh();
restoreTakes();
</script>
</body>
</html>
"""

# The logo's mark (a pocket holding a waveform), square, for browser tabs.
FAVICON_SVG = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64">
<rect x="2" y="2" width="60" height="60" rx="12" fill="#ff6b4a"/>
<path d="M2 14a12 12 0 0 1 12-12h36a12 12 0 0 1 12 12v4H2z" fill="#e2553a"/>
<g stroke="#fff" stroke-width="5" stroke-linecap="round">
<path d="M16 34v8M24 28v20M32 24v28M40 30v16M48 35v6"/></g></svg>"""

LOGO_PNG = base64.b64decode(  # pocket-tts-logo.png, drawn by tools/make_logo.py
    "iVBORw0KGgoAAAANSUhEUgAAAUAAAABQCAYAAABoMayFAAAmPUlEQVR42u19eXxd1XXut9Y+515NHvCk0fbPtiQbYWyBAoGm"
    "iWxCwQNJmqaXtISENLxOadLSPpI2IY1QaJO+vNfSIXPTDFDyGl9eCQmDiSn2LVMgmBgDwpaNwUazsY0tWdK99+y13h/nXE1I"
    "suRBnvb3+10P5+y9zz777POdtde0AQcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH"
    "BwcHhzMadDyV9DjrnUWDom5qODg4DMOGRMJoImHO9fvUBvDm+nrPPXEHBycBhqSQSBhKJi0APHddXcESE8TeAtAdyDkhDU7z"
    "WAFAjnq65NGth4dKuk4idHA4jwlQASJAd1x3yXt94MZA9SoBpqmcewPCTIFH+rSC7q164Fd3D71/N10cHM4zAtQGMBqhO9fV"
    "fjFu+PYYE3qtQM5hRWCeYfhM6M7aDYHvffLCn/zyoJMEHRzOMwLMLXtfXLvy9vL8eENHfzoIGYDObT2gqgBki/P8WFd/5tEL"
    "L3/hWgCgRoibMg4O5wEBDpDftStXFcXMY/1WAgE8OsctwMN5EJlZcS92MB3cdtHD2748VA/q4OBw9oOPyZBMN8eYSaB0PpFf"
    "ePPq9QWiIHzipURNDBuSTgJ0cDjXCVABomTSPvH+pdMIelVvYM/9Ze+o4jFxvxXNY1rk9/q1RNDzwQ3IwcFJgABm9hufQAXn"
    "s+ZfAXhErCTT3HRxcDiPCFB8oyCn+BdAVdnp/hwczicC5KwlAN757vvBBGKQiwxxcDhfCFAVdGTG9D4FOnwmQPW85EEmUMZq"
    "JmvRBgCoqXG+gA4O5zIBEqBYVW9+LfmLPhXcH2fCebkUVrUFhqlf5PnlG7e9og1gamx0lmAHh3N+CTxvngLAovLZC9kYqJxn"
    "LjAAQEQZUcyfd0GxNvxBPhqhivNwHE7yqEbzjjEBNywHh9NDgBs2iDbUewWF+VVzZs+AqJCq4nxwBqToBrOBpRnTC3XGjKIS"
    "tLfNiULhHAGeoFwNQIb8HBxOG7wxZigRkb518zXTZ8TtIi8/jkXl86ht/yFkMgFAAJ3DPKBQGGZUzJtFs2YUCpjy4WkVgH1I"
    "JAjJpJs5x/exlbllVbWeMf+gaqFK3UH/gRsPHDjQHX1YnH7V4fQTYA4zYr6CRKGKosI8LInPQ/fRfnT39kNEzjkS1Ej6K8yL"
    "Y1pRHmKxGGAj7xcVJ62c+NIXpGYuMa+GAmolyM/P98/Q/hqgnlAPIJWatLSqiYRBV1f4gqxKybHiyCdb3mEKCHAYRGEMY+aM"
    "IsycUXjufqsHMgAq4Djv5A8va1ZFbJhvgt5i5jN1JlkgBaSO8z6HxoynTn55h6kmwEhEUpEBHdnUstIUvScaevyQ0/SdyocZ"
    "hhOqmjO0f1oyv+omAi8CABFs6WzduQVoYGB8LwBVEBG0aX3tTXGmRTFm9ATBlgsffGGLNjS8zYtgsuUdTicBAlNLDMxAEITS"
    "mO+Hf0+BO6Ijv/OeoFUVnzbG1BERVNIFALYAW/iYS+Hbo/qCT8/K8+tiTDicsWH9LaPUn2x5h9NLgFM3DQk42g3MmAUYH3hr"
    "PxCLA2ymhARP5QJ7UNYcdpyB+hHUm5KonB7ntQioH8XSf0LtIuxrgoCuIf2dp0BST9ELS2+X04/VP9Dw8Zxc/wh0SCQICAQQ"
    "90x+IaGHDmayQYwJUPSc7PID9RrAaEpQTn+4BcCqefMUyaS4BL5nKwESAek+4JoEcO2HAT8O/HIzcO+3AbFnMwnqKC82A7DI"
    "6ZxGh4nKTJAsEgwkbXi91DgvfMIASZkEEUbEAgskxyuDk0iEk5GChvQPGGM8x+sfDZ5XD2APRFAREx7fn/NdHPXjEfmIsjYA"
    "Lz9LHoE8AoFITUhU+zl0pg/rT7b8267VAAqNJaM/C00kjCPCs40AmYHeHuBda4EP/8ng8VXvD4nvrr8HCgrPQgKs92YsfL2I"
    "jVE+7MuBAzt7c8RXUlI5F4YuE1A1E2YAahncpkwvtO/b8XxUjiYg/UTK0qQFQOXlVSss6GIFKgDNA6ifid5glZdaW3dtj8oN"
    "qTcuBki4rGzJfCG+TEkrCZyvin4C7Vajz3fua37tOEh7XPJbuHBhnur0/J6ePhubhXgGSB/cvfvIiH4PXG/2/KVlBngHq1QD"
    "VKiKNBh7BLJ1/xu7Xx2nfwogiP49cI4UmZAwmzLH+PIoGsP6L61VOyC6EjIhUQ2vP9nyQzrJBAgaodvXX7w4X/kdWdBiUs0T"
    "wlEDavZN8AtKJjtzZOlI8EwiQKLokYyi09NoGrx73aAlNqeUu/wq4Gc/BHqOAJ53tpCgAWBL57dfoZJ3v1oRytMjc+fWrGT2"
    "lP30lxR6AxGXeDkv88gQo6JaMr/6BUDv7Hhj113HIKucpGRKKqr/EER/YFWXE7HhEe1akC2Zv/QlqH6no6X5W1G98SQtExJ1"
    "1YXk8ecFeh0Rz+Qhz1FVAEFPcUX1RkXwpa6WPS+eIAlG16ysSQvfr5qZGSswMfSjLU/oAwCG+g4aALasbOlSZf2cQq8j0Gxi"
    "b9h9k+JoaUX1I5K1X+zsfPXlwf4lDJC0JWVVN5ExN6narCpdGnqEAiDcXFJevQqkTGSILP9FW1vTttyY5TKFN62vvWmm7910"
    "MBNkWXFpRhRhPl26uWntylVKxIVM1Gfx2Qsf/tVzr6y95PdmxM1Hj1U+LfIXSx96YZs2NPDtjY0gQJ67umbBjHj8KwJ8wPeo"
    "cBoziICsKDKisOIfaF53yQ+OMH+RHtja60jwTCFAZiCbBbJpwHhAPO/t7iZEg8Q39GeDs9ZCIYIYG54V/S/ueYdEzLQkGW8d"
    "RQQiVo4oIQ3FNGbOo1ABVUtkflhaUfUb7UvKfi/ySRtNhyhzFiwr9UV+RGxWhW4m4WpNxPYoqI+g+URcRMQG0JXE5uulFdW/"
    "nWX+yJv7drSPQa4hEZVX3khM3ySiIihF9xQcVVDvkP4WMdFvi/rrSsqXfryjdWfyOEnQALAXlC5eoIYfYtBCIoKqHgLho21t"
    "O5qHEj4AO6+i8gaBfouZp+VGZ6B/0EImU0BEhSD6LY7hN4rLKm/obNv9QNhOqD9TYKXv+atFCCIS5v9QBbFZxBxahIkYgWZK"
    "hukmI/2bFawsyfNXGwK6sxZpUVgFinyzqMjjRVaB6R7jte6+0uh6tRMp//rRvhIAeLkp6TUCmVeuvXip73ub8g3P749I80CQ"
    "PQxFQESzCzxGWnX2BXHvf2rGXtG85vJ1eOezPdroNvYaSx8ytcvbGRcAK64EyheFho6Jktp45YjC9s9YgiSNMuqoAgeVp91u"
    "2KwTG6gV+Xco1rDa5T68ZWT1UhX9I4XuBgCxNk3Gv7H41bbvhy99gkeQH81YuHCmJ7qR2KwSsWmAoCKPqMiHhLHSh7dMGCtV"
    "5EMq8ghAELFpYrPaE3n4gsWLZ2DAcDKciIorqm9m492tioKQE+RXVvVGYazw4S1jwSWi9tOq2i4qgGo+MX5cXL5kdUR+ZpJz"
    "0paVLZud53kPMtFCVYhC3wzEvrfjjZ3PRe3JIDlXf9Swdw+AQg1dtZ4SyO/k+ieQlSryMYW+FEqrKCI295YuWFYHQFCzn6Mp"
    "tC2w2UdtEDwiIofCYwQV2WOD4FFrg01BkH3UinYM+whFcfMAtnX0Zx59sz/7SNrqIUMEnwk9Wbunsy/z6P50ZlN7X/ZRGK8t"
    "bFt+NZHyAagDAPZ3NYkmYIT5+3Hm+UcDG2St3ZW28kGPcJGvdKEhfWe/6L/GmHEgHfTP9M27MtT/dWqEJBMu9no0ndFoOoZw"
    "YfPH6y8Ay6tgvgCiJxYHywz0HgVWvBP42K3AzNmhi8tPfwA89CMgvxDISS39vcBn7gSqVwyXBHt7gNtvBroPD18CT0SqPG6z"
    "hQpiHiNtr6JvPrT5ODZGCkmkfOlqZnpMVRTQACCPiHqtyke7WnbdN1rFsrJls4Xlp0T8ayLSb4zJEw0+3vHGrh8OkaxyJHAP"
    "G3ODtbafmfMg9rb21l1fHqtTpeVVnwObL+fatTb4UWfrro+MbLd0wZI6Fe8XgIKIPRX9Sdzr/929e/f2j2xz3oKqxay0BYpS"
    "IjIquodk2or29q19QL0BUsGQcYAqDsVN/5J9+/YdGkK+Wly8ooD8/k3EfKWKCIDDCl3T2bLr2WjVEuRIcF7F0uUMfQ6AIWIj"
    "qt/sbNn5qdGW87MqK6fH+nkjEV0BEInKtoriaZdv3brVjixfUlG9iYiuJiIE1t7WNc5YjoamtSs35Xnm6jgT3srY2y56eNuX"
    "T6T8hkTCXJ9M2peuW/HrBeQ93heI+EzpjNV3LN+4rWlkey+vrf27Ip//sidr+33mWEalbvlDL2yLjCrOtWZKJUCikKDmFAM3"
    "fz4kP2sBzwC/9T+AlVcA/UdDIptqqfI0rIYBMkREVvSPQvKr86MXOkcCDNT5bW07DmSg1yvkABF8VRFV+lJx8YrCsJ16LyLX"
    "VcR8g7VBxhjOE5V/Dcmv3ovK8GC74bH21l1fEbHfNYbzrA0yzOaGkopl9SH51XuRdENizZ1E5IFAqrrDo6M3hORX5w9vtzLe"
    "tW/XHhX9YyL2RDTNhpcod38IgFZWtpoJzkWGn05G5GcB6hax60eQX076Uob+AxHHiIhVZXNny85PhudG3ndN7ODu3UcC4Y8r"
    "0K8qwsy1rR09H4ik6tz4R/XUGyIlxHNtDGlzVMFBG+BpA1ijBLrhJ1rj2gDWRE0sPAeabPm5uTA5i8s9Is0zzBmRbcs3bmt6"
    "rq7Ob0BYbnN9vbchAVPQe+j2o4F9c7rv5c3N85kUnwCALVvqnRR4Wggw0w9ULAEKp4WuLMYAgQ2luOpaIMhMnrQGpMorgL/6"
    "GvCnXwY+/w1g/Y1AX2+kAzuzoKpCxCwiT3W1Nv97+KJuzUZSV87dQcJjdf7Bll2tUPknZmNEJGDmBeT1rgWgNbmlG+QWAEpE"
    "nhU5YIQ/Fz7blACpIJJuonZTQeQaw0bNX1mRAxHBqaq9BQCidmVu2ZIrmendqjYgYiNWvtTS0tI3pM9D2t2dBmA6W3c9qGJf"
    "NsbkgRgg/T0AiMVi4+ue6usJgJSUV9/FTGtVxBLQa61e19X26tMjyM8AkJKK6suI6GqN4rRF5fOD50fed1MGqPfebNvRrCoP"
    "ETGHNg79aFglCQzPVKMjTHMCzB3t3HCrLpCL4x1Wnxoh6Jor1IgBt5TJlF+Vm/LE02hQURH+WQfcDigBujqVCoAEFqX29kPp"
    "nwPFE4cy2ceJkQaAVatSTvo7JUYQokHCCfVAoxg2oqiOHNHllrZB9jhW1yOkysJpw6XK1j3A9l+ES+szK6ZXiQhEdM+xb3qr"
    "BUDCdA+svY2IvNDmyusA3NvU1JQpqayciz5arSpgZrYi/9nWtuNAzrI5thSaMG1tyQPFFdX/ycy/LyJKoKtKKivnNjU1vRm+"
    "bOaDIFIoGRF7IN2beTjsc2qMdhMAklDCt1T1oypWFXQIgNfU1JQd3TgkoYSWSgUl5VVfY2NuELGWCP2q8r797bufGEF+CB2c"
    "UwDwwci2ySL6ypwZsee7Sup8bAWAolHm9uteXV0dtXUceQSMD6kIAXpZcfGKws7O7UdxBqc62zLwGmk7AEpbG+QZvqTp2kuu"
    "rPnO1qeB0O9vS1cXrUomrQJED2+7A8Adw94at/w9BQTIDGTSQDpSC8XzwqiNtxHPEPeXiRo3Ji1VBuHf1bXA8/8NUNGIejxo"
    "6yQK602l0pXIiAg01Fsdw1EZAoC69u16rbiiegcTrVRVKOmKSHoXSqMWzNNVbFYBn5Q2hQPddYxB7aLwfaJNCvw+VANino40"
    "agFsigpdBlUiYqjIS4cP730L4/oMhoTb2bLrawC+NkLXnHP4HgZrCxiAFJdX/w0Z/hMRqyBKi2Tf39m6JxVKm6lgeK3cmOkV"
    "oZWWoFY2NzWN76cHINi6dS/KypalJKfTJprH3D8fwI4zmgBXpQQpgCGPHg1sYIggqr7n4YGd6y9pyGbTP6Jk8uBQnaF2dRFy"
    "El9jKCE6yjvZBEgM9B0FShYAl747PPb840DHPiAvMmycyqX1ZKRK5jDCJAhCp2obAAVFmOJUdEZV+oxK+yTUFBbQXSBeqWEa"
    "snmzly4tPLBzZ7darmQPUAKpCAKV3RMg1hyJaODZ3Z7lkAqIIAFXAthUWlpaoMB81UiwJ+wd3p8JG9fGDLkjgmlvb36zuKLq"
    "U4b5NhEJADpqNfjw/tY9j4V6xlR2lLYFqPOh3QsGIndBy0sqqhtUlYnIjtMvFcjsyOJGRMTwdfbQ82fii9rYCNmQgFmafHHP"
    "S2trvzg3z/vywXQAAS6Y5vG/QGOf27Hukk1KsomBLUuTyVYA0FVgR36nigCZgf4+oHI58Km/AQqnh8evSQBf+wLwahOQl3+q"
    "ZaqJSZU5Y8niGuC9vwVcMAd48Rlg0/8LJUbmKXOsJlCaOX50CEGMpxwLl3uK/bm3U1ULY0cQB9AN1tmR7YRVkWaPDk/qESod"
    "VkWaiHyAELYHEM3IF7LTQ3UTgRRHRiw/x13mT+TjpaLdpeXVt4DoTrE2Q8bEROxf72959RGgMg5sTY9VfVbl4Xzt5+k5/mPm"
    "9xDzeyb0nisgudUJEcRq/Gx4Wa9Pwm5IJMzyZPIrL6+rPRpnuiPP8PSeQEBEZXmGbiKYm/oDfat5Xe1GJf4GNT7/eHTLzhF6"
    "DOni+CEaSlIfuSUkvyAb/gqnh8fYhGVO+11yuDxfdCFwy/8C3vleoHol8KE/AG78MyCbmdLuKKDMPTpJ0rRDyMMS5fLoDbP0"
    "KBHLJNsdIaGF7akKQYfODz25y0NVIUKxEu4MF6Pkq6oS+M/mzq9ckjOqjFXdZrMMVZP7ZolIv7XBfmuDAxP4HYTqYai+paKH"
    "Qdpztryw1yeTVhvAFz207Z970ra218rfM3Svz2F64owoLHRm3DO/4zH+e9f6S7677TdWFBLcfjYnlwBzkRkzLgBmF4fDa7zw"
    "pxoem3FBWOa0jzuFJLfmd8IlbzYb6v7EAr++DlhYFRIk81T1hoOgYIIXS2lEP9NyLEWqPaqH+8Jv0IDEJ0SIw45Ueh6Dh4SK"
    "iBAPl5U60F5+fpAloH9gDUuYPrQ/E5hXJvqNd58ehdL7EagGISnSEk/5/oqKmlnRUnvU+gWZORkC9QEKYiaC3hPn/qWaiV/E"
    "lpaN9yOryySWXSqx7DLxM0s7W2q35nj1bHhpqTEMv6vdtP216gd+das1BRdbq2t7rdwZWHkl3zAyIugLbDA9Zm6O+fzT5jWV"
    "8dsbQI4ET7YOMHS9H74MJRrdEny6oBqm1JoxK/p3bskb9XHGrKk0hqhC8wPPzgBwYAJ6p8hlQhdGm7VAoW3t7e29AGBYX9co"
    "2JXYEMQuAPBymK5qvL1LEgQkiVQWEBtSsaoKeIzXAGDPnvlHS8rbDhBRWZTmpGLCy9uJZW8RIiIF+kjsavF4hSHzfWttvzF8"
    "UdYG91VWVl6ze/fu7Ghj1N6+ta+kouoAEZdHoq8fOVQfB147a15YbQAnm0BJDKbComSyG8BGABu1vv6zuwq614BxR6Fnavf3"
    "Z/vn5vlXHUhP+2RjI+5cVV/vITXSqOQI8MRlmgkdO61TJ3STGakvnHJLsAbMJoZsUBm9eXSMgdULLlg8Q4HlUFFiBgTbBliE"
    "6QUKbAZEHhGghPcAeGiCVmAlwrvDemRUJC0ebY8kvQCofg2gizUMH1tWXFxc2NnZeXQc0iYAWla2rFqYSoAAovRWV2vz9lE/"
    "AyAr0I90tb/6PIDni8urLzLG3BqSoHlPTz/dBeDDI9J2DSQ/UNBuAl0MVYLqkqhlMw4BMwCdV1693GO6VEQE4L6O1p33IXSz"
    "OeOlo0E3ltzHLRl+nxIJ3tLVRRSS2wOb62u2lBbGUnmGLzmaFVGVGxX4R6RSFm4DqpOkAzzbMKa7zdTNe9XQD1CYPhBOwrpx"
    "nkG9AaCxfG8Nk5mjqgEUBJIHAKC+vt7r3LvzdSX8kohJRBVKiZqamli0VB3nhlNaU1MTg+J6EVUiJiV9rnPvztfr6ur8UKqS"
    "J8MkBJJhNqUmPv1KDOQbHHMgyZLcR6wpZi9FpLcCQGVlpTfiWXiqeiTfpDcCYNTXe52tzZ+xYu8NQ/NsPzNfP6+i+p9C95r6"
    "IfrAMNEpq6YojFBRAl1cUlI5F4Nbl+ooPwIgBP0Ssfk+e94PlbQxIswzlvy0IXxPd66vXdm8/pJNTWtrH35l3SUPNa+5uEIB"
    "uh0gSibt6kiya16zJr461dQTAP8nxkxpFQZh/jNrLp9GZ3M6YUeAJ0EKPO0cTEbEChHfOKd8cVUYUVETG/ECUuT/ZmtQEyPC"
    "FxQqzOyJ2h2zpscfA0CpgbvibxIRqWqGDC8+cCRzS6jPqvFHecYcHbcHjgS3kDGLVDVDBFLoNwGgr6+PAMCIuV/EBkRgECCW"
    "PhMO4p6Rm5pTdA9SXF69mpkvVGszqgomvRsYMxKEstlsGNYXZrlhH70fE7HPsOE8a22/x+ZPi8ur/yqUSOuiHeQiFx+xPxEr"
    "/QCEDE8H000hmVX6bx/POh9AUFa2ZD4Rrw6CbEZVhUTvCeuEH5uRk0UH3xMGemiiREk0pD6BtQG8tadnTB3ceOVvj8pkyRwC"
    "cHWhz2tK8v21WfKuI0DfuWbNsPut6uuzm+vrPUPablUHTsxyfHeqCFDPSLJ5+yzj0fWDUxs3TACYiKZ75N9bWrp4QZT4Mieh"
    "RBmHUwEAOlgefI+Yl6tolojIkPxl5PDLkS6Hu1pKfizWPsuG4yo2Q+A7isur1kftyohnLUBTpri8aj0Bd6i1GTYcF5FnulrK"
    "fwyAo6gN09a2cycU9zJ7nlhJk+FrisuqPjMkDG5If5syZWXLZjPha6oixCYmYre2v7H7sajNUfUMnucNS+/V0tLSFzB/UEVe"
    "Z6a8KL75KyVlVTeF1633omub9vY9+wB8l9kYFZshpi/OK1tyZWRBHjGeW7M1NTUxYfM9IppORKxiez3GD4aR6gCRkB0Sb1Ya"
    "XnOrPdbETjbl4nzDBKeRuFVKjZCfbb3OjnRFmUj5xkaINjTw8ge27suKPgggeLM/m/EIn33pmppZ6zZuTIeCYhgPTKlUsDqV"
    "ClRpLRPgEQmBWqo2Ptutbsubk0yAxKMTy1jHTwvxIYxKyUTvhcjwZKvp/qmcFgRoj6h9k4hWqPGeLC2v+v0hyzdZuHBhXnH5"
    "0lXF5dWPkeGPiNiM8UxcrP1q2xuv/hRvy7GXCmD14yp6mIhjoaBJ9xWXV95RvKB6EQach4HiBdWLissr7yCi+wAQMcdU9DBZ"
    "fHxIxMXAktEjvVXEdjBTXEXSbPirJRVL7wyJO+xvRUVFfklF9RphSYHoQgCkqgEIn8TwbNbHggAwb+7b0W5Uf1NVu4nYiEhA"
    "hv+ttGLJtWEfB0iQ+7z0X1sJdhCZmAL5zObnpeXVt8xdWFOS619lZWW8uHzpqoNHgi1h7LDNMhsPiltbWna1jq431EMAREUE"
    "RO8rLV12aWVlpV9RUZE/3v0kkAgfstIhjyC9gRUP9L6may++9CNr7vGfSlyRP1QKnGj5ZFNTSJQqfycKL1Ahj7HI82P/1Xxd"
    "bX3zmsp4I8K44e3vW1788vraz3uEPz8aSHqabxjQuwnQLfVvk3QdAR5/bQP0doeJBzQyMtgowUFfb3iOzZlDgk9GoayeFxKe"
    "8YA9rwCv7QDi+VMTM0xECjpISn8eppiiCrD5Dgy/WFJR9WRxefWWtI1tJ9LNzFwPVbAxMWvt33a07vrLUV5WAcAdHbteCay8"
    "TxUdzMYH4DN7XyDR7cUV1c+VVFQ9VlxRvZVEtzN7XwjPG18VHdbqde3tzTswPCu0AKCIIN6vqu3MHA+TOdAtyt6LJRXVvyip"
    "qNocaMF2InqYiC6KcrpnoPZ3owwuIxOiDiYcoFGNFRao91pbd72gqr9LBANAVVUV3n/MLauqzUnHAHB47963kKV1UG1iNh4R"
    "FYH5TrbZF0sqqp8uqaja3N1PLxDpZiK+MnwExlcb3NbRuuvbb+9fbiMlShEzqyILoFhYnuzu5+0BCp4qLa2ePZbyeEsuawsh"
    "lWeYA2hWgGI15kkxRdtn9vQ/tfO6utnRQNBEy1+fTNrN9fXe8o3bn+ix9rPTfc+3AAxRrShtyXLR9pfXrdzy8rqVTxlrXixg"
    "/lsB/DlxL34wbR+WwuzXtQG8KpWyjvZOBgGqAiYKg3vgrpBQPG+QXB64Kzxn+PR/cERC/79n/wu4+x+AzpaQnLc9CXyzYdA6"
    "PEVWEFLM7Ggt/Q8R/RxA3SCAjSlm4/+a53n1bLwq5vBDrdCnIbqms6X5CxgMQ9NRJaf2XY8j4CtU5W4l6gMAZq/IGO9SY/zV"
    "xniXMntFERH3qsjdCNJX7G9vfmJ0KShst6Ol+ZcIMleK6AYAGvV3Ohvvncb4q9jzKok4ZCnBJrLBuzpad987CvlBVTwi5igb"
    "y7QoGcIIhFJeZ+uuB0WDTzEbH0QeM880zFvmVSy9eMgYcGdn82u93f3vUpWvq2oPCDDszWHjXWGMv8oYf+nAeKo+ZYPgmihX"
    "4ijZqkMrabaP7rZB9gljTJyZYYzJM8avJuZaa7NjftVXpVJhIoK3+u7enw6emBvz40W+wQzf5M2Lx6rzPK7N9KbN8ZTfkkrJ"
    "hgTMxQ+98L8PZe0NBtjlE6HIY8yJe9XFebH64njsytkxfy4TYAiHD2WDr9rC9G8uTzZlXEjcKCqYEyaW/CIg9UCYxPTKa8Lj"
    "T/8ceOaxkHREpszBeFwdpAiQPw1I/SzcYS6vADj0JuD5g3sOT13PbEXFq9NbWlr+rnhB9Y9Z8F4F6gRYAIUh4CAIrxDjsY59"
    "zU9G1Y6VWt6GkuArewF8bG7Fki+x+qstSy1ZqQAoD6T9StzCQtss28f2twxsEDRefG/U7ut7AXy4uGLZcqhcA8VKUZ0XSS/7"
    "AXqJmf+rfd+OrWP0VwAgz8vbmraZq0Jy1mDJ4iVHWlpaRnlgoX6zs+XVr88rW/I8kckXyloiL+5ZzQwprwD48OG9bx0+jE8V"
    "L6j+e6heoyp1CpSTwkNuPAmPdbQ0P3GMe1YAdODAzu7Kysqre/rs9SDUQXUawH0KbYnFskfGUnTnIi4ufGpnd/OayquPBNOu"
    "B1CXtjLtKNu+rEpLT2/RkVzZnCQ4kfKNgCAZWoWpcdv/fe66uvtnil6bFvtuK7pYCQUApT3QG2R0K2WyP1/685ffyF3Dkd/J"
    "JkAgdCYuLAKefQx4dvPgvCgsmqIl5SgxvKoAmdH7WlAUSnzdh0MShJ4WxwBmVgAm2kXtu9FvLEx0X43c5kbY3/LqbgC7J7gC"
    "kIm229my4yUALx1D2UAYfcc17Nv34iEAuYmC9jd2Heu6FOUDHO8rN2CQicbz28e4n2ONpwKg3bt3pwHcHf0mpeRVgGjjxOpP"
    "unwjZEMiYd6RTPYCuC/6jX4jbmvMEyVAOvbA5ZaYI48dr7Q2GfJL90ZheXbQ2GFMKJGO1dfccn0ymWqYTsUEilLP5/ROqSH+"
    "avUU/d9iciFaQ6y+uey/I9sFIqunHH+7qaExxLn+jpswdAhB8ogxONbkMKP0RUcpZwf7N0+HJDk9nvHM1TODYzgwdsFESTAy"
    "OmDVvHma0/etHiUSY7Llr49y/uUcoPfPm6eJmqQmm0Bzu8J+bkmlZJLbNzgCHIa8LCHtTUxKnAjhTUZam4jkmZcPNL8I/HIL"
    "cNmqnGgFdLwBPP5guDwfq1+TkfqIgED8U6WhHD2+NnUy2pUzsF3F5GNu7Wm6bx1OdpNrgwCdTNjZcZUfleBScDhBAlQoAdf3"
    "gXpawTz9hDdFOh5pbUJ34AM/+GqYf3DpSmB/e7h3cG834MdOfHkb7orTD6YWAEBNjVtKODicywRIgGrD7UyNyT79k3VvgPlC"
    "wB5/IgmZjLQ2iWvkEhuIAD/5XpR+y4bZqE8G+QEKJoKVo6CiNwAAjY163G3lJJmxE3Y6ODhMIcYxz27hiA03h/ajk6ADy0lr"
    "P7sLaH4BeHIj8I+fDaU1Y46PsHIpiwunhUaNwmnhdU6KYUMFnlEQPYu5Nb3a0MDHq0xWIZ+YDTEbqM4c3f3DwcHhjFgCo3GV"
    "hJmI9T+RDe4A4cQ8micrrY1GYGOSmg4mXj2ZC1QFwERQbKDGRtGGgQiEybYCJbtfBZtVLQDq7uvry7rp5+BwhhIgoVG0oYGB"
    "xt14c+3jiPmrkMna47NYjCKtDeTsGMMNxY8NN2CohJLd1IWsKQwT0tk3YeRBBQiNx+VFLwCwv23XNgBXjUWQDg4OZ9QSGEBT"
    "E1EjBEJ34KSlC8rF4spgTO5w5g0lw1eeH9ynQ2xInK/vBA4fjFxYTjFvqFrEfYbq1+lfNu7HhgSfoC9Vzv2Dcd5l4XFwODNx"
    "TFLTRMJQMmn1k2s3ID+WQF8mAJF36npEg5LfTbcCl0dC0+s7ge/cARzsOlkGjvHIT+AbgtXXkCm4FKU13WhsdGFEDg7nHQEC"
    "hIYGQsvTM1HgPwfDi5AJLIhOXZaDXJbmIAtUXhzuM7z7pTBrSyzv1G61qZBQRmNCIFfSNx56RhsamBob3YbSDg7n1RIYg/GK"
    "9G8/P4i0XA/RQ/A9A8Wp21dAo93mYnlA83Zg+y9C38FTTX5QCwbB9xiB/UP6xkPPaCJhHPk5OJynEuDblsJ/vOYy+N79MFyK"
    "dBAAyqBTmPgvl0jh1MYVKxQWvvEABMgGn6RvPPyv2lDvUaPbQMbB4bwnwGEk+Imry1AY+x5i/rUILBBYG/kJMgiEM39zmZzP"
    "jISRpmwQ94FM0Iy0/QR9++EnHfk5ODgCHJMEAUA/vf4TAP4CnrkojJe1oT+eyJm9ZCRiMAGeAZiATNAJxrfQl76TvvPo4aH3"
    "6ODg4AhwOAlqKOeFIXOJGN5Kr4HYDwK4Cqpz4JmCM5j8gEzWgvggiJ4G4Sc4Sg/Rv/2sEwCcwcPBwRHgpKVBANA/T+SDMnOQ"
    "zVbiTF085nlAf9ABm2mj7zx6eKDvGxIG17u8aQ4ODpMhQYA0kTCaSJizru8NDawN9d6QnQMdHBycBHj8ZIgGEJoSZzah1NSo"
    "c2x2cHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHA4J/H/ASqHsGm4rMoWAAAAAElFTkSuQmCC"
)

if __name__ == "__main__":
    sys.exit(main())
