"""``python -m benchmarks``: time one EMA update of every implementation on every shape."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.impls import IMPLS, Step
from benchmarks.shapes import SHAPES, floating_tensors
from benchmarks.timing import measure_interleaved

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
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
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
    return p.parse_args(argv)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_shape(
    skey: str, impl_keys: list[str], timing_kw: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build the shape's model and every available implementation around it, then time them interleaved."""
    shape = SHAPES[skey]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = shape.build()
    tensors = floating_tensors(model)
    info = {
        "key": skey,
        "title": shape.title,
        "tensors": len(tensors),
        "numel": sum(t.numel() for t in tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "loadavg_before": _loadavg(),
    }
    del tensors
    rows: dict[str, dict[str, Any]] = {}
    steps: dict[str, Step] = {}
    for ikey in impl_keys:
        impl = IMPLS[ikey]
        row: dict[str, Any] = {"shape": skey, "impl": ikey, "label": impl.label}
        rows[ikey] = row
        missing = impl.missing()
        if missing:
            row.update(status="skipped", reason=f"{', '.join(missing)} not installed")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                steps[ikey] = impl.setup(model, MOMENTUM)
        except Exception as e:  # one broken row must not sink the run
            traceback.print_exc()
            row.update(status="error", reason=f"setup: {type(e).__name__}: {e}")

    print(f"{skey}: timing {len(steps)} implementations, interleaved ...", flush=True)
    timings, errors = measure_interleaved(steps, **timing_kw)
    info["loadavg_after"] = _loadavg()
    for ikey, e in errors.items():
        traceback.print_exception(e)
        rows[ikey].update(status="error", reason=f"{type(e).__name__}: {e}")
    for ikey, t in timings.items():
        rows[ikey].update(status="ok", timing=t.as_dict())
    for ikey, row in rows.items():
        shown = report.fmt_time(row["timing"]["median_s"]) if row["status"] == "ok" else row["status"]
        print(f"  {IMPLS[ikey].label:<40} {shown}", flush=True)
    del steps, model
    gc.collect()
    return info, list(rows.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape_keys = _keys(args.shapes, SHAPES, "shapes")
    impl_keys = _keys(args.impls, IMPLS, "implementations")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = {
        "quick": args.quick,
        "momentum": MOMENTUM,
        "budget_s": args.budget if args.budget is not None else (0.15 if args.quick else 2.0),
        "warmup_s": 0.05 if args.quick else 0.2,
        "min_warmup_calls": 2 if args.quick else 3,
        "min_samples": 3 if args.quick else 7,
        "min_sample_s": 2e-4,
        "threads": args.threads,
    }
    timing_kw = {k: config[k] for k in ("budget_s", "warmup_s", "min_warmup_calls", "min_samples", "min_sample_s")}
    env = report.environment()
    print(
        f"{env['cpu_model']}, torch {env['versions']['torch']} ({env['torch_threads']} threads), "
        f"ignite {env['versions']['pytorch-ignite']}",
        flush=True,
    )

    started = time.perf_counter()
    shapes_info: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for skey in shape_keys:
        shape_info, shape_results = run_shape(skey, impl_keys, timing_kw)
        shapes_info.append(shape_info)
        results.extend(shape_results)
    config["elapsed_s"] = round(time.perf_counter() - started, 1)

    report.add_ratios(results)
    print()
    print(report.console_table(results))
    print(f"\n† compared with ignite's engine-event row. Total {config['elapsed_s']:.0f} s.")
    if not args.no_write:
        report.write_json(args.json, env, config, shapes_info, results)
        report.write_markdown(args.markdown, env, config, shapes_info, results)
        print(f"wrote {args.json} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
