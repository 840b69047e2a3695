"""Side-by-side benchmark: pocket_tts_server.py against the pocket-tts library and its own server.

Everything runs on the real pocket-tts code: the released `english` architecture (100M) with random
weights and EOS off, so every run generates exactly the same lengths. Numbers are measured in one
run on one machine and printed as ratios; absolute timings are noisy, ratios much less so.

    python bench/bench.py                       # ~6 minutes on 2 cores
    python bench/bench.py --config english_2m_2026-10 --quick
    python bench/bench.py --only concurrency    # the batching table alone
    python bench/bench.py --only agents         # voice agents: WebSocket against HTTP
    python bench/bench.py --only concurrency --device cuda --clients 1,8,32,64,128

It prints a Markdown table (the README's "Performance" section is one such run).
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pocket_tts_server as srv  # noqa: E402
from tools.offline_model import build_tokenizer, saved_weight_config, tone, write_audio  # noqa: E402

FORMATS = list(srv.FORMATS)
TEXT = (
    "The quick brown fox jumps over the lazy dog. This is a test of the speech server, "
    "with numbers one two three!"
)
LONG_TEXT = "This sentence is spoken many times over, and nobody is listening. " * 30
rows: list[tuple[str, str, str]] = []


def row(metric: str, value: str, target: str = ""):
    rows.append((metric, value, target))
    print(f"  {metric}: {value} {target}", flush=True)


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, health: str, env=None) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            requests.get(f"http://127.0.0.1:{port}{health}", timeout=1)
            return proc
        except requests.RequestException:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:3]} did not start")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(config: Path, ref: Path, cache: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "pocket_tts_server.py",
        "--model_path",
        str(config),
        "--default_voice",
        str(ref),
        "--port",
        str(port),
        "--cache_dir",
        str(cache),
        "--log_level",
        "warning",
        *extra,
    ]
    return start(cmd, port, "/health"), f"http://127.0.0.1:{port}"


# -- measurements ---------------------------------------------------------------------------------


def speech(url: str, text: str, fmt: str, stream: bool, voice: str | None = None):
    """(seconds to first byte, seconds in all, body) of one request."""
    body = {"input": text, "response_format": fmt, "stream": stream}
    if voice:
        body["voice"] = voice
    t0 = time.perf_counter()
    with requests.post(f"{url}/v1/audio/speech", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        chunks = r.iter_content(chunk_size=None)
        first = next(chunks)
        t_first = time.perf_counter() - t0
        data = first + b"".join(chunks)
    return t_first, time.perf_counter() - t0, data


def first_byte_then_hang_up(url: str, text: str, fmt: str) -> float:
    t0 = time.perf_counter()
    with requests.post(
        f"{url}/v1/audio/speech",
        stream=True,
        timeout=600,
        json={"input": text, "response_format": fmt, "stream": True},
    ) as r:
        next(r.iter_content(chunk_size=None))
        return time.perf_counter() - t0


def library_run(model, state, text: str) -> tuple[float, float, float]:
    """(first chunk s, total s, audio s) of pocket-tts's generate_audio_stream."""
    t0 = time.perf_counter()
    first, samples = None, 0
    for chunk in model.generate_audio_stream(state, text):
        first = first if first is not None else time.perf_counter() - t0
        samples += chunk.shape[-1]
    return first, time.perf_counter() - t0, samples / model.sample_rate


def fixed_weight_config(tmp: Path, name: str) -> Path:
    """A random-weight config whose weights are saved once, so every process loads the same ones
    (the latent cache is keyed by the weights: a restart must find its entries again)."""
    return saved_weight_config(tmp, build_tokenizer(tmp / "tokenizer.json"), name)


