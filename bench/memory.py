"""Memory under repeated bursts: does the server's RSS plateau?

Starts the server (real pocket-tts code, random weights, EOS off) in its own process and sends
`--bursts` bursts of `--clients` concurrent maximum-length streaming requests, each cut by
`--request_timeout`, printing the server's resident memory after each burst and the growth of
each burst over the one before. Loopback only, bounded in count and time.

    python bench/memory.py                               # 100M model, 5 bursts of 50 clients
    python bench/memory.py --config english_2m_2026-10   # a quick look
    python bench/memory.py --bursts 2 --clients 8 --precision float32   # against the default
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench import fixed_weight_config, peak_rss_mb, start_server, tone, write_audio  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def burst(url: str, clients: int, text: str) -> dict[int, int]:
    """`clients` streaming requests at once; how many got each status."""
    codes: list[int] = []

    def client():
        body = {"input": text, "response_format": "mp3", "stream": True}
        with requests.post(f"{url}/v1/audio/speech", json=body, stream=True, timeout=300) as r:
            for _ in r.iter_content(chunk_size=None):
                pass
            codes.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {code: codes.count(code) for code in sorted(set(codes))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="english", help="packaged architecture to use")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--request_timeout", type=float, default=5.0)
    parser.add_argument("--precision", default="auto", help="the server's --precision")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pocket-tts-memory-"))
    config = fixed_weight_config(tmp, args.config)
    ref = write_audio(tmp / "ref.wav", tone(180, 6.5))
    proc, url = start_server(config, ref, tmp / "cache",
                             "--request_timeout", str(args.request_timeout),
                             "--precision", args.precision)  # fmt: skip
    text = ("The quick brown fox jumps over the lazy dog, again and again. " * 80)[:4096]
    try:
        before = rss_mb(proc.pid)
        print(f"config {args.config}, --precision {args.precision}; after start-up: "
              f"{before:.0f} MB (peak {peak_rss_mb(proc.pid):.0f} MB)", flush=True)  # fmt: skip
        print("| burst | statuses | seconds | RSS MB | growth |\n| --- | --- | --- | --- | --- |")
        for index in range(1, args.bursts + 1):
            t0 = time.monotonic()
            statuses = burst(url, args.clients, text)
            time.sleep(1.0)  # let the last streams leave
            now = rss_mb(proc.pid)
            print(f"| {index} | {statuses} | {time.monotonic() - t0:.1f} | {now:.0f} | "
                  f"{100 * (now - before) / before:+.1f} % |", flush=True)  # fmt: skip
            before = now
        print(f"peak RSS: {peak_rss_mb(proc.pid):.0f} MB")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
