"""The command line ``python -m polyak posthoc``: synthesize one ``sigma_rel`` or a sweep into files."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from polyak.posthoc._files import is_snapshot, list_snapshots, save_synthesized
from polyak.posthoc._synthesis import _progress, _target_time, synthesize
from polyak.posthoc._tracking import _check_sigma_rel
from polyak.schedules import _MAX_SIGMA_REL, _MIN_SIGMA_REL, gamma_from_sigma_rel

CLI_DESCRIPTION = (
    "Synthesize the power-function EMA of any sigma_rel from the snapshots of a polyak.posthoc.PostHocEMA "
    "(Karras et al., EDM2) and write it as a safetensors file. With --sigma-rel, --out is the file to write "
    "(or an existing folder to write into); with --sweep, --out is a folder (created if missing) that gets "
    "one file per value, named posthoc-sigma{sigma_rel:.4f}-t{t:010d}.safetensors. Load a result with "
    "safetensors.torch.load_file(path) and model.load_state_dict(...)."
)
"""The description of ``python -m polyak posthoc``, for a parser that wires it as a sub-command."""
_CLI_DTYPES = {"model": None, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class OneLineErrors(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _sigma_rel_arg(text: str) -> float:
    try:
        return _check_sigma_rel("sigma_rel", float(text))
    except (ValueError, OverflowError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sweep_arg(text: str) -> list[float]:
    """``START:STOP:STEP`` -> START, START + STEP, ..., up to STOP included (within float tolerance)."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, stride = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be START:STOP:STEP (e.g. 0.03:0.20:0.01), got {text!r}") from None
    if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(stride) and stride > 0 and start <= stop):
        raise argparse.ArgumentTypeError(f"needs STEP > 0 and START <= STOP, got {text!r}")
    count = math.floor((stop - start) / stride + 1e-9) + 1
    if count > 10_000:
        raise argparse.ArgumentTypeError(f"asks for {count} values (at most 10000), got {text!r}")
    values = [round(start + i * stride, 12) for i in range(count)]
    for v in values:
        _sigma_rel_arg(str(v))
    return values


def add_posthoc_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``python -m polyak posthoc`` to ``parser``; sets ``func=posthoc_command``.

    To wire it as a sub-command::

        p = subparsers.add_parser("posthoc", help="...", description=polyak.posthoc.CLI_DESCRIPTION)
        polyak.posthoc.add_posthoc_arguments(p)
        ...
        args = parser.parse_args(argv)
        return args.func(args)
    """
    parser.add_argument("--snapshots", required=True, metavar="DIR", help="the PostHocEMA snapshot folder")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--sigma-rel",
        type=_sigma_rel_arg,
        metavar="S",
        help=f"relative width of the EMA to synthesize, in [{_MIN_SIGMA_REL}, {_MAX_SIGMA_REL:.4f})",
    )
    which.add_argument(
        "--sweep",
        type=_sweep_arg,
        metavar="START:STOP:STEP",
        help="synthesize every sigma_rel from START to STOP (inclusive) by STEP, one file each",
    )
    parser.add_argument(
        "--step", type=int, default=None, metavar="N", help="snapshot time to synthesize at (default: the latest)"
    )
    parser.add_argument("--out", required=True, metavar="PATH", help="output file (--sigma-rel) or folder (--sweep)")
    parser.add_argument(
        "--dtype",
        choices=sorted(_CLI_DTYPES),
        default="model",
        help="dtype of the floating tensors written (default: the model's own)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.set_defaults(func=posthoc_command)
    return parser


def _output_name(sigma_rel: float, t: int) -> str:
    return f"posthoc-sigma{sigma_rel:.4f}-t{t:010d}.safetensors"


def posthoc_command(args: argparse.Namespace) -> int:
    """Run ``python -m polyak posthoc`` with parsed ``args``; returns the exit status (2 on bad input)."""
    try:
        t_r = _target_time(list_snapshots(args.snapshots), args.step, args.snapshots)
        dtype = _CLI_DTYPES[args.dtype]
        out = Path(args.out)
        if args.sweep is not None:
            out.mkdir(parents=True, exist_ok=True)
            targets = [(s, out / _output_name(s, t_r)) for s in args.sweep]
        else:
            target = out / _output_name(args.sigma_rel, t_r) if out.is_dir() else out
            targets = [(args.sigma_rel, target)]
        for _, path in targets:
            if is_snapshot(path):
                raise ValueError(f"--out {str(path)!r} is a snapshot: it is never overwritten; choose another path")
        show = not args.no_progress
        for sigma_rel, path in _progress(targets, show and len(targets) > 1, "sweep"):
            state = synthesize(args.snapshots, sigma_rel, args.step, dtype=dtype, progress=show and len(targets) == 1)
            save_synthesized(
                state,
                path,
                {"sigma_rel": repr(sigma_rel), "gamma": repr(gamma_from_sigma_rel(sigma_rel)), "t": str(t_r)},
            )
            print(f"wrote {path} (sigma_rel={sigma_rel:g}, t={t_r})")
    except (ValueError, OSError) as e:
        print(f"polyak posthoc: error: {e}", file=sys.stderr)
        return 2
    return 0


def posthoc_main(argv: Sequence[str] | None = None) -> int:
    """``python -m polyak posthoc [options]`` as a function: ``argv`` are the options (``sys.argv[1:]``).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from polyak.posthoc import PostHocEMA, posthoc_main
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     posthoc = PostHocEMA(nn.Linear(1, 1), snapshot_every=2, directory=Path(folder, "snaps"))
        ...     for _ in range(4):
        ...         _ = posthoc.update()
        ...     out = Path(folder, "ema.safetensors")
        ...     posthoc_main(["--snapshots", str(posthoc.directory), "--sigma-rel", "0.07",
        ...                   "--out", str(out), "--no-progress"]) == 0 and out.is_file()
        wrote ... (sigma_rel=0.07, t=4)
        True
    """
    parser = OneLineErrors(prog="polyak posthoc", description=CLI_DESCRIPTION)
    add_posthoc_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))