def median(values):
    return statistics.median(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="english", help="packaged architecture to use")
    parser.add_argument("--quick", action="store_true", help="one repetition instead of three")
    parser.add_argument(
        "--only", choices=["concurrency", "wyoming", "agents"], help="run one section only"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--clients", default="1,2,4,8,16,32", help="concurrency levels")
    parser.add_argument("--realtime_margin", type=float, default=1.1,
                        help="the server's admission margin (0: throughput first)")  # fmt: skip
    parser.add_argument("--precisions", default="auto,float32",
                        help="--precision of each concurrency table")  # fmt: skip
    args = parser.parse_args()
    reps = 1 if args.quick else 3

    import torch
    from pocket_tts import TTSModel

    tmp = Path(tempfile.mkdtemp(prefix="pocket-tts-bench-"))
    config = fixed_weight_config(tmp, args.config)
    ref = write_audio(tmp / "ref.wav", tone(180, 6.5))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, config {args.config} (random weights, EOS off)",
        flush=True,
    )

    # -- the library, called directly: the reference for everything else
    model = TTSModel.load_model(config=str(config)).to(args.device)
    state = model.get_state_for_audio_prompt(
        torch.from_numpy(srv.decode_reference(ref.read_bytes(), 24000))[None]
    )
    library_run(model, state, "Warm up.")
    if args.only == "concurrency":
        for precision in args.precisions.split(","):
            concurrency(args, config, ref, tmp / "cache", model, state, reps, precision)
    if args.only == "wyoming":
        wyoming_first_audio(config, ref, tmp / "cache", reps)
    if args.only == "agents":
        for clients in (1, 4, 8):
            agents_first_audio(config, ref, tmp / "cache", clients)
    if args.only:
        print_table()
        return
    lib = [library_run(model, state, TEXT) for _ in range(reps)]
    lib_first = median([r[0] for r in lib])
    lib_total = median([r[1] for r in lib])
    audio_s = lib[0][2]
    row(
        "library: real-time factor",
        f"{audio_s / lib_total:.2f}x ({audio_s:.1f} s audio in {lib_total:.2f} s)",
    )
    row("library: first chunk", f"{lib_first * 1000:.0f} ms")

    # -- encoding cost: every format's encoder on the same audio, against the generation time
    audio = np.concatenate([c.numpy() for c in model.generate_audio_stream(state, TEXT)])
    for fmt in FORMATS:
        t0 = time.process_time()
        enc = srv.AudioEncoder(srv.FORMATS[fmt], 24000, streaming=True)
        for i in range(0, audio.size, 1920):
            enc.encode(audio[i : i + 1920])
        enc.finish()
        row(
            f"encoding CPU, {fmt}",
            f"{100 * (time.process_time() - t0) / lib_total:.2f} % of generation",
            "(target <= 3 %)",
        )

    # -- quantization, in the library
    quantized = TTSModel.load_model(config=str(config), quantize=True)
    q_state = quantized.get_state_for_audio_prompt(
        torch.from_numpy(srv.decode_reference(ref.read_bytes(), 24000))[None]
    )
    library_run(quantized, q_state, "Warm up.")
    q_total = median([library_run(quantized, q_state, TEXT)[1] for _ in range(reps)])
    row("--quantize speed-up (library)", f"{lib_total / q_total:.2f}x")
    del quantized, q_state

    # -- our server: throughput and first byte per format
    cache = tmp / "cache"
    proc, url = start_server(config, ref, cache)
    for fmt in FORMATS:
        speech(url, "Warm up.", fmt, True)
    for fmt in FORMATS:  # library and server alternate, so drifts in machine speed cancel out
        lib_runs, totals, firsts = [], [], []
        for _ in range(reps):
            lib_runs.append(library_run(model, state, TEXT))
            totals.append(speech(url, TEXT, fmt, False)[1])
            firsts.append(speech(url, TEXT, fmt, True)[0])
        fmt_lib_total = median([r[1] for r in lib_runs])
        fmt_lib_first = median([r[0] for r in lib_runs])
        row(
            f"server/library throughput, {fmt}",
            f"{fmt_lib_total / median(totals):.3f}",
            "(target >= 0.97)",
        )
        row(
            f"first byte - library first chunk, {fmt}",
            f"{(median(firsts) - fmt_lib_first) * 1000:+.0f} ms",
            "(target <= 20 ms)" if fmt in ("wav", "pcm") else "(target <= 60 ms)",
        )

    # -- voice latents: first use, cache hit, after a restart
    voice = write_audio(tmp / "voice.wav", tone(210, 6.5))
    first_use = speech(url, "Hi.", "pcm", False, str(voice))[1]
    hit = speech(url, "Hi.", "pcm", False, str(voice))[1]
    # -- cancellation: a client abandons a long stream; how soon is the next one served?
    idle_first = median([speech(url, "Hello there.", "pcm", True)[0] for _ in range(reps)])
    first_byte_then_hang_up(url, LONG_TEXT, "pcm")
    after_abandon = first_byte_then_hang_up(url, "Hello there.", "pcm")
    row(
        "next request's first byte after an abandoned stream",
        f"{after_abandon * 1000:.0f} ms (idle: {idle_first * 1000:.0f} ms)",
        "(target < 300 ms)",
    )
    proc.terminate()
    proc.wait()
    proc, url = start_server(config, ref, cache)
    after_restart = speech(url, "Hi.", "pcm", False, str(voice))[1]
    row(
        "voice latents: first use / cache hit / after restart",
        f"{first_use:.2f} s / {hit:.2f} s / {after_restart:.2f} s (request time, 'Hi.')",
    )

    proc.terminate()
    proc.wait()
    for precision in args.precisions.split(","):
        concurrency(args, config, ref, cache, model, state, reps, precision)

    # -- pocket-tts's own server on the same config: POST /tts (streams a WAV)
    port = free_port()
    theirs = start(
        [
            "pocket-tts",
            "serve",
            "--config",
            str(config),
            "--default-voice",
            str(ref),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        port,
        "/health",
    )
    tts_url = f"http://127.0.0.1:{port}/tts"
    requests.post(tts_url, data={"text": "Warm up."}, timeout=600).raise_for_status()
    firsts, totals = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        with requests.post(tts_url, data={"text": TEXT}, stream=True, timeout=600) as r:
            chunks = r.iter_content(chunk_size=None)
            next(chunks)
            firsts.append(time.perf_counter() - t0)
            b"".join(chunks)
            totals.append(time.perf_counter() - t0)
    theirs.terminate()
    row(
        "pocket-tts serve: first byte / throughput vs library",
        f"{median(firsts) * 1000:.0f} ms / {lib_total / median(totals):.3f}",
    )

    print_table()


def print_table():
    print("\n| measurement | result | target |\n| --- | --- | --- |")
    for metric, value, target in rows:
        print(f"| {metric} | {value} | {target.strip('()')} |")


def wyoming_first_audio(config: Path, ref: Path, cache: Path, reps: int):
    """First audio over Wyoming (whole text, and text streamed in pieces) next to HTTP's."""
    import asyncio

    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

    port = free_port()
    proc, url = start_server(config, ref, cache, "--wyoming_port", str(port))

    async def first_audio(events) -> float:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            t0 = time.perf_counter()
            for event in events:
                await client.write_event(event.event())
            while (await client.read_event()).type != "audio-chunk":
                pass
            first = time.perf_counter() - t0
            while (await client.read_event()).type not in ("audio-stop", "synthesize-stopped"):
                pass
            return first

    pieces = [SynthesizeChunk(text=TEXT[i : i + 7]) for i in range(0, len(TEXT), 7)]
    speech(url, "Warm up.", "pcm", True)
    http = median([speech(url, TEXT, "pcm", True)[0] for _ in range(reps)])
    plain = median([asyncio.run(first_audio([Synthesize(text=TEXT)])) for _ in range(reps)])
    streamed = median([asyncio.run(first_audio([SynthesizeStart(), *pieces, SynthesizeStop()]))
                       for _ in range(reps)])  # fmt: skip
    row("first audio: HTTP pcm stream", f"{http * 1000:.0f} ms")
    row("first audio: Wyoming synthesize", f"{plain * 1000:.0f} ms")
    row("first audio: Wyoming streamed text (7-character pieces)", f"{streamed * 1000:.0f} ms")
    proc.terminate()
    proc.wait()


AGENT_REPLY = (
    "Sure, I can help with that. The store opens at nine in the morning. "
    "It closes at six, except on Sundays."
)
WORD_SECONDS = 0.03  # an LLM writing ~33 words a second


class Playback:
    """A listener's clock: audio plays from its first arrival; a chunk arriving after the audio
    before it has finished playing is a stall (the listener hears a gap)."""

    def __init__(self, rate: int):
        self.rate, self.start, self.played, self.stalled = rate, None, 0.0, 0.0

    def arrived(self, nbytes: int):
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        due = self.start + self.stalled + self.played
        self.stalled += max(0.0, now - due)
        self.played += nbytes / 2 / self.rate


def agents_first_audio(config: Path, ref: Path, cache: Path, clients: int):
    """Voice agents streaming an LLM's reply word by word: over the Gradium WebSocket, against
    HTTP requests sent one sentence at a time as each ends (as an OpenAI-TTS agent does). For
    each: first word -> first audio, and the gaps a listener hears after that."""
    import asyncio
    import base64
    import json

    from websockets.asyncio.client import connect

    port = free_port()
    proc, url = start_server(config, ref, cache, "--ws_port", str(port))
    words = AGENT_REPLY.split()
    ends = [i for i, w in enumerate(words) if w.endswith(".")]  # a sentence's last word

    async def ws_agent() -> tuple[float, float]:
        async with connect(f"ws://127.0.0.1:{port}/api/speech/tts") as ws:
            await ws.send(json.dumps({"type": "setup", "voice_id": "ref", "output_format": "pcm"}))
            await ws.recv()  # ready
            started, playback = time.perf_counter(), Playback(48000)

            async def writer():
                for word in words:
                    await ws.send(json.dumps({"type": "text", "text": word + " "}))
                    await asyncio.sleep(WORD_SECONDS)
                await ws.send(json.dumps({"type": "end_of_stream"}))

            task = asyncio.create_task(writer())
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "audio":
                    playback.arrived(len(base64.b64decode(message["audio"])))
            await task
            return playback.start - started, playback.stalled

    def http_agent(out: list):
        ended: queue.Queue = queue.Queue()
        started, playback = time.perf_counter(), Playback(24000)

        def llm():
            sentence = []
            for i, word in enumerate(words):
                sentence.append(word)
                if i in ends:
                    ended.put(" ".join(sentence))
                    sentence = []
                time.sleep(WORD_SECONDS)

        threading.Thread(target=llm, daemon=True).start()
        for _ in ends:  # each sentence as it ends, once the one before has been received
            body = {"input": ended.get(), "response_format": "pcm", "stream": True}
            with requests.post(f"{url}/v1/audio/speech", json=body, stream=True, timeout=600) as r:
                for chunk in r.iter_content(chunk_size=None):
                    playback.arrived(len(chunk))
        out.append((playback.start - started, playback.stalled))

    async def ws_all():
        return await asyncio.gather(*(ws_agent() for _ in range(clients)))

    speech(url, "Warm up.", "pcm", True)
    asyncio.run(ws_all())  # warm up the WebSocket path too
    ws_runs = asyncio.run(ws_all())
    http_runs: list = []
    threads = [threading.Thread(target=http_agent, args=(http_runs,)) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    said = ends[0] * WORD_SECONDS  # when the first sentence's last word was sent
    for name, runs in (("WebSocket (Gradium)", ws_runs), ("HTTP per sentence", http_runs)):
        first, stalls = median([r[0] for r in runs]), median([r[1] for r in runs])
        row(f"agents x{clients}, {name}: first word / first sentence's end -> first audio; "
            "gaps heard", f"{first * 1000:.0f} ms / {(first - said) * 1000:.0f} ms; "
            f"{stalls * 1000:.0f} ms")  # fmt: skip
    proc.terminate()
    proc.wait()


def concurrency(args, config: Path, ref: Path, cache: Path, model, state, reps: int,
                precision: str = "auto"):  # fmt: skip
    """Streaming clients at once: aggregate and slowest real-time factor, first bytes, memory.

    Each level is compared with the library's float32 single stream measured just before it, as
    this machine's speed drifts over minutes.
    """
    proc, url = start_server(config, ref, cache, "--device", args.device, "--max_queue", "256",
                             "--queue_timeout", "600", "--precision", precision,
                             "--realtime_margin", str(args.realtime_margin))  # fmt: skip
    speech(url, "Warm up.", "pcm", True)
    health = requests.get(f"{url}/health", timeout=10).json()
    row(f"--precision {precision}", f"{health['precision']}: {health['precision_reason']}")
    row("admission", f"--realtime_margin {args.realtime_margin} ({args.device})")

    def run(clients: int):
        results: list[tuple[float, float, float]] = []  # (first byte s, wall s, audio s)

        def client():
            first, total, data = speech(url, TEXT, "pcm", True)
            results.append((first, total, len(data) / 2 / 24000))

        def sample_steps():  # the server's own step time while the level runs
            while any(t.is_alive() for t in threads):
                health = requests.get(f"{url}/health", timeout=10).json()
                if health.get("step_ms"):
                    steps.append((health["batch_size"], health["step_ms"],
                                  health["realtime_headroom"], health.get("capacity")))  # fmt: skip
                time.sleep(0.25)

        steps: list[tuple] = []  # (batch size, step ms, headroom, capacity)
        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        sampler = threading.Thread(target=sample_steps)
        sampler.start()
        [t.join() for t in threads]
        wall = time.perf_counter() - t0  # before the sampler's last sleep
        sampler.join()
        return results, wall, steps

    targets = {1: ">= 1.8", 4: ">= 4", 8: ">= 4.5"} if args.device == "cpu" else {64: ">= 50"}
    targets = targets if precision == "auto" else {}
    levels = []  # (clients, aggregate / library, slowest admitted, p50, p95, steps, capacity)
    for clients in map(int, args.clients.split(",")):
        lib = [library_run(model, state, TEXT) for _ in range(reps)]
        lib_rtf = lib[0][2] / median([r[1] for r in lib])
        results, wall, steps = run(clients)
        aggregate = sum(r[2] for r in results) / wall
        # A stream's own pace, from its first byte (time queued is not playing time).
        slowest = min(r[2] / (r[1] - r[0]) for r in results)
        firsts = sorted(r[0] for r in results)
        p50, p95 = firsts[len(firsts) // 2], firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))]
        capacity = max((s[3] for s in steps), default=None)
        levels.append((clients, aggregate, aggregate / lib_rtf, lib_rtf, slowest, p50, p95,
                       steps, capacity))  # fmt: skip
    best = max(level[2] for level in levels)
    one_client_first = levels[0][5]
    for clients, aggregate, ratio, lib_rtf, slowest, p50, p95, steps, capacity in levels:
        row(f"{clients} clients: aggregate real-time factor",
            f"{aggregate:.2f}x = {ratio:.2f} x library's one stream ({lib_rtf:.2f}x), "
            f"{ratio / best:.2f} x the best level",
            f"(target {targets[clients]} x library)" if clients in targets else "")  # fmt: skip
        row(f"{clients} clients: slowest admitted stream's own real-time factor",
            f"{slowest:.2f}x" + (f" (capacity {capacity})" if capacity else ""),
            "(target >= 1.0)")  # fmt: skip
        row(f"{clients} clients: first byte p50 / p95",
            f"{p50 * 1000:.0f} / {p95 * 1000:.0f} ms ({p50 / one_client_first:.1f} x one client)",
            "(target p50 <= 2 x one client)" if clients == 4 else "")  # fmt: skip
        if steps:  # at the largest batch seen: its median step, and a frame's share of it
            batch = max(size for size, *_ in steps)
            step, headroom = (median([s[i] for s in steps if s[0] == batch]) for i in (1, 2))
            row(f"{clients} clients: server step at its largest batch",
                f"{step:.1f} ms at {batch} streams ({headroom:.1f}x real time each)")  # fmt: skip
    health = requests.get(f"{url}/health", timeout=10).json()
    row("batch step at the end", f"{health.get('step_ms')} ms, max_batch {health['max_batch']}")
    row("server peak RSS", f"{peak_rss_mb(proc.pid):.0f} MB")
    proc.terminate()
    proc.wait()


if __name__ == "__main__":
    main()
