"""The figures of ``BENCHMARKS.md``, drawn from a run's results (``benchmarks/results.json``) as SVG files.

Every number drawn is one of the run's: :func:`draw` reads the same dictionary that
:func:`benchmarks.report.write_markdown` turns into tables, and ``make bench`` calls it at the end of each run
(``python -m benchmarks --render-only`` redraws them from a results file). matplotlib is the ``demo`` extra's;
without it no figure is drawn and the report has its tables alone.

- ``update-vs-floor.svg``: the time of one update over the float32 floor, a group of bars per shape, a bar per
  implementation, the floor marked;
- ``scaling.svg``: polyak's update and the floor, time per parameter against model size (log x);
- ``memory.svg``: bytes per parameter held beyond the model, per implementation, float32 and bfloat16 models.

The files are reproducible: text is kept as text (``svg.fonttype: none``, so the labels can be searched), with
no date and a fixed hash salt, so that a redraw of the same results writes the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.impls import FLOOR, FLOOR_NATIVE, IMPLS

ROOT = Path(__file__).resolve().parent.parent
FIGURES_DIR = ROOT / "docs" / "figures"

UPDATE, SCALING, MEMORY = "update-vs-floor", "scaling", "memory"
_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "polyak-benchmarks",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_POLYAK_COLORS = "Blues"
_OTHER_COLORS = "Oranges"


@dataclass(frozen=True)
class Figure:
    """A drawn figure: its file, the alternative text of its image and its caption (Markdown)."""

    kind: str
    path: Path
    alt: str
    caption: str

    def markdown(self, relative_to: Path, number: int) -> list[str]:
        """The image and its caption, the image's path relative to the folder of the Markdown file."""
        link = Path(os.path.relpath(self.path, relative_to)).as_posix()
        return [f"![{self.alt}]({link})", "", f"*Figure {number}.* {self.caption}"]


