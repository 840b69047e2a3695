"""The matrix-product kernels a batched step could use, at 1-16 rows, on this CPU.

FlowLM's Linears that pocket-tts's --quantize converts (attention and feed-forward of every layer),
at the shapes of a packaged architecture (the released `english` 100M by default), one thread, as
the server's batch thread runs them. Prints milliseconds per step and each kernel's speed-up over
float32 as the server runs it (oneDNN-packed for 2 rows or more, MKL for one).

    python bench/kernels.py                      # ~1 minute on 2 cores
    python bench/kernels.py --config english_2m_2026-10

torchao's int8 is measured too where it is installed (it is not in requirements.txt: it measured
1.03x float32 in the library on this machine, bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pocket_tts_server as srv  # noqa: E402

ROWS = (1, 2, 4, 8, 16)


def layer_shapes(config: str) -> list[tuple[int, int]]:
    """(in, out) of every converted Linear of a packaged architecture, built without weights."""
    import yaml
    from pocket_tts.utils.config import CONFIGS_DIR

    cfg = yaml.safe_load((Path(CONFIGS_DIR) / f"{config}.yaml").read_text())["flow_lm"]
    t = cfg["transformer"]
    d, hidden = t["d_model"], int(t["d_model"] * t["hidden_scale"])
    kv = d // t["num_heads"] * t.get("num_kv_heads", t["num_heads"])
    return [(d, d + 2 * kv), (d, d), (d, hidden), (hidden, d)] * t["num_layers"]


def milliseconds(apply, modules, rows: int, repeats: int = 30) -> float:
    inputs = {m.in_features: torch.randn(rows, 1, m.in_features) for m in modules}
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            started = time.perf_counter()
            for module in modules:
                apply(module, inputs[module.in_features])
            times.append(time.perf_counter() - started)
    return statistics.median(times[3:]) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="english", help="packaged architecture")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    modules = [torch.nn.Linear(i, o, bias=False) for i, o in layer_shapes(args.config)]
    layer = torch.nn.Module()  # pack_linears walks modules
    layer.linears = torch.nn.ModuleList(modules)
    float32 = srv.Linears(srv.pack_linears([layer]), {})
    kernels = {"float32 (as served)": float32, "float32, MKL": lambda m, x: m(x)}
    for engine in ("fbgemm", "x86", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.quantized.engine = engine
                copies = {m: torch.ao.nn.quantized.dynamic.Linear.from_float(with_qconfig(m))
                          for m in modules}  # fmt: skip
            kernels[f"int8 torch.ao {engine}"] = lambda m, x, c=copies, e=engine: run_on(e, c[m], x)
    try:
        import copy

        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        copies = {m: copy.deepcopy(m) for m in modules}
        for c in copies.values():
            quantize_(torch.nn.Sequential(c), Int8DynamicActivationInt8WeightConfig())
        kernels["int8 torchao"] = lambda m, x, c=copies: c[m](x)
    except ImportError:
        print("torchao is not installed: its row is left out")
    print(f"{args.config}: {len(modules)} Linears, one thread, ms per step (speed-up over float32)")
    print("| kernel | " + " | ".join(f"{r} rows" for r in ROWS) + " |")
    print("| --- |" + " --- |" * len(ROWS))
    base = {rows: milliseconds(float32, modules, rows) for rows in ROWS}
    for name, apply in kernels.items():
        cells = []
        for rows in ROWS:
            ms = base[rows] if apply is float32 else milliseconds(apply, modules, rows)
            cells.append(f"{ms:.1f} ({base[rows] / ms:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def with_qconfig(module):
    module.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    return module


def run_on(engine: str, module, x):
    torch.backends.quantized.engine = engine
    return module(x)


if __name__ == "__main__":
    main()
