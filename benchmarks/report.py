"""Output of a run: the console table, ``BENCHMARKS.md`` and ``benchmarks/results.json``."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from benchmarks.impls import FLOOR, IGNITE_FIRE, IMPLS

OBS_BEGIN = "<!-- observations:begin (kept when the file is regenerated) -->"
OBS_END = "<!-- observations:end -->"
_OBS_RE = re.compile(re.escape(OBS_BEGIN) + r"\n(.*?)" + re.escape(OBS_END), re.DOTALL)
_DEFAULT_OBS = "_No observations written yet._\n"

_DISTRIBUTIONS = ("torch", "pytorch-ignite", "polyak", "ema-pytorch", "torch-ema")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    versions = {}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


# -- numbers -------------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _fmt_ratio(r: float | None) -> str:
    return "" if r is None else f"{r:.2f}x"


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Give each timed row its ratio to the floor and to its ignite row, on the same shape."""
    medians = {(r["shape"], r["impl"]): r["timing"]["median_s"] for r in results if r["status"] == "ok"}
    for r in results:
        if r["status"] != "ok":
            continue
        t = r["timing"]["median_s"]
        floor = medians.get((r["shape"], FLOOR))
        r["vs_floor"] = t / floor if floor and r["impl"] != FLOOR else None
        ref = IMPLS[r["impl"]].ref
        base = medians.get((r["shape"], ref)) if ref else None
        r["vs_ignite"] = t / base if base and ref != r["impl"] else None


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in results:
        label = IMPLS[r["impl"]].label
        if r["status"] != "ok":
            out.append([r["shape"], label, f"{r['status']}: {r['reason']}", "", "", "", ""])
            continue
        t = r["timing"]
        iqr = (t["p75_s"] - t["p25_s"]) / t["median_s"] * 100 if t["median_s"] else 0.0
        vs_ignite = _fmt_ratio(r.get("vs_ignite"))
        if vs_ignite and IMPLS[r["impl"]].ref == IGNITE_FIRE:
            vs_ignite += " †"
        out.append(
            [
                r["shape"],
                label,
                fmt_time(t["median_s"]),
                fmt_time(t["min_s"]),
                f"{iqr:.0f}%",
                _fmt_ratio(r.get("vs_floor")),
                vs_ignite,
            ]
        )
    return out


HEADER = ["shape", "implementation", "median / update", "min", "IQR", "vs floor", "vs ignite"]


