"""Adaptive, interleaved timing of zero-argument callables: warm-up, then rounds until a budget is spent.

The callables of one shape are timed in *rounds*: each round takes one sample of every callable, in a
shuffled order. On a machine shared with other work, a burst of load then hits every row alike instead
of whichever row happened to be running, and the medians stay comparable.

**Cold and warm.** An EMA update runs after an optimizer step, which has just streamed the gradients, the
optimizer state and the weights through the caches: the update finds little of its own data there. With
``evict``, each sample is taken twice: once *cold*, one call right after ``evict()`` has written a buffer
larger than the last-level cache, and once *warm*, right after. Cold is the honest figure; warm shows what
a loop that repeats the update back to back (most benchmarks) would report.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Timing:
    """Seconds per call, over ``samples`` samples of ``loops`` back-to-back calls each."""

    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    mean_s: float
    samples: int
    loops: int
    warmup_calls: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _summary(samples: list[float], loops: int, warmup_calls: int) -> Timing:
    if len(samples) >= 2:
        q = statistics.quantiles(samples, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = samples[0]
    return Timing(
        median_s=statistics.median(samples),
        p25_s=p25,
        p75_s=p75,
        min_s=min(samples),
        mean_s=statistics.fmean(samples),
        samples=len(samples),
        loops=loops,
        warmup_calls=warmup_calls,
    )


def measure_interleaved(
    steps: dict[str, Callable[[], object]],
    *,
    budget_s: float = 2.0,
    warmup_s: float = 0.2,
    min_warmup_calls: int = 3,
    min_samples: int = 7,
    max_samples: int = 5000,
    min_sample_s: float = 5e-5,
    seed: int = 0,
    evict: Callable[[], object] | None = None,
) -> tuple[dict[str, Timing], dict[str, BaseException], dict[str, Timing]]:
    """Time every callable of ``steps`` with :func:`time.perf_counter`; returns (timings, errors) by key.

    Warm-up, for each callable: at least ``min_warmup_calls`` calls and ``warmup_s`` seconds. It also sets
    ``loops``, the number of back-to-back calls in one sample, so that a sample lasts at least
    ``min_sample_s`` (fast calls are not drowned by the timer's own cost). Keep it small: a repeated call
    finds its data in cache, so batching a call of a few hundred µs on a cache-sized shape would time it
    warm while slower rows, not batched, run cold. Then rounds of one sample per
    callable, in a shuffled order, until ``budget_s * len(steps)`` seconds have passed and there are at
    least ``min_samples`` rounds, or ``max_samples`` rounds. The garbage collector is off while timing, as
    in :mod:`timeit`. A callable that raises is dropped and its exception returned.

    Returns (warm timings, errors, cold timings): cold ones (one call after ``evict()``, per round) only
    with ``evict``; the cold call is taken first in each round, the warm sample right after it.
    """
    errors: dict[str, BaseException] = {}
    loops: dict[str, int] = {}
    warmup_calls: dict[str, int] = {}
    samples: dict[str, list[float]] = {}
    cold: dict[str, list[float]] = {}
    rng = random.Random(seed)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for key, fn in steps.items():
            try:
                calls = 0
                t0 = time.perf_counter()
                while calls < min_warmup_calls or time.perf_counter() - t0 < warmup_s:
                    fn()
                    calls += 1
            except Exception as e:
                errors[key] = e
                continue
            per_call = (time.perf_counter() - t0) / calls
            loops[key] = max(1, math.ceil(min_sample_s / max(per_call, 1e-9)))
            warmup_calls[key] = calls
            samples[key] = []
            cold[key] = []

        order = list(samples)
        total_budget = budget_s * len(order)
        start = time.perf_counter()
        for _ in range(max_samples):
            if not order:
                break
            rng.shuffle(order)
            for key in list(order):
                fn, n = steps[key], loops[key]
                try:
                    if evict is not None:
                        evict()
                        t = time.perf_counter()
                        fn()
                        cold[key].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    for _ in range(n):
                        fn()
                    samples[key].append((time.perf_counter() - t) / n)
                except Exception as e:
                    errors[key] = e
                    order.remove(key)
            if min((len(samples[k]) for k in order), default=0) >= min_samples and (
                time.perf_counter() - start >= total_budget
            ):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    timings = {k: _summary(s, loops[k], warmup_calls[k]) for k, s in samples.items() if s and k not in errors}
    colds = {k: _summary(s, 1, warmup_calls[k]) for k, s in cold.items() if s and k not in errors}
    return timings, errors, colds


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 32 MiB where it reports none."""
    from pathlib import Path

    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text(encoding="ascii").strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 << 20)


def evictor() -> Callable[[], object]:
    """Writes a buffer of 4x the last-level cache (at least 128 MiB): what a training step leaves behind."""
    import torch

    buffer = torch.empty(max(4 * last_level_cache_bytes(), 128 << 20), dtype=torch.uint8)
    state = {"value": 0}

    def evict() -> None:
        state["value"] ^= 1
        buffer.fill_(state["value"])

    return evict
