"""Memory and scale: what an EMA holds beyond the model, and how update time and memory grow with its size.

**Memory.** Each implementation runs in a fresh process (so that nothing freed by another stays in its
allocator): it builds a model of Linear layers (bias included) in the given dtype, notes its resident memory
(``/proc/self/statm``) and resets the kernel's peak (``/proc/self/clear_refs``), then builds the EMA and
updates it twice. *Held* is the growth of resident memory, *peak* the growth of the peak (``VmHWM``):
construction and updates together, in bytes per parameter of the model. The same EMA on a tiny model
runs first, so that what a process pays once (thread pools, kernels loaded on first use: a few MiB) is
not counted. Resident memory counts what
was written: an allocation never touched (a staging buffer never used) is not counted, and one freed
but kept by the allocator is.

**Scale.** polyak's default update at 1M, 10M, 100M and 1B parameters, float32 and bfloat16 (float32
master), each in a fresh process: the median of a few cold updates, and the bytes held per parameter.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MEMORY_PARAMS = 25_000_000
MEMORY_IMPLS = [
    "polyak-ema",
    "polyak-flat",
    "polyak-split",
    "polyak-bf16",
    "polyak-bf16-sr",
    "polyak-posthoc",
    "polyak-two-emas",
    "ignite-direct",
    "ema-pytorch",
    "swa-averaged",
    "torch-ema",
    "diffusers-ema",
    "timm-ema-v3",
]
SCALES = [1_000_000, 10_000_000, 100_000_000, 1_000_000_000]
_WIDTH = 2048


def model_of(params: int, dtype: torch.dtype) -> nn.Module:
    """Linear layers 2048 wide (and a narrower last one) holding about ``params`` parameters, in ``dtype``
    from the start (no float32 copy first); weights random, cheaply."""
    layers = []
    left = params
    while left > 0:
        rows = max(1, min(_WIDTH, left // (_WIDTH + 1)))
        layers.append(nn.Linear(_WIDTH, rows, device="meta", dtype=dtype))
        left -= rows * (_WIDTH + 1)
    model = nn.Sequential(*layers).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05)
    return model


def _statm_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def _one(impl: str, dtype: torch.dtype, params: int, timed: int) -> dict[str, Any]:
    """In this (fresh) process: the EMA's memory and, with ``timed``, its median cold update time."""
    from benchmarks.impls import IMPLS
    from benchmarks.timing import evictor

    torch.set_num_threads(2)
    entry = IMPLS[impl]
    missing = entry.missing()
    if missing:
        return {"status": "skipped", "reason": f"{', '.join(missing)} not installed"}
    for module in entry.requires:  # imported before the baseline: a library's import is not the EMA
        if module == "timm":
            from benchmarks.timm_ema import load

            load()
        else:
            __import__(module)
    __import__("polyak.posthoc")
    model = model_of(params, dtype)
    n = sum(p.numel() for p in model.parameters())
    if not entry.applies_to(model):
        return {"status": "n/a"}
    evict = evictor() if timed else None
    tiny = model_of(50_000, dtype)  # the process's one-time costs (threads, kernels) first, on a tiny model
    warm = entry.setup(tiny, 1e-3)
    warm()
    warm()
    del warm, tiny
    gc.collect()
    base = _statm_bytes()
    _reset_peak()
    step = entry.setup(model, 1e-3)
    step()
    step()
    gc.collect()
    out: dict[str, Any] = {
        "status": "ok",
        "params": n,
        "held_bytes_per_param": (_statm_bytes() - base) / n,
        "peak_bytes_per_param": (_peak_bytes() - base) / n,
    }
    if evict is not None:
        samples = []
        for _ in range(timed):
            evict()
            t = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t)
        out["median_s"] = statistics.median(samples)
        out["samples"] = timed
    return out


def _run_child(impl: str, dtype: str, params: int, timed: int = 0, timeout: float = 900) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.memory", "--one", impl, dtype, str(params), str(timed)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"status": "error", "reason": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(impls: list[str] | None = None, params: int = MEMORY_PARAMS) -> list[dict[str, Any]]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        for impl in impls or MEMORY_IMPLS:
            print(f"memory: {impl}, {dtype} ...", flush=True)
            rows.append({"impl": impl, "dtype": dtype, **_run_child(impl, dtype, params)})
    return rows


def measure_scaling(scales: list[int] | None = None, samples: int = 5) -> list[dict[str, Any]]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        for params in scales or SCALES:
            print(f"scale: {params:,} parameters, {dtype} ...", flush=True)
            for impl in ("floor", "polyak-ema"):
                rows.append({"impl": impl, "dtype": dtype, "scale": params, **_run_child(impl, dtype, params, samples)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    p.add_argument("--one", nargs=4, metavar=("IMPL", "DTYPE", "PARAMS", "TIMED"), help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, default=MEMORY_PARAMS)
    args = p.parse_args(argv)
    if args.one:
        impl, dtype, params, timed = args.one
        print(json.dumps(_one(impl, getattr(torch, dtype), int(params), int(timed))))
        return 0
    for row in measure_memory(params=args.params):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
