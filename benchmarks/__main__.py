"""``python -m benchmarks``: time one EMA update of every implementation on every shape."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import figures, iteration, memory, report, targets, zero
from benchmarks.impls import IMPLS, Step
from benchmarks.shapes import SHAPES, floating_tensors
from benchmarks.timing import evictor, measure_interleaved

ROOT = Path(__file__).resolve().parent.parent
MOMENTUM = 0.001


def _keys(text: str | None, registry: dict[str, Any], what: str) -> list[str]:
    if not text:
        return list(registry)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in registry]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(registry)}")
    return keys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short budgets: a smoke run, noisier numbers")
    p.add_argument(
        "--no-write", action="store_true", help="print only: do not rewrite BENCHMARKS.md nor benchmarks/results.json"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timing per (shape, implementation); default 2.0, 0.15 with --quick",
    )
    p.add_argument("--shapes", help=f"comma-separated subset of: {', '.join(SHAPES)}")
    p.add_argument("--impls", help=f"comma-separated subset of: {', '.join(IMPLS)}")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="time nothing: re-evaluate the targets and rewrite BENCHMARKS.md from the results in --json",
    )
    p.add_argument(
        "--no-iteration", action="store_true", help="skip the EMA's share of a training iteration of the demo model"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each shape, wait up to SECONDS for other processes to leave the CPUs idle (default 0)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the bytes-per-parameter table")
    p.add_argument("--no-scaling", action="store_true", help="skip the table of 1M to 1B parameters")
    p.add_argument(
        "--no-zero", action="store_true", help="skip the DeepSpeed ZeRO-3 table (2 ranks; --quick skips it too)"
    )
    p.add_argument(
        "--warm-only",
        action="store_true",
        help="time warm only (no cache eviction before a cold call in each round): faster, flattering numbers",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=ROOT / "benchmarks" / "results.json",
        help="where to write the raw results (default benchmarks/results.json)",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        default=ROOT / "BENCHMARKS.md",
        help="where to write the report (default BENCHMARKS.md)",
    )
    p.add_argument(
        "--figures",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to draw the report's figures, SVG (default docs/figures beside --markdown; needs matplotlib)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown on stderr only if it is a terminal)"
    )
    return p.parse_args(argv)


class _NoBar:
    def set_description(self, desc: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress(total: int, enabled: bool) -> Iterator[Any]:
    """A tqdm bar over the run's ``total`` stages on stderr, where ``enabled`` and tqdm is installed; the run's
    own lines (stdout) print above it meanwhile. Otherwise an object with the same two methods that does
    nothing: ``set_description(stage)`` and ``update()`` (a stage done)."""
    try:
        from tqdm import tqdm
        from tqdm.contrib import DummyTqdmFile
    except ImportError:  # tqdm is optional (the demo extra): no bar without it
        enabled = False
    if not enabled:
        yield _NoBar()
        return
    with (
        tqdm(total=total, file=sys.stderr, unit="stage", leave=False, dynamic_ncols=True) as bar,
        contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)),
    ):
        yield bar


def _shown(path: Path) -> str:
    """``path`` relative to the working folder where it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write(args: argparse.Namespace, run: dict[str, Any]) -> list[str]:
    """Write the results, the figures and the report; return what was written where, a line each."""
    report.write_json(args.json, run)
    drawn = figures.draw(run, args.figures or args.markdown.parent / "docs" / "figures")
    report.write_markdown(args.markdown, run, drawn)
    lines = [f"  {_shown(args.json)}: the raw results", f"  {_shown(args.markdown)}: the report"]
    lines += [f"  {_shown(f.path)}: a figure, {f.alt}" for f in drawn.values()]
    if not figures.available():
        lines.append("  no figures: matplotlib is not installed (pip install 'polyak[demo]')")
    return lines


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class OtherLoad:
    """CPU time that other processes took while a block ran, in cores (0 to the core count).

    The load average counts this run's own threads too; this does not: it is the machine's busy time
    (``/proc/stat``) less this process's CPU time, over the wall time. None where ``/proc/stat`` is missing.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> OtherLoad:
        t = os.times()
        self._start = (time.perf_counter(), self._busy_s(), t.user + t.system)
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        busy1, t = self._busy_s(), os.times()
        wall = time.perf_counter() - wall0
        if busy0 is not None and busy1 is not None and wall > 0:
            self.cores = max(0.0, (busy1 - busy0 - (t.user + t.system - own0)) / wall)


def _build(skey: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SHAPES[skey].build()


def wait_quiet(limit_s: float, threshold_cores: float = 0.2, window_s: float = 3.0) -> float:
    """Wait until other processes take less than ``threshold_cores`` over ``window_s``, for up to ``limit_s``.

    Returns the seconds waited. Polls ``/proc/stat`` while this process sleeps, so all the busy time seen is
    other processes'. Returns at once where ``/proc/stat`` is missing.
    """
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        with OtherLoad() as other:
            time.sleep(window_s)
        if other.cores is None or other.cores < threshold_cores:
            break
    return time.perf_counter() - started


def run_shape(
    skey: str,
    impl_keys: list[str],
    timing_kw: dict[str, Any],
    wait_s: float = 0.0,
    evict: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build the shape's model and every available implementation around it, then time them interleaved.

    The implementations share one online model, except those flagged ``own_model``, which change the model
    they are given and get a fresh one each.
    """
    shape = SHAPES[skey]
    waited = wait_quiet(wait_s) if wait_s > 0 else 0.0
    model = _build(skey)
    tensors = floating_tensors(model)
    info = {
        "key": skey,
        "title": shape.title,
        "tensors": len(tensors),
        "numel": sum(t.numel() for t in tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "dtypes": sorted(str(d).removeprefix("torch.") for d in {t.dtype for t in tensors}),
        "buffer_elements": sum(b.numel() for b in model.buffers() if b.is_floating_point()),
        "loadavg_before": _loadavg(),
        "waited_for_quiet_s": round(waited, 1),
    }
    del tensors
    rows: dict[str, dict[str, Any]] = {}
    steps: dict[str, Step] = {}
    for ikey in impl_keys:
        impl = IMPLS[ikey]
        if not impl.applies_to(model):
            continue
        row: dict[str, Any] = {"shape": skey, "impl": ikey, "label": impl.label}
        rows[ikey] = row
        missing = impl.missing()
        if missing:
            row.update(status="skipped", reason=f"{', '.join(missing)} not installed")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                steps[ikey] = impl.setup(_build(skey) if impl.own_model else model, MOMENTUM)
        except Exception as e:  # one broken row must not sink the run
            traceback.print_exc()
            row.update(status="error", reason=f"setup: {type(e).__name__}: {e}")

    print(f"{skey}: timing {len(steps)} implementations, interleaved ...", flush=True)
    with OtherLoad() as other:
        warm, errors, cold = measure_interleaved(steps, **timing_kw, evict=evict)
    info["loadavg_after"] = _loadavg()
    info["other_load_cores"] = other.cores
    for ikey, e in errors.items():
        traceback.print_exception(e)
        rows[ikey].update(status="error", reason=f"{type(e).__name__}: {e}")
    for ikey, t in warm.items():
        # the headline is cold where measured (see benchmarks.timing); warm beside it
        rows[ikey].update(status="ok", timing=(cold.get(ikey) or t).as_dict(), warm=t.as_dict(), cold=bool(cold))
    for ikey, row in rows.items():
        shown = report.fmt_time(row["timing"]["median_s"]) if row["status"] == "ok" else row["status"]
        print(f"  {IMPLS[ikey].label:<46} {shown}", flush=True)
    if other.cores is not None:
        print(f"  (other processes took {other.cores:.2f} cores meanwhile)", flush=True)
    del steps, model
    gc.collect()
    return info, list(rows.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        run = json.loads(args.json.read_text(encoding="utf-8"))
        run["targets"] = targets.evaluate(run["results"], run["shapes"])
        written = write(args, run)
        print(f"from {args.json} (its targets re-evaluated), wrote:", *written, sep="\n")
        return 0
    shape_keys = _keys(args.shapes, SHAPES, "shapes")
    impl_keys = _keys(args.impls, IMPLS, "implementations")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config: dict[str, Any] = {
        "quick": args.quick,
        "momentum": MOMENTUM,
        "budget_s": args.budget if args.budget is not None else (0.15 if args.quick else 2.0),
        "warmup_s": 0.05 if args.quick else 0.2,
        "min_warmup_calls": 2 if args.quick else 3,
        "min_samples": 3 if args.quick else 7,
        "min_sample_s": 5e-5,
        "threads": args.threads,
        "wait_quiet_s": args.wait_quiet,
    }
    timing_kw = {k: config[k] for k in ("budget_s", "warmup_s", "min_warmup_calls", "min_samples", "min_sample_s")}
    env = report.environment()
    env["loadavg_start"] = _loadavg()
    print(
        f"{env['cpu_model']}, torch {env['versions']['torch']} ({env['torch_threads']} threads), "
        f"ignite {env['versions']['pytorch-ignite']}; load average {env['loadavg_start']}",
        flush=True,
    )

    evict = None if args.warm_only else evictor()
    config["cold"] = evict is not None
    started = time.perf_counter()
    shapes_info: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    with_zero = not (args.no_zero or args.quick)
    stages = len(shape_keys) + (not args.no_iteration) + (not args.no_memory) + (not args.no_scaling) + with_zero
    with progress(stages, not args.no_progress and sys.stderr.isatty()) as bar:  # a log file gets no bar
        for skey in shape_keys:
            bar.set_description(skey)
            shape_info, shape_results = run_shape(skey, impl_keys, timing_kw, args.wait_quiet, evict)
            shapes_info.append(shape_info)
            results.extend(shape_results)
            bar.update()

        it = None
        if not args.no_iteration:
            bar.set_description("iteration")
            print("demo model: timing ignite training iterations with and without an EMA ...", flush=True)
            if args.wait_quiet > 0:
                wait_quiet(args.wait_quiet)
            before = _loadavg()
            with OtherLoad() as other:
                try:
                    it = iteration.measure(timing_kw)
                except Exception as e:  # the update tables stand on their own
                    traceback.print_exc()
                    it = {"error": f"{type(e).__name__}: {e}"}
            it.update(loadavg_before=before, loadavg_after=_loadavg(), other_load_cores=other.cores)
            bar.update()
        mem = scaling = None
        if not args.no_memory:
            bar.set_description("memory")
            mem = memory.measure_memory()
            bar.update()
        if not args.no_scaling:
            bar.set_description("scaling")
            scaling = memory.measure_scaling()
            bar.update()
        zero_run = None
        if with_zero:
            bar.set_description("zero")
            print("DeepSpeed ZeRO-3: the EMA on each of 2 ranks ...", flush=True)
            zero_run = zero.measure()
            bar.update()
    config["elapsed_s"] = round(time.perf_counter() - started, 1)
    config["loadavg_end"] = _loadavg()

    best = report.add_ratios(results)
    run = {
        "environment": env,
        "config": config,
        "shapes": shapes_info,
        "results": results,
        "best_alternative": best,
        "targets": targets.evaluate(results, shapes_info),
        "iteration": it,
        "memory": mem,
        "scaling": scaling,
        "zero": zero_run,
    }
    print()
    print(report.console_table(results, best))
    print("\n◆ the best alternative of the shape. † compared with ignite's engine-event row.")
    print("\nTargets (ratios of medians to the float32 floor):")
    print(targets.console(run["targets"]))
    if it:
        print("\nDemo model, one ignite training iteration:")
        print("\n".join(report.iteration_lines(it, markdown=False)))
    if mem:
        print("\nBytes per parameter held beyond the model (peak):")
        print("\n".join(report.memory_lines(mem, markdown=False)))
    if scaling:
        print("\nScaling of polyak's default update:")
        print("\n".join(report.scaling_lines(scaling, markdown=False)))
    if zero_run:
        print("\nDeepSpeed ZeRO-3, per rank:")
        print("\n".join(report.zero_lines(zero_run, markdown=False)))
    print(f"\nTotal {config['elapsed_s']:.0f} s. {report.load_summary(run)}")
    if not args.no_write:
        print("\nWrote:", *write(args, run), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
