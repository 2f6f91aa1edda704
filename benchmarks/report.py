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

import polyak
from benchmarks import targets as _targets
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
    versions["polyak"] = polyak.__version__  # the code that ran, whatever an installed copy's metadata says
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


def add_ratios(results: list[dict[str, Any]]) -> dict[str, str]:
    """Give each timed row its ratios to the float32 floor, to the best alternative and to its ignite row.

    The best alternative of a shape is its fastest row (by median) from another library. Returns it by shape.
    """
    ok = [r for r in results if r["status"] == "ok"]
    medians = {(r["shape"], r["impl"]): r["timing"]["median_s"] for r in ok}
    best: dict[str, str] = {}
    for r in ok:
        if IMPLS[r["impl"]].alternative:
            current = best.get(r["shape"])
            if current is None or medians[(r["shape"], r["impl"])] < medians[(r["shape"], current)]:
                best[r["shape"]] = r["impl"]
    for r in ok:
        t = r["timing"]["median_s"]
        floor = medians.get((r["shape"], FLOOR))
        r["vs_floor"] = t / floor if floor and r["impl"] != FLOOR else None
        warm_floor = next((f["warm"]["median_s"] for f in ok if f["shape"] == r["shape"] and f["impl"] == FLOOR), None)
        r["warm_vs_floor"] = (
            r["warm"]["median_s"] / warm_floor if r.get("cold") and warm_floor and r["impl"] != FLOOR else None
        )
        alt = best.get(r["shape"])
        r["vs_best_alternative"] = t / medians[(r["shape"], alt)] if alt and IMPLS[r["impl"]].ref is not None else None
        ref = IMPLS[r["impl"]].ref
        base = medians.get((r["shape"], ref)) if ref else None
        r["vs_ignite"] = t / base if base and ref != r["impl"] else None
    return best


def rows(results: list[dict[str, Any]], best: dict[str, str] | None = None) -> list[list[str]]:
    best = best or {}
    out = []
    for r in results:
        label = IMPLS[r["impl"]].label
        if best.get(r["shape"]) == r["impl"]:
            label += " ◆"
        if r["status"] != "ok":
            out.append([r["shape"], label, f"{r['status']}: {r['reason']}", "", "", "", "", "", "", ""])
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
                fmt_time(r["warm"]["median_s"]) if r.get("cold") else "",
                _fmt_ratio(r.get("warm_vs_floor")),
                _fmt_ratio(r.get("vs_best_alternative")),
                vs_ignite,
            ]
        )
    return out


HEADER = [
    "shape",
    "implementation",
    "median / update",
    "min",
    "IQR",
    "vs floor",
    "warm median",
    "warm vs floor",
    "vs best other",
    "vs ignite",
]


def console_table(results: list[dict[str, Any]], best: dict[str, str] | None = None) -> str:
    body = rows(results, best)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(HEADER)]
    right = {2, 3, 4, 5, 6, 7}

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


def markdown_table(results: list[dict[str, Any]], best: dict[str, str] | None = None) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---", "---", *["--:"] * 8]) + "|"]
    previous = None
    for row in rows(results, best):
        cells = list(row)
        if cells[0] == previous:
            cells[0] = ""
        else:
            previous = cells[0]
            cells[0] = f"**{cells[0]}**"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# -- memory and scale ----------------------------------------------------------------------------------
def _table(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(r) + " |" for r in body),
        ]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)] if body else []
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]]


def memory_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    """Bytes per parameter beyond the model, held after two updates and at the peak, float32 and bf16."""
    by = {(r["impl"], r["dtype"]): r for r in rows}

    def cell(r: dict[str, Any] | None) -> str:
        if r is None or r["status"] == "n/a":
            return ""
        if r["status"] != "ok":
            return r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
        return f"{r['held_bytes_per_param']:.2f} ({r['peak_bytes_per_param']:.2f})"

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    body = [[IMPLS[i].label, cell(by.get((i, "float32"))), cell(by.get((i, "bfloat16")))] for i in impls]
    return _table(["implementation", "float32 model: held (peak)", "bfloat16 model: held (peak)"], body, markdown)


