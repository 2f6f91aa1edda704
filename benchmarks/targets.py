"""The issue's performance targets, checked against a run's results; the Targets section of BENCHMARKS.md.

Each :class:`Target` names a row (shape, implementation) and a limit: a ratio of its median to the float32
floor's median on the same shape, or a median time per update. :func:`evaluate` gives each target its
measured values and a verdict, and for a target missed a line on by how much, why, and what would close it,
made from the numbers of the same run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.impls import FLOOR, FLOOR_NATIVE, PART_TO_BF16, PART_TO_F32, POLYAK, POLYAK_BF16, POLYAK_FLAT

Results = dict[tuple[str, str], dict[str, Any]]  # (shape, impl) -> the row, timed rows only


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:,.2f} ms"


@dataclass(frozen=True)
class Target:
    key: str
    text: str  # as the issue words it
    shape: str
    impl: str
    limit: float
    absolute: bool = False  # limit in seconds per update, else a ratio to the float32 floor
    explain: Callable[[Results, dict[str, dict[str, Any]]], str] | None = None  # why, and what would close it
    warm: bool = False  # judged on the warm timings (a tiny model's per-call cost), else on the cold headline
    relative_to: str = FLOOR  # the row a ratio is taken to

    def measured(self, results: Results) -> tuple[float, float] | None:
        """(median value, min value): a ratio to the floor, or seconds; None if a row is missing."""
        key = "warm" if self.warm else "timing"
        row = results.get((self.shape, self.impl))
        if row is None or key not in row:
            return None
        t = row[key]
        if self.absolute:
            return t["median_s"], t["min_s"]
        base = results.get((self.shape, self.relative_to))
        if base is None:
            return None
        return t["median_s"] / base[key]["median_s"], t["min_s"] / base[key]["min_s"]


def _why_many_small_default(results: Results, shapes: dict[str, dict[str, Any]]) -> str:
    t = results[("many-small", POLYAK)]["timing"]["median_s"]
    floor = results[("many-small", FLOOR)]["timing"]["median_s"]
    n = shapes["many-small"]["tensors"]
    flat = results.get(("many-small", POLYAK_FLAT))
    line = (
        f"Why: the {n} online tensors are separate allocations; the default mode gathers them with one "
        "`torch.cat` into a chunk of scratch and lerps the EMA's flat buffer from it: the floor's traffic plus "
        f"a copy, and a per-tensor cost inside `cat` ({(t - floor) / n * 1e6:.2f} µs over the floor per tensor "
        "here). What would close it: `flat=True`, which makes the online tensors one buffer and the update one "
        "`lerp_`"
    )
    if flat is not None:
        line += f" ({flat['timing']['median_s'] / floor:.2f}x the floor in this run)"
    return line + "; or a fused multi-tensor lerp kernel for CPU in torch."


def _why_many_small_flat(results: Results, shapes: dict[str, dict[str, Any]]) -> str:
    t = results[("many-small", POLYAK_FLAT)]["timing"]["median_s"]
    floor = results[("many-small", FLOOR)]["timing"]["median_s"]
    n = shapes["many-small"]["tensors"]
    return (
        f"Why: the lerp itself is the floor's single kernel, so the {_us(t - floor)} beyond it is the Python "
        f"of `update()` around it; anything there that visits each of the {n} tensors (such as checking "
        "that none was re-allocated) costs about as much as the whole lerp. What would close it: keeping "
        "`update()` free of per-tensor work in flat mode."
    )


def _ratio(row: dict[str, Any], floor: float) -> str:
    return f"{row['timing']['median_s'] / floor:.2f}x the floor"


def _why_transformer(results: Results, shapes: dict[str, dict[str, Any]]) -> str:
    t = results[("transformer", POLYAK)]["timing"]["median_s"]
    floor = results[("transformer", FLOOR)]["timing"]["median_s"]
    n = shapes["transformer"]["tensors"]
    line = (
        f"Why: one `_foreach_lerp_` over {n} tensors is {n} `lerp_` kernels on CPU: the floor's memory "
        f"traffic, but {n} parallel regions, each started, split between the threads and waited for, "
        f"instead of one: {_us(t - floor)} over the floor here, {(t - floor) / n * 1e6:.0f} µs per tensor. "
        "ema-pytorch and `AveragedModel` issue the same `_foreach_lerp_` and pay the same. What would close "
        "it: `flat=True`, one kernel"
    )
    flat = results.get(("transformer", POLYAK_FLAT))
    if flat is not None:
        line += f" ({_ratio(flat, floor)} in this run)"
    return line + "; a fused multi-tensor lerp for CPU in torch."


def _why_bf16(results: Results, shapes: dict[str, dict[str, Any]]) -> str:
    shape = "transformer-bf16"
    floor = results[(shape, FLOOR)]["timing"]["median_s"]
    t = results[(shape, POLYAK)]["timing"]["median_s"]
    line = (
        "Why: with a float32 master an update makes three passes over each chunk of 1M elements: the bf16 "
        "online values are converted into float32 scratch, the master is lerped with it (the floor's work), "
        "and the master is converted back into the bf16 EMA model; the chunk stays in cache between the passes"
    )
    to_f32, to_bf16 = results.get((shape, PART_TO_F32)), results.get((shape, PART_TO_BF16))
    if to_f32 is not None and to_bf16 is not None:
        a, b = to_f32["timing"]["median_s"], to_bf16["timing"]["median_s"]
        line += (
            f". Timed alone in this run: bf16 -> float32 {_us(a)} ({_ratio(to_f32, floor)}), float32 -> bf16 "
            f"{_us(b)} ({_ratio(to_bf16, floor)}); with the floor that is {(a + b + floor) / floor:.2f}x, "
            f"against {t / floor:.2f}x measured"
        )
    line += (
        ". Eager torch cannot fuse them on CPU (a mixed-dtype `master.add_(bf16, alpha=m)` is far slower than "
        "the conversion it would save). What would close it: one fused kernel that reads the bf16 online "
        "values and the master and writes the master and the bf16 EMA: 12 bytes per element, the floor's "
        "traffic. polyak has it as an option: `EMA(model, flat=True, compile=True)` runs the update as one "
        "`torch.compile`d kernel"
    )
    fused = results.get((shape, "polyak-flat-compile"))
    if fused is not None:
        line += f" ({_ratio(fused, floor)} in this run)"
    line += "; it is not the default because it needs a compiler and the first update pays seconds of compilation"
    bf16 = results.get((shape, POLYAK_BF16))
    if bf16 is not None:
        line += f"; or giving up the master with `dtype=torch.bfloat16` ({_ratio(bf16, floor)}"
        native = results.get((shape, FLOOR_NATIVE))
        if native is not None:
            line += f", {bf16['timing']['median_s'] / native['timing']['median_s']:.2f}x the bf16 floor"
        line += ")"
    return line + "."


def _why_linear(results: Results, shapes: dict[str, dict[str, Any]]) -> str:
    floor = results[("linear", FLOOR)]["timing"]["median_s"]
    return (
        f"Why: the floor (one `lerp_` call) takes {_us(floor)}; the rest is the Python of `update()`: the "
        "schedule call and range check, switching grad mode off and on, the loop over groups and the "
        "two-tensor `_foreach_lerp_`. What would close it: fewer Python steps per update (see the observations)."
    )


TARGETS = [
    Target(
        "many-small-default",
        "2000 x 1024: default mode <= 12x the floor (cold)",
        "many-small",
        POLYAK,
        12.0,
        explain=_why_many_small_default,
    ),
    Target(
        "many-small-flat",
        "2000 x 1024: flat mode <= 1.5x the floor (cold)",
        "many-small",
        POLYAK_FLAT,
        1.5,
        explain=_why_many_small_flat,
    ),
    Target(
        "transformer-fp32",
        "transformer, float32 (default mode): <= 1.1x the floor (cold)",
        "transformer",
        POLYAK,
        1.1,
        explain=_why_transformer,
    ),
    Target(
        "many-small-default-cold",
        "2000 x 1024: default mode <= 3x the floor (cold)",
        "many-small",
        POLYAK,
        3.0,
        explain=_why_many_small_default,
    ),
    Target(
        "transformer-bf16-master",
        "transformer, bf16 with float32 master (default mode): <= 2.2x the float32 floor (cold)",
        "transformer-bf16",
        POLYAK,
        2.2,
        explain=_why_bf16,
    ),
    Target(
        "posthoc-two-profiles",
        "PostHocEMA, 2 profiles, bf16 transformer: <= the time of two separate EMAs",
        "transformer-bf16",
        "polyak-posthoc",
        1.0,
        relative_to="polyak-two-emas",
    ),
    Target(
        "linear",
        "nn.Linear(2, 1) (default mode): <= 5 µs per update (warm: a tiny model's cost is per call)",
        "linear",
        POLYAK,
        5e-6,
        absolute=True,
        explain=_why_linear,
        warm=True,
    ),
]


def _fmt(value: float, absolute: bool) -> str:
    return _us(value) if absolute else f"{value:.2f}x"


def evaluate(results: list[dict[str, Any]], shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per target: the measured median and min values, pass/miss, and for a miss the why."""
    timed: Results = {(r["shape"], r["impl"]): r for r in results if r["status"] == "ok"}
    by_shape = {s["key"]: s for s in shapes}
    out = []
    for target in TARGETS:
        entry: dict[str, Any] = {
            "key": target.key,
            "text": target.text,
            "shape": target.shape,
            "impl": target.impl,
            "limit": target.limit,
            "unit": "s" if target.absolute else f"x {target.relative_to}",
        }
        measured = target.measured(timed)
        if measured is None:
            entry.update(status="not measured")
            out.append(entry)
            continue
        median, fastest = measured
        entry.update(
            median=median,
            min=fastest,
            status="pass" if median <= target.limit else "miss",
            min_status="pass" if fastest <= target.limit else "miss",
        )
        if median > target.limit:
            note = (
                f"Missed by {(median / target.limit - 1) * 100:.0f}% ({_fmt(median, target.absolute)} against "
                f"{_fmt(target.limit, target.absolute)})"
            )
            if fastest <= target.limit:
                note += (
                    f"; on the fastest samples it is {_fmt(fastest, target.absolute)}, within the target: "
                    "a miss within this machine's noise"
                )
            else:
                note += f"; {_fmt(fastest, target.absolute)} on the fastest samples too"
            entry["note"] = note + "."
            if target.explain is not None:
                with contextlib.suppress(KeyError):  # a row the explanation needs was not run
                    entry["why"] = target.explain(timed, by_shape)
        out.append(entry)
    return out


