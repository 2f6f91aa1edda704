"""Command line of polyak: ``python -m polyak COMMAND [options]`` (or the ``polyak`` script).

Commands:
    demo     train a small CNN on scikit-learn's digits with an EMA of its weights (see :mod:`polyak.demo`)
    posthoc  synthesize a post-hoc EMA from snapshots (see :mod:`polyak.posthoc`)

``python -m polyak COMMAND --help`` lists a command's options. Each command is one ``_add_<command>``
function that registers its sub-parser and sets ``func``, the function that runs it and returns the exit
status; adding a command is adding such a function to ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from polyak import __version__

if TYPE_CHECKING:
    from polyak.demo import DemoResult

__all__ = ["build_parser", "main"]

_N = TypeVar("_N", int, float)
_AUTO = "auto"
_DIGITS = 1797  # images in scikit-learn's digits: the held-out split must leave some on each side
_MAX_SEED = 2**64 - 1  # torch.manual_seed's range


# -- argument types: bad values fail at parse time with argparse's usual message --------------------------
def _number(text: str, kind: type[_N]) -> _N:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _open_unit(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _closed_unit(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _unit_right_open(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _held_out(text: str) -> float:
    value = _open_unit(text)
    if not 1 <= round(value * _DIGITS) <= _DIGITS - 1:
        raise argparse.ArgumentTypeError(
            f"must leave at least one of the {_DIGITS} images on each side of the split, got {text}"
        )
    return value


def _seed(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**64 - 1], got {text}")
    return value


def _threads(text: str) -> int:
    value = _positive_int(text)
    cores = os.cpu_count() or 1
    if value > cores:  # more threads than cores only slow it down; torch crashes on absurd counts
        raise argparse.ArgumentTypeError(f"must be an int in [1, {cores}] (the CPU count), got {text}")
    return value


def _output_dir(text: str) -> str:
    from polyak.demo import OutputDirError, _check_output_dir

    try:
        _check_output_dir(text)
    except OutputDirError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# -- demo -------------------------------------------------------------------------------------------------
def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from polyak import demo  # the defaults live there; scikit-learn and matplotlib are imported on use

    p = subparsers.add_parser(
        "demo",
        help="train a CNN on scikit-learn's digits with an EMA of its weights",
        description=(
            "Train a small CNN on scikit-learn's bundled 8x8 digits with an ignite trainer and a "
            "polyak.EMAHandler (with a linear momentum warm-up), and track the post-hoc EMA profiles "
            "sigma_rel 0.05 and 0.10 (EDM2) with a polyak.posthoc.PostHocEMAHandler. After each epoch, "
            "evaluate the online and the EMA model on a held-out split. After training, synthesize the "
            "post-hoc EMA of each sigma_rel of a grid (0.02 to 0.25) from the snapshots and evaluate it on "
            "the same split. Print both tables and the best sigma_rel, and write into a new run directory a "
            "PNG of the curves, a PNG of the sweep, the snapshots and an ignite checkpoint (model, optimizer, "
            "trainer, EMA and post-hoc handlers)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=_positive_int, default=demo.DEFAULT_EPOCHS, help="training epochs")
    p.add_argument("--lr", type=_positive_float, default=demo.DEFAULT_LR, help="SGD learning rate")
    p.add_argument(
        "--sgd-momentum",
        type=_unit_right_open,
        default=demo.DEFAULT_SGD_MOMENTUM,
        help="SGD's heavy-ball momentum (not the EMA's)",
    )
    p.add_argument(
        "--momentum",
        type=_open_unit,
        default=demo.DEFAULT_EMA_MOMENTUM,
        help="EMA momentum after the warm-up: weight of the online model in each EMA update",
    )
    p.add_argument(
        "--momentum-warmup",
        type=_closed_unit,
        default=demo.DEFAULT_MOMENTUM_WARMUP,
        help="EMA momentum of the first update; it goes linearly to --momentum over --warmup-iters",
    )
    p.add_argument(
        "--warmup-iters",
        type=_positive_int,
        default=demo.DEFAULT_WARMUP_ITERS,
        help="length of the EMA momentum warm-up, in iterations",
    )
    p.add_argument("--batch-size", type=_positive_int, default=demo.DEFAULT_BATCH_SIZE, help="batch size")
    p.add_argument("--held-out", type=_held_out, default=demo.DEFAULT_HELD_OUT, help="fraction of the data held out")
    p.add_argument("--seed", type=_seed, default=demo.DEFAULT_SEED, help="seed of the init, split and shuffle")
    p.add_argument(
        "--output-dir",
        type=_output_dir,
        default=demo.DEFAULT_OUTPUT_DIR,
        help="directory in which a new timestamped run directory is created (with its parents if missing)",
    )
    p.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="torch intra-op threads (more only slow this small network down)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=_AUTO,
        help=f"show ignite's progress bar and a line per epoch on stderr; {_AUTO}: if stderr is a terminal",
    )
    p.add_argument(
        "--posthoc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="track the post-hoc EMA profiles and sweep sigma_rel after training (--no-posthoc skips both)",
    )
    p.add_argument(
        "--snapshot-every",
        type=_positive_int,
        default=demo.DEFAULT_SNAPSHOT_EVERY,
        help="iterations between two post-hoc EMA snapshots (and one at the end); 20 is two per epoch",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from polyak._extras import install_hint, missing

    absent = missing("ignite", "sklearn", "matplotlib", "tqdm")
    if absent:  # before anything runs or is written
        print(install_hint(absent, "polyak demo"), file=sys.stderr)
        return 2
    from polyak.demo import OutputDirError, run_demo

    try:
        result = _run(run_demo, args)
    except OutputDirError as e:  # checked at parse time; here if the folder changed since, or mkdir failed
        print(f"polyak demo: error: argument --output-dir: {e}", file=sys.stderr)
        return 2
    _report(result)
    return 0


def _run(run_demo: Callable[..., DemoResult], args: argparse.Namespace) -> DemoResult:
    return run_demo(
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        momentum_warmup=args.momentum_warmup,
        warmup_iters=args.warmup_iters,
        sgd_momentum=args.sgd_momentum,
        batch_size=args.batch_size,
        held_out=args.held_out,
        seed=args.seed,
        output_dir=args.output_dir,
        progress=sys.stderr.isatty() if args.progress == _AUTO else args.progress,
        num_threads=args.threads,
        posthoc=args.posthoc,
        snapshot_every=args.snapshot_every,
    )


def _report(result: DemoResult) -> None:
    from polyak.demo import format_sweep, format_table

    last = result.history[-1]
    print(format_table(result.history))
    print(
        f"\nafter {result.iterations} iterations ({result.seconds:.1f} s): held-out accuracy "
        f"EMA {100 * last.ema_accuracy:.2f}% vs online {100 * last.online_accuracy:.2f}%"
    )
    best = result.best
    if best is not None:
        tracked = " and ".join(f"{s:.2f}" for s in result.posthoc_sigma_rels)
        print(f"\npost-hoc EMA at iteration {result.iterations}, synthesized from the profiles sigma_rel {tracked}:")
        print(format_sweep(result.sweep, best=best, tracked=result.posthoc_sigma_rels))
        print(
            f"\nbest post-hoc EMA: sigma_rel={best.sigma_rel:g}, held-out accuracy {100 * best.accuracy:.2f}% "
            f"(loss {best.loss:.4f}); regular EMA {100 * last.ema_accuracy:.2f}% (loss {last.ema_loss:.4f})"
        )
        n_test = result.held_out_size
        print(
            f"note: sigma_rel is chosen on the held-out set that also scores it, so the best accuracy is "
            f"optimistic; one image of the {n_test} is {100 / n_test:.2f} points."
        )
        if best.sigma_rel in (result.sweep[0].sigma_rel, result.sweep[-1].sigma_rel):
            print("note: the best sigma_rel is at an end of the grid; the optimum may lie beyond it.")
    print(f"plot:          {result.plot_path}")
    if result.sweep_plot_path is not None:
        print(f"sweep plot:    {result.sweep_plot_path}")
        print(f"snapshots:     {result.posthoc_dir}")
    print(f"checkpoint:    {result.checkpoint_path}")
    print(f"run directory: {result.run_dir}")


def _add_posthoc(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from polyak import posthoc

    parser = subparsers.add_parser(
        "posthoc",
        help="synthesize the EMA of any sigma_rel from PostHocEMA snapshots (EDM2)",
        description=posthoc.CLI_DESCRIPTION,
    )
    posthoc.add_posthoc_arguments(parser)  # sets func


# -- entry point ------------------------------------------------------------------------------------------
_COMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_demo,
    _add_posthoc,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``polyak`` argument parser, with one sub-parser per command."""
    from polyak.posthoc._cli import OneLineErrors

    parser = OneLineErrors(prog="polyak", description="Exponential moving averages of PyTorch model weights.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineErrors)
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default); returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