def scaling_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    """polyak's default update by model size: cold median, ratio to the floor, bytes per parameter."""
    by = {(r["impl"], r["dtype"], r["scale"]): r for r in rows}
    body = []
    for dtype in ("float32", "bfloat16"):
        for scale in sorted({r["scale"] for r in rows}):
            ours, floor = by.get(("polyak-ema", dtype, scale)), by.get(("floor", dtype, scale))
            if ours is None or ours["status"] != "ok":
                body.append([dtype, f"{scale:,}", ours["status"] if ours else "", "", "", ""])
                continue
            ratio = f"{ours['median_s'] / floor['median_s']:.2f}x" if floor and floor["status"] == "ok" else ""
            per = ours["median_s"] / ours["params"] * 1e9
            body.append(
                [
                    dtype,
                    f"{ours['params']:,}",
                    fmt_time(ours["median_s"]),
                    f"{per:.2f} ns",
                    ratio,
                    f"{ours['held_bytes_per_param']:.2f}",
                ]
            )
    header = ["model dtype", "parameters", "update (cold median)", "per parameter", "vs floor", "bytes/param held"]
    return _table(header, body, markdown)


def zero_lines(run: dict[str, Any], markdown: bool) -> list[str]:
    """DeepSpeed ZeRO-3 (benchmarks.zero), a row per model dtype and rank: the bytes the EMA holds there against
    the whole EMA in one process, and its cold update against the floor over its partition and the whole EMA's."""
    if run.get("error"):
        return [f"not measured: {run['error']}"]

    def mib(n: float) -> str:
        return f"{n / 2**20:.1f} MiB"

    def timed(r: dict[str, Any], key: str) -> str:
        return f"{fmt_time(r[f'{key}_median_s'])} ({fmt_time(r[f'{key}_min_s'])})"

    body = [
        [
            r["dtype"],
            str(r["rank"]),
            f"{mib(r['zero_bytes'])} ({r['zero_bytes'] / r['whole_bytes']:.0%})",
            mib(r["whole_bytes"]),
            timed(r, "zero"),
            timed(r, "floor"),
            f"{r['zero_median_s'] / r['floor_median_s']:.2f}x ({r['zero_min_s'] / r['floor_min_s']:.2f}x)",
            timed(r, "whole"),
            f"{r['zero_median_s'] / r['whole_median_s']:.2f}x ({r['zero_min_s'] / r['whole_min_s']:.2f}x)",
        ]
        for r in sorted(run["rows"], key=lambda r: (r["dtype"] != "float32", r["rank"]))
    ]
    header = ["model dtype", "rank", "EMA held on the rank", "whole EMA, one process", "update: median (min)"]
    header += ["floor over the partition", "vs floor", "whole EMA's update, one process", "vs one process"]
    return _table(header, body, markdown)


# -- the iteration share --------------------------------------------------------------------------------
_ITER_ROWS = [
    ("train", "ignite trainer, no EMA"),
    ("train+polyak", "ignite trainer + polyak.EMAHandler"),
    ("train+ignite", "ignite trainer + ignite EMAHandler"),
    ("update-polyak", "polyak.EMAHandler update alone (handler call)"),
    ("update-ignite", "ignite EMAHandler update alone (handler call)"),
]


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def iteration_lines(it: dict[str, Any], markdown: bool) -> list[str]:
    """The iteration-share table (per-iteration times) and the shares, as Markdown or console lines."""
    if "error" in it:
        return [f"{'' if markdown else '  '}Not measured: {it['error']}"]
    tm = it["timing"]
    out = []
    if markdown:
        out += ["| what | median / iteration | min |", "|---|--:|--:|"]
        out += [f"| {label} | {fmt_time(tm[k]['median_s'])} | {fmt_time(tm[k]['min_s'])} |" for k, label in _ITER_ROWS]
        out += [
            "",
            "| EMA's share of an iteration | polyak | ignite |",
            "|---|--:|--:|",
            "| by difference: (with - without) / with, medians | "
            f"{_pct(it['polyak']['share_by_difference'])} | {_pct(it['ignite']['share_by_difference'])} |",
            "| by difference, mins | "
            f"{_pct(it['polyak']['share_by_difference_min'])} | {_pct(it['ignite']['share_by_difference_min'])} |",
            "| direct: update alone / iteration with it, medians | "
            f"{_pct(it['polyak']['share_direct'])} | {_pct(it['ignite']['share_direct'])} |",
            f"| direct, mins | {_pct(it['polyak']['share_direct_min'])} | {_pct(it['ignite']['share_direct_min'])} |",
        ]
    else:
        width = max(len(label) for _, label in _ITER_ROWS)
        out += [
            f"  {label:<{width}}  {fmt_time(tm[k]['median_s']):>10}  (min {fmt_time(tm[k]['min_s'])})"
            for k, label in _ITER_ROWS
        ]
        for which in ("polyak", "ignite"):
            s = it[which]
            out.append(
                f"  {which} EMA share: {_pct(s['share_direct'])} direct (update / iteration), "
                f"{_pct(s['share_by_difference'])} by difference of medians"
            )
    return out


