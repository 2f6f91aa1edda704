"""The command line ``python -m polyak posthoc``: synthesize one ``sigma_rel`` or a sweep into files."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from polyak.posthoc._files import _check_replaceable, is_snapshot, list_snapshots, save_synthesized
from polyak.posthoc._synthesis import _progress, _target_time, synthesize
from polyak.posthoc._tracking import _check_sigma_rel
from polyak.schedules import _MAX_SIGMA_REL, _MIN_SIGMA_REL, gamma_from_sigma_rel

CLI_DESCRIPTION = (
    "Synthesize the power-function EMA of any sigma_rel from the snapshots of a polyak.posthoc.PostHocEMA "
    "(Karras et al., EDM2) and write it as a safetensors file. With --sigma-rel, --out is the file to write "
    "(or an existing folder to write into); with --sweep, --out is a folder (created if missing) that gets "
    "one file per value, named posthoc-sigma{sigma_rel:.4f}-t{t:010d}.safetensors. Each file is written under "
    "a temporary name in its folder, then renamed over the target, which must be a regular file or a new "
    "path: a symbolic link, a folder, a FIFO or a device is refused, never replaced. Each file written is "
    "reported on stdout. Load a result with safetensors.torch.load_file(path) and model.load_state_dict(...)."
)
"""The description of ``python -m polyak posthoc``, for a parser that wires it as a sub-command."""
_CLI_DTYPES = {"model": None, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class OneLineErrors(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _sigma_rel_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    try:
        return _check_sigma_rel("sigma_rel", value)
    except (ValueError, OverflowError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _snapshots_arg(text: str) -> str:
    if not text:  # Path("") is the current folder
        raise argparse.ArgumentTypeError("must be the snapshot folder, got ''")
    return text  # whether it is a folder of snapshots is checked when the command runs


def _out_arg(text: str) -> str:
    if not text:  # Path("") is the current folder: an empty --out would write there unasked
        raise argparse.ArgumentTypeError("must be a file or folder path, got ''")
    return text


def _step_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int (a snapshot time), got {text!r}") from None
    return value  # whether it is a snapshot time is checked against the folder


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
    parser.add_argument(
        "--snapshots", required=True, type=_snapshots_arg, metavar="DIR", help="the PostHocEMA snapshot folder"
    )
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
        "--step", type=_step_arg, default=None, metavar="N", help="snapshot time to synthesize at (default: the latest)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=_out_arg,
        metavar="PATH",
        help="output file (--sigma-rel; or a folder to write into) or folder (--sweep, created if missing)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(_CLI_DTYPES),
        default="model",
        help="dtype of the floating tensors written (default: the model's own)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show the progress bar (shown only if stderr is a terminal)"
    )
    parser.set_defaults(func=posthoc_command)
    return parser


def _output_name(sigma_rel: float, t: int) -> str:
    return f"posthoc-sigma{sigma_rel:.4f}-t{t:010d}.safetensors"


def _targets(args: argparse.Namespace, t_r: int) -> list[tuple[float, Path]]:
    """The files to write, checked: each a regular file or a new path, in a writable folder, not a snapshot."""
    out = Path(args.out)
    if args.sweep is not None:
        if os.path.lexists(out) and not out.is_dir():
            raise ValueError(
                f"--out {args.out!r} is not a folder: with --sweep, --out is the folder that gets one file per value"
            )
        folder = out
        targets = [(s, out / _output_name(s, t_r)) for s in args.sweep]
    else:
        target = out / _output_name(args.sigma_rel, t_r) if out.is_dir() else out
        folder = target.parent
        if not folder.is_dir():
            raise ValueError(f"--out {args.out!r}: folder {str(folder)!r} does not exist")
        targets = [(args.sigma_rel, target)]
    existing = folder
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent  # --sweep creates the folder (with parents)
    if not existing.is_dir():
        raise ValueError(f"--out {args.out!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out!r}: folder {str(existing)!r} is not writable")
    for _, path in targets:
        _check_replaceable(path, "--out")
        if is_snapshot(path):
            raise ValueError(f"--out {str(path)!r} is a snapshot: it is never overwritten; choose another path")
    return targets


def posthoc_command(args: argparse.Namespace) -> int:
    """Run ``python -m polyak posthoc`` with parsed ``args``; returns the exit status (2 on bad input).

    Every file written is reported on stdout (``wrote PATH (sigma_rel=..., t=...)``, the path absolute), and
    a sweep ends with one line saying how many files went into which folder. Errors are one line on stderr.
    """
    written: list[Path] = []
    try:
        if not os.path.isdir(args.snapshots):
            what = "is not a folder" if os.path.lexists(args.snapshots) else "does not exist"
            raise ValueError(f"--snapshots {args.snapshots!r} {what} (it is the PostHocEMA snapshot folder)")
        t_r = _target_time(list_snapshots(args.snapshots), args.step, args.snapshots)
        dtype = _CLI_DTYPES[args.dtype]
        targets = _targets(args, t_r)
        if args.sweep is not None:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        show = not args.no_progress and sys.stderr.isatty()  # a log file gets no bar fragments
        for sigma_rel, path in _progress(targets, show and len(targets) > 1, "sweep"):
            state = synthesize(args.snapshots, sigma_rel, args.step, dtype=dtype, progress=show and len(targets) == 1)
            try:
                save_synthesized(
                    state,
                    path,
                    {"sigma_rel": repr(sigma_rel), "gamma": repr(gamma_from_sigma_rel(sigma_rel)), "t": str(t_r)},
                )
            except ValueError as e:
                raise ValueError(f"--out: {e}") from None
            except OSError as e:
                raise OSError(f"--out: {e}") from None
            written.append(path)
            print(f"wrote {os.path.abspath(path)} (sigma_rel={sigma_rel:g}, t={t_r})")
    except (ValueError, OSError) as e:
        done = f" ({len(written)} files had been written)" if written else ""
        print(f"polyak posthoc: error: {e}{done}", file=sys.stderr)
        return 2
    if args.sweep is not None:
        print(f"wrote {len(written)} files into {os.path.abspath(args.out)}")
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