def available() -> bool:
    """Whether matplotlib can be imported here (the ``demo`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def machine(run: dict[str, Any]) -> str:
    """Where the run was taken, from its environment block: CPU, cores, torch and its threads, the date."""
    env = run.get("environment", {})
    torch_version = env.get("versions", {}).get("torch")
    return (
        f"{env.get('cpu_model', 'unknown CPU')} ({env.get('cpu_count', '?')} cores visible), no GPU; "
        f"torch {torch_version} on {env.get('torch_threads', '?')} threads; {env.get('date_utc', 'undated')}"
    )


def _label(impl: str, fallback: str | None = None) -> str:
    return IMPLS[impl].label if impl in IMPLS else (fallback or impl)


def _is_polyak(impl: str) -> bool:
    return impl.startswith("polyak") or _label(impl).startswith(("polyak", "two polyak"))


def _ordered(impls: Iterable[str]) -> list[str]:
    """polyak's rows first, then the other libraries', each in the order of the run."""
    unique = list(dict.fromkeys(impls))
    return [i for i in unique if _is_polyak(i)] + [i for i in unique if not _is_polyak(i)]


def _colors(impls: list[str]) -> dict[str, Any]:
    """Shades of blue for polyak's rows, of orange for the others', dark to light in order."""
    from matplotlib import colormaps

    out: dict[str, Any] = {}
    for group, cmap in ((True, _POLYAK_COLORS), (False, _OTHER_COLORS)):
        keys = [i for i in impls if _is_polyak(i) == group]
        for n, key in enumerate(keys):
            out[key] = colormaps[cmap](0.9 - 0.6 * n / max(1, len(keys) - 1))
    return out


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")


# -- the figures -------------------------------------------------------------------------------------------------
def _update_figure(run: dict[str, Any], path: Path) -> Figure | None:
    from matplotlib.figure import Figure as MplFigure

    ok = [r for r in run.get("results", []) if r.get("status") == "ok"]
    floors = {r["shape"]: r["timing"]["median_s"] for r in ok if r["impl"] == FLOOR}
    ratios: dict[tuple[str, str], float] = {}
    labels: dict[str, str] = {}
    for r in ok:
        if r["impl"] in (FLOOR, FLOOR_NATIVE) or (r["impl"] in IMPLS and IMPLS[r["impl"]].part):
            continue
        if floors.get(r["shape"]):
            ratios[(r["shape"], r["impl"])] = r["timing"]["median_s"] / floors[r["shape"]]
            labels.setdefault(r["impl"], _label(r["impl"], r.get("label")))
    if not ratios:
        return None
    shapes = [s["key"] for s in run.get("shapes", []) if s["key"] in floors] or list(floors)
    impls = _ordered(i for (_, i) in ratios)
    colors = _colors(impls)
    cold = run.get("config", {}).get("cold", False)

    fig = MplFigure(figsize=(max(8.0, 1.9 * len(shapes) + 2), 6.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.86 / len(impls)
    for n, impl in enumerate(impls):
        xs = [s + (n - (len(impls) - 1) / 2) * width for s, shape in enumerate(shapes) if (shape, impl) in ratios]
        ys = [ratios[(shape, impl)] for shape in shapes if (shape, impl) in ratios]
        ax.bar(xs, ys, width, color=colors[impl], label=labels[impl], hatch=None if _is_polyak(impl) else "//")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1.2, label="the float32 floor: one lerp_ (1x)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_xlabel("model shape")
    ax.set_ylabel(f"{'cold' if cold else 'warm'} median time per update / float32 floor (log)")
    ax.set_title("One EMA update over the float32 floor (lower is better)")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=3, frameon=False, fontsize=8)
    _save(fig, path)
    caption = (
        f"The {'cold' if cold else 'warm'} median time of one EMA update over the float32 floor (one `lerp_` "
        "over as many elements as the model's floating tensors: the dashed line at 1x), for each model shape "
        "(a group of bars) and each implementation (a bar: polyak's modes in blue, the other libraries' hatched "
        f"in orange), log scale, lower is better; the numbers of the results table below. Measured on {machine(run)}."
    )
    return Figure(UPDATE, path, "Time of one EMA update over the float32 floor, per shape and implementation", caption)


def _scaling_figure(run: dict[str, Any], path: Path) -> Figure | None:
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.ticker import LogLocator

    ok = [r for r in run.get("scaling") or [] if r.get("status") == "ok" and r.get("params")]
    if not ok:
        return None
    fig = MplFigure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    impls = _ordered(r["impl"] for r in ok)
    colors = {**_colors([i for i in impls if i != FLOOR]), FLOOR: "black"}
    for impl in impls:
        for dtype, style in (("float32", "-"), ("bfloat16", "--")):
            pts = sorted(
                (r["params"], r["median_s"] / r["params"] * 1e9) for r in ok if (r["impl"], r["dtype"]) == (impl, dtype)
            )
            if not pts:
                continue
            name = f"the float32 floor, beside the {dtype} model" if impl == FLOOR else f"{_label(impl)}, {dtype} model"
            ax.plot(*zip(*pts, strict=True), style, marker="o", color=colors[impl], label=name)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("parameters (log)")
    ax.set_ylabel("cold median time per parameter (ns)")
    ax.set_title("Scaling: time per parameter of one update, 1M to 1B parameters")
    ax.grid(which="both", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)
    caption = (
        "Time per parameter of one update (the median of cold updates, caches evicted before each, over the "
        "number of parameters) against the model's size, log x: polyak's default update (`EMA(model).update()`, a "
        "float32 master for the bfloat16 model) and the float32 floor of the same size, each size in a fresh "
        "process; a flat line is linear growth. The numbers of the scaling table below. "
        f"Measured on {machine(run)}."
    )
    return Figure(SCALING, path, "Time per parameter of one update against model size", caption)


def _memory_figure(run: dict[str, Any], path: Path) -> Figure | None:
    from matplotlib.figure import Figure as MplFigure

    ok = [r for r in run.get("memory") or [] if r.get("status") == "ok"]
    if not ok:
        return None
    impls = _ordered(r["impl"] for r in ok)
    by = {(r["impl"], r["dtype"]): r for r in ok}
    dtypes = [d for d in ("float32", "bfloat16") if any(r["dtype"] == d for r in ok)]
    fig = MplFigure(figsize=(7.5, 0.2 * len(impls) * len(dtypes) + 2.2), layout="constrained")
    ax = fig.add_subplot()
    height = 0.8 / len(dtypes)
    shades = {"float32": "tab:blue", "bfloat16": "tab:green"}
    for n, dtype in enumerate(dtypes):
        ys = [y + (n - (len(dtypes) - 1) / 2) * height for y, i in enumerate(impls) if (i, dtype) in by]
        rows = [by[(i, dtype)] for i in impls if (i, dtype) in by]
        ax.barh(
            ys, [r["held_bytes_per_param"] for r in rows], height, color=shades[dtype], label=f"{dtype} model: held"
        )
        ax.plot(
            [r["peak_bytes_per_param"] for r in rows],
            ys,
            "|",
            color="black",
            markersize=7,
            label="peak (construction and updates)" if n == 0 else None,
        )
    for copy, dtype in ((4, "float32"), (2, "bfloat16")):
        if dtype in dtypes:
            label = f"the least, a {dtype} copy: {copy} bytes"
            ax.axvline(copy, color=shades[dtype], linestyle=":", linewidth=1.2, label=label)
    ax.set_yticks(range(len(impls)), [_label(i) for i in impls])
    ax.invert_yaxis()
    ax.set_xlabel("bytes per parameter held beyond the model")
    ax.set_title("Memory: bytes per parameter beyond the model (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, frameon=False, fontsize=8)
    _save(fig, path)
    params = ok[0].get("params", 0)
    caption = (
        "Bytes per parameter that each implementation holds beyond the model after two updates (bars: a float32 "
        "and a bfloat16 model) and at its peak (ticks), each in a fresh process around a model of Linear layers "
        f"with {params:,} parameters; the dotted lines are the least an EMA holds, its copy (4 bytes per parameter "
        f"in float32, 2 in bfloat16). The numbers of the memory table below. Measured on {machine(run)}."
    )
    return Figure(MEMORY, path, "Bytes per parameter held beyond the model, per implementation", caption)


_DRAWERS = {UPDATE: _update_figure, MEMORY: _memory_figure, SCALING: _scaling_figure}  # as BENCHMARKS.md


def draw(run: dict[str, Any], out_dir: Path = FIGURES_DIR) -> dict[str, Figure]:
    """Draw the figures that ``run`` has numbers for into ``out_dir`` (``<kind>.svg``), by kind.

    A section the run skipped (``--no-memory``, ``--no-scaling``) draws nothing; without matplotlib nothing is
    drawn. Returns the figures written, keyed by kind (``update-vs-floor``, ``memory``, ``scaling``), in the order
    of the report's sections.
    """
    if not available():
        return {}
    from matplotlib import rc_context

    out: dict[str, Figure] = {}
    with rc_context(_RC):
        for kind, drawer in _DRAWERS.items():
            fig = drawer(run, Path(out_dir) / f"{kind}.svg")
            if fig is not None:
                out[kind] = fig
    return out