# -- files -----------------------------------------------------------------------------------------------
def write_json(path: Path, run: dict[str, Any]) -> None:
    path.write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _kept_observations(path: Path) -> str:
    if path.exists():
        m = _OBS_RE.search(path.read_text(encoding="utf-8"))
        if m:
            return m.group(1)
    return _DEFAULT_OBS


def loads(run: dict[str, Any]) -> list[float]:
    """Every 1-minute load average read during the run."""
    sections = [*run["shapes"], *([run["iteration"]] if run.get("iteration") else [])]
    out = [s[k] for s in sections for k in ("loadavg_before", "loadavg_after") if s.get(k) is not None]
    return out + [x for x in (run["environment"].get("loadavg_start"), run["config"].get("loadavg_end")) if x]


def other_loads(run: dict[str, Any]) -> dict[str, float]:
    """CPU (in cores) that other processes took while each shape was timed, by shape key."""
    sections = [*run["shapes"], *([{"key": "iteration", **run["iteration"]}] if run.get("iteration") else [])]
    return {s["key"]: s["other_load_cores"] for s in sections if s.get("other_load_cores") is not None}


def load_summary(run: dict[str, Any]) -> str:
    seen, other = loads(run), other_loads(run)
    out = f"1-minute load average {min(seen):.1f} to {max(seen):.1f} (this run's own threads included)" if seen else ""
    if other:
        out += (
            f"; other processes took {min(other.values()):.2f} to {max(other.values()):.2f} cores "
            f"of {run['environment'].get('cpu_count')} while timing"
        )
    return out + "."


def _load_note(run: dict[str, Any]) -> list[str]:
    other = other_loads(run)
    seen = loads(run)
    if not other and not seen:
        return []
    env = run["environment"]
    cores = env.get("cpu_count") or 0
    lines = []
    if other:
        busiest = max(other.values())
        line = (
            "- CPU time taken by **other processes** while each shape was timed (the machine's busy time less "
            "this run's, from `/proc/stat`), in cores of "
            f"{cores}: " + ", ".join(f"{k} {v:.2f}" for k, v in other.items())
        )
        if cores and busiest > 0.25 * cores:
            line += (
                ". **The machine was shared** part of the time: with 2 threads on 2 cores, a multi-threaded "
                "kernel waits for a descheduled thread, so medians of those rows (the floors first) are "
                "noisy; the **min** column is the steadier one"
            )
        else:
            line += ": a quiet machine"
        lines.append(line + ".")
    if seen:
        lines.append(
            f"- 1-minute load average read before and after each shape: {min(seen):.1f} to {max(seen):.1f} "
            "(it counts this run's own threads, up to 2)."
        )
    return lines


def _figure_lines(figures: dict[str, Any] | None, kind: str, path: Path) -> list[str]:
    """The figure of ``kind`` (a :class:`benchmarks.figures.Figure`) as Markdown lines, numbered in the order of
    ``figures``, its path relative to the Markdown file; nothing where it was not drawn."""
    if not figures or kind not in figures:
        return []
    number = list(figures).index(kind) + 1
    return [*figures[kind].markdown(path.resolve().parent, number), ""]