def markdown(evaluated: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | measured (median) | on the fastest samples (min) | verdict |",
        "|---|--:|--:|---|",
    ]
    for e in evaluated:
        if e["status"] == "not measured":
            lines.append(f"| {e['text']} | | | not measured in this run |")
            continue
        absolute = e["unit"] == "s"
        verdict = "**pass**" if e["status"] == "pass" else "**MISS**"
        lines.append(f"| {e['text']} | {_fmt(e['median'], absolute)} | {_fmt(e['min'], absolute)} | {verdict} |")
    misses = [e for e in evaluated if e["status"] == "miss"]
    lines.append("")
    if not misses:
        lines.append("All targets measured in this run are met (on the medians).")
    for e in misses:
        lines.append(f"- **{e['text']}**: {e['note']}" + (f" {e['why']}" if e.get("why") else ""))
    return lines


def console(evaluated: list[dict[str, Any]]) -> str:
    lines = []
    for e in evaluated:
        if e["status"] == "not measured":
            lines.append(f"  {'-':<5} {e['text']}: not measured")
            continue
        absolute = e["unit"] == "s"
        lines.append(
            f"  {e['status'].upper():<5} {e['text']}: {_fmt(e['median'], absolute)} (min {_fmt(e['min'], absolute)})"
        )
    return "\n".join(lines)