def console_table(results: list[dict[str, Any]]) -> str:
    body = rows(results)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(HEADER)]
    right = {2, 3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    out = [line(HEADER), "  ".join("-" * w for w in widths)]
    previous = None
    for row in body:
        if previous is not None and row[0] != previous:
            out.append("")
        previous = row[0]
        out.append(line(row))
    return "\n".join(out)


def markdown_table(results: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---", "---", "--:", "--:", "--:", "--:", "--:"]) + "|"]
    previous = None
    for row in rows(results):
        cells = list(row)
        if cells[0] == previous:
            cells[0] = ""
        else:
            previous = cells[0]
            cells[0] = f"**{cells[0]}**"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# -- files -----------------------------------------------------------------------------------------------
def write_json(
    path: Path, env: dict[str, Any], config: dict[str, Any], shapes: list[dict[str, Any]], results: list[dict[str, Any]]
) -> None:
    payload = {"environment": env, "config": config, "shapes": shapes, "results": results}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _kept_observations(path: Path) -> str:
    if path.exists():
        m = _OBS_RE.search(path.read_text(encoding="utf-8"))
        if m:
            return m.group(1)
    return _DEFAULT_OBS


def _load_note(env: dict[str, Any], shapes: list[dict[str, Any]]) -> list[str]:
    loads = [s[k] for s in shapes for k in ("loadavg_before", "loadavg_after") if s.get(k) is not None]
    if not loads:
        return []
    line = f"- 1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f}"
    cores = env.get("cpu_count") or 0
    if cores and max(loads) > 0.5 * cores:
        line += (
            f" on {cores} cores: **the machine was busy with other work**, so the timings are noisy, "
            "multi-threaded kernels most (a parallel region waits for its slowest thread)"
        )
    return [line + "."]


def write_markdown(
    path: Path, env: dict[str, Any], config: dict[str, Any], shapes: list[dict[str, Any]], results: list[dict[str, Any]]
) -> None:
    observations = _kept_observations(path)
    v = env["versions"]
    others = ", ".join(f"{d} {v[d]}" for d in ("ema-pytorch", "torch-ema") if v.get(d)) or "none installed"
    used = [k for k in IMPLS if any(r["impl"] == k for r in results)]
    lines = [
        "# Benchmarks: one EMA update",
        "",
        "The time of **one EMA update** (fold the online weights into the averaged ones) for polyak, "
        "pytorch-ignite's `EMAHandler` and, where installed, other EMA libraries, on a few model shapes. "
        "Generated by `python -m benchmarks`; raw numbers in `benchmarks/results.json`.",
        "",
        "**The floor** is one `a.lerp_(b, m)` on two contiguous float32 tensors with as many elements as the "
        "model's floating tensors: the memory traffic an EMA update cannot avoid (read two, write one) in a "
        "single kernel call. Nothing that averages the same number of elements can do much better on this "
        "machine; the gap to it is per-tensor and Python overhead, or extra passes over memory.",
        "",
        "## How it was measured",
        "",
        "- All implementations of one shape are built around the same online model, then timed "
        "**interleaved**: each round takes one sample of every implementation, in a shuffled order, so "
        "that load from elsewhere on the machine hits every row alike.",
        f"- Per implementation: a warm-up (at least {config['min_warmup_calls']} calls and "
        f"{config['warmup_s']:g} s), then samples timed with `time.perf_counter`; fast updates are timed "
        f"in batches of back-to-back calls so that a sample lasts at least {config['min_sample_s'] * 1e6:g} µs. "
        f"Rounds go on until {config['budget_s']:g} s per implementation have passed and every row has at "
        f"least {config['min_samples']} samples. The garbage collector is off while timing.",
        "- **median** is the median time per update (the ratios are of medians); **min** the fastest "
        "sample, the least disturbed by other load; **IQR** the interquartile range over the median, a "
        "gauge of noise.",
        f"- Momentum (weight of the online model) {config['momentum']:g}, i.e. decay "
        f"{1 - config['momentum']:g}. The online weights do not change between updates; the work does not "
        "depend on their values.",
        "- **vs ignite** compares with ignite's handler timed the same way: its direct handler call, "
        "or, for rows marked †, firing the engine event.",
        *(["- **Quick mode**: shorter budgets, noisier numbers."] if config.get("quick") else []),
        "",
        "Machine and software:",
        "",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores visible, torch threads: "
        f"{env['torch_threads']}, ATen CPU capability: {env['cpu_capability']}); no GPU.",
        f"- Python {env['python']}, torch {v.get('torch')}, pytorch-ignite {v.get('pytorch-ignite')}, "
        f"polyak {v.get('polyak')}; other libraries: {others}.",
        f"- Date: {env['date_utc']}.",
        *_load_note(env, shapes),
        "",
        "Shapes:",
        "",
        *(
            f"- **{s['key']}**: {s['title']}; {s['tensors']} floating tensors, {s['numel']:,} elements "
            f"({s['bytes'] / 2**20:.1f} MiB)."
            for s in shapes
        ),
        "",
        "What one timed call does:",
        "",
        *(f"- {IMPLS[k].label}: {IMPLS[k].what}." for k in used),
        "",
        "## Results",
        "",
        markdown_table(results),
        "",
        "† compared with ignite's engine-event row.",
        "",
        "## Observations",
        "",
        OBS_BEGIN,
        observations.rstrip("\n") + "\n" + OBS_END,
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