def write_markdown(path: Path, run: dict[str, Any], figures: dict[str, Any] | None = None) -> None:
    """Write the report of ``run`` to ``path``; ``figures`` (from :func:`benchmarks.figures.draw`) are shown in
    their sections, above the tables they draw."""
    observations = _kept_observations(path)
    env, config, shapes, results = run["environment"], run["config"], run["shapes"], run["results"]
    best = run.get("best_alternative", {})
    v = env["versions"]
    others = ", ".join(f"{d} {v[d]}" for d in ("ema-pytorch", "torch-ema") if v.get(d)) or "none installed"
    used = [k for k in IMPLS if any(r["impl"] == k for r in results)]
    lines = [
        "# Benchmarks: one EMA update",
        "",
        "The time of **one EMA update** (fold the online weights into the averaged ones) for polyak's `EMA` in "
        "each of its modes, pytorch-ignite's `EMAHandler`, ema-pytorch, torch's `AveragedModel` and torch-ema, "
        "on a few model shapes, all in the same run; then the share of an ignite training iteration that the "
        "EMA takes. Generated by `python -m benchmarks` (`make bench`); raw numbers in "
        "`benchmarks/results.json`.",
        "",
        "**The floor** is one `a.lerp_(b, m)` on two contiguous **float32** tensors with as many elements as the "
        "model's floating tensors: the memory traffic an EMA update cannot avoid (read two, write one) in a "
        "single kernel call. The gap to it is per-tensor and Python overhead, or extra passes over memory. For "
        "the bfloat16 shape the float32 floor stays the reference (an EMA with a float32 master has float32 "
        "traffic at least); a bfloat16 floor is shown beside it.",
        "",
        "## How it was measured",
        "",
        "- The implementations of one shape are built around the same online model (each keeps its own EMA "
        "copy), except polyak's `flat=True`, which makes the model's parameters views into one buffer: it gets "
        "a freshly built model of its own. Then they are timed **interleaved**: each round takes one sample of "
        "every implementation, in a shuffled order, so that load from elsewhere on the machine hits every row "
        "alike.",
        f"- Per implementation: a warm-up (at least {config['min_warmup_calls']} calls and "
        f"{config['warmup_s']:g} s), then samples timed with `time.perf_counter`; fast updates are timed "
        f"in batches of back-to-back calls so that a sample lasts at least {config['min_sample_s'] * 1e6:g} µs. "
        f"Rounds go on until {config['budget_s']:g} s per implementation have passed and every row has at "
        f"least {config['min_samples']} samples. The garbage collector is off while timing.",
        "- **Cold, as the headline.** An EMA update runs after an optimizer step, which has just streamed the "
        "gradients, the optimizer state and the weights through the caches: the update finds little of its own "
        "data there. So each round first writes a buffer of 4x the last-level cache, then times one call "
        "(**cold**: the median, min, IQR and ratio columns), then a warm sample right after "
        "(**warm median**, **warm vs floor**), which is what a benchmark repeating the update back to back "
        "reports. For a tiny model (linear) cold also means the interpreter's own data evicted: tens of "
        "microseconds for every row, the floor's one `lerp_` included; its warm figure is its per-call cost. "
        "`--warm-only` skips the cold calls."
        if config.get("cold")
        else "- Warm timings only (`--warm-only`): the update's data is in cache more than after a training step.",
        "- **median** is the median time per update (the ratios are of medians); **min** the fastest "
        "sample, the least disturbed by other load; **IQR** the interquartile range over the median, a "
        "gauge of noise.",
        "- **vs floor**: over the float32 floor. **vs best other**: over the fastest of the other libraries' "
        "rows on the same shape (marked ◆; ignite's handler call, ema-pytorch, `AveragedModel`, torch-ema). "
        "**vs ignite**: over ignite's handler timed the same way, its direct handler call or, for rows "
        "marked †, firing the engine event.",
        f"- Momentum (weight of the online model) {config['momentum']:g}, i.e. decay "
        f"{1 - config['momentum']:g}. The online weights do not change between updates; the work does not "
        "depend on their values.",
        *(["- **Quick mode**: shorter budgets, noisier numbers."] if config.get("quick") else []),
        "",
        "Machine and software:",
        "",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores visible, torch threads: "
        f"{env['torch_threads']}, ATen CPU capability: {env['cpu_capability']}); no GPU.",
        f"- Python {env['python']}, torch {v.get('torch')}, pytorch-ignite {v.get('pytorch-ignite')}, "
        f"polyak {v.get('polyak')}; other libraries: {others}.",
        f"- Date: {env['date_utc']}; the whole run took {config.get('elapsed_s', 0):.0f} s"
        + (
            f", with `--wait-quiet {config['wait_quiet_s']:g}` (before each shape, up to that many seconds "
            "of waiting for 3 s in which other processes took under 0.2 cores)."
            if config.get("wait_quiet_s")
            else "."
        ),
        *_load_note(run),
        "",
        "Shapes:",
        "",
        *(
            f"- **{s['key']}**: {s['title']}; {s['tensors']} floating tensors ({', '.join(s['dtypes'])}), "
            f"{s['numel']:,} elements ({s['bytes'] / 2**20:.1f} MiB)."
            for s in shapes
        ),
        "",
        "What one timed call does:",
        "",
        *(f"- {IMPLS[k].label}: {IMPLS[k].what}." for k in used),
        "",
        "On a bfloat16 model the other libraries keep their EMA in bfloat16, without a master: the polyak "
        "row to compare them with there is `dtype=bf16`."
        + "".join(
            f" The libraries treat buffers differently; {s['key']}'s floating buffers are "
            f"{s['buffer_elements'] / s['numel']:.1%} of its elements."
            for s in shapes
            if s.get("buffer_elements")
        ),
        "",
        "## Results",
        "",
        *_figure_lines(figures, "update-vs-floor", path),
        markdown_table(results, best),
        "",
        "◆ the best alternative of the shape. † compared with ignite's engine-event row.",
        "",
        "## Targets",
        "",
        "Generated from the table above (medians; the min column for comparison). A ratio is over the float32 "
        "floor of the same shape.",
        "",
        *_targets.markdown(run.get("targets", [])),
        "",
    ]
    mem, scaling = run.get("memory"), run.get("scaling")
    if mem:
        params = next((r["params"] for r in mem if r.get("status") == "ok"), 0)
        lines += [
            "## Memory: bytes per parameter beyond the model",
            "",
            f"Each implementation in a fresh process, around a model of Linear layers with {params:,} parameters "
            "built directly in its dtype: the growth of resident memory once the EMA is built and has updated "
            "twice (*held*), and of the kernel's peak (`VmHWM`, reset before the EMA is built) in parentheses: "
            "construction and updates together. Resident memory counts what was written: a buffer allocated but "
            "never touched is not counted, memory freed but kept by the allocator is. The least an EMA can hold "
            "is its copy: 4 bytes per parameter in float32, 2 in bfloat16 (then without a float32 master).",
            "",
            *_figure_lines(figures, "memory", path),
            *memory_lines(mem, markdown=True),
            "",
        ]
    if scaling:
        lines += [
            "## Scaling: 1M to 1B parameters",
            "",
            "polyak's default update (`EMA(model).update()`, a float32 master for the bfloat16 model) on models "
            "of Linear layers of each size, each in a fresh process: the median of 5 cold updates (caches "
            "evicted before each), the time per parameter, the ratio to the float32 floor of the same size "
            "(timed the same way), and the bytes per parameter held beyond the model. Time per parameter "
            "that stays flat from 10M up is linear growth: nothing in the update costs more than its share.",
            "",
            *_figure_lines(figures, "scaling", path),
            *scaling_lines(scaling, markdown=True),
            "",
        ]
    zero = run.get("zero")
    if zero:
        z = zero.get("config", {})
        params = next((r["params"] for r in zero.get("rows", [])), 0)
        lines += [
            "## DeepSpeed ZeRO-3: the EMA on each rank",
            "",
            f"`EMA(engine)` of a ZeRO-3 engine (DeepSpeed on the CPU, gloo, {z.get('ranks', 2)} ranks of "
            f"{z.get('threads_per_rank', 1)} torch thread each; `benchmarks/zero.py`) around {z.get('layers', 0)} "
            f"`nn.Linear({z.get('width', 0)}, {z.get('width', 0)})` ({params:,} parameters, all partitioned), "
            "after a training step. Each rank averages its own partitions (`p.ds_tensor`), with no collective. "
            "*Held*: the bytes of the tensors of the EMA's state on the rank (its partitions, and a bf16 model's "
            "float32 masters), against the whole EMA of the same model in one process (what each rank holds "
            "under DDP or ZeRO 1-2). Times: cold (a "
            f"{z.get('evict_bytes', 0) / 2**20:.0f} MiB buffer written before each call), median (min) of "
            f"{z.get('rounds', 0)} interleaved rounds that start together on both ranks: the ZeRO-3 update; the "
            "floor, one float32 `lerp_` over as many elements as the rank's partitions; the whole EMA's update "
            "in one process on the same rank. `--no-zero` skips it (and `--quick`).",
            "",
            *zero_lines(zero, markdown=True),
            "",
        ]
    it = run.get("iteration")
    if it:
        lines += [
            "## The EMA's share of a training iteration",
            "",
            f"The demo's model (`polyak.demo.make_model`, {it.get('parameters', 0):,} parameters) trained by an "
            "ignite "
            f"`create_supervised_trainer` (forward, cross-entropy, backward, SGD with momentum) on batches of "
            f"{it.get('batch_size', 0)} random 1x8x8 images, without an EMA and with each library's `EMAHandler` "
            "(the demo's settings: momentum 0.02, warm-up from 0.5 over 100 updates). Each trainer has its "
            f"own model; a sample is one `trainer.run` of {it.get('iterations_per_sample', 0)} iterations; the "
            "handlers' update alone is timed in the same interleaved rounds. The difference of two "
            "iteration medians is noisier than the EMA's share itself (it can come out negative): read the "
            "direct lines.",
            "",
            *iteration_lines(it, markdown=True),
            "",
        ]
    lines += [
        "## Observations",
        "",
        OBS_BEGIN,
        observations.rstrip("\n") + "\n" + OBS_END,
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
