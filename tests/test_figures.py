"""The figures of BENCHMARKS.md are drawn from a results file by code: a small synthetic results file turns into
the SVG files the report names, with the labels of its numbers, and the report shows them by relative paths."""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from benchmarks import __main__ as bench
from benchmarks import figures

pytest.importorskip("matplotlib")

SVG = "{http://www.w3.org/2000/svg}svg"


def _timing(median_s: float) -> dict[str, Any]:
    return {
        "median_s": median_s,
        "p25_s": median_s * 0.9,
        "p75_s": median_s * 1.1,
        "min_s": median_s * 0.8,
        "mean_s": median_s,
        "samples": 7,
        "loops": 1,
        "warmup_calls": 3,
    }


def _row(shape: str, impl: str, label: str, median_s: float) -> dict[str, Any]:
    return {
        "shape": shape,
        "impl": impl,
        "label": label,
        "status": "ok",
        "timing": _timing(median_s),
        "warm": _timing(median_s / 2),
        "cold": True,
    }


def _mem(impl: str, dtype: str, held: float) -> dict[str, Any]:
    return {
        "impl": impl,
        "dtype": dtype,
        "status": "ok",
        "params": 1000,
        "held_bytes_per_param": held,
        "peak_bytes_per_param": held + 0.5,
    }


def _scale(impl: str, dtype: str, params: int, per_param_s: float) -> dict[str, Any]:
    return {
        "impl": impl,
        "dtype": dtype,
        "scale": params,
        "status": "ok",
        "params": params,
        "held_bytes_per_param": 4.0,
        "peak_bytes_per_param": 4.0,
        "median_s": per_param_s * params,
        "samples": 5,
    }


def synthetic_run() -> dict[str, Any]:
    """Two shapes, the floor and three implementations; a memory and a scaling section: small and made up."""
    shapes = [
        {
            "key": "tiny",
            "title": "a made-up tiny model",
            "tensors": 2,
            "numel": 3,
            "bytes": 12,
            "dtypes": ["float32"],
            "buffer_elements": 0,
        },
        {
            "key": "wide",
            "title": "a made-up wide model",
            "tensors": 4,
            "numel": 4096,
            "bytes": 16384,
            "dtypes": ["float32"],
            "buffer_elements": 0,
        },
    ]
    results = []
    for shape, floor in (("tiny", 1e-5), ("wide", 1e-4)):
        results += [
            _row(shape, "floor", "floor: a.lerp_(b, m), float32", floor),
            _row(shape, "polyak-ema", "polyak EMA (default)", floor * 1.5),
            _row(shape, "ignite-direct", "ignite EMAHandler (handler call)", floor * 4),
            _row(shape, "ema-pytorch", "ema-pytorch EMA (foreach)", floor * 3),
        ]
    return {
        "environment": {
            "date_utc": "2026-01-02 03:04 UTC",
            "cpu_model": "Synthetic CPU 9000",
            "cpu_count": 2,
            "cpu_capability": "AVX2",
            "torch_threads": 2,
            "python": "3.11.0",
            "platform": "test",
            "versions": {
                "torch": "9.9.9",
                "pytorch-ignite": "0.5.5",
                "polyak": "0.2.0",
                "ema-pytorch": None,
                "torch-ema": None,
            },
        },
        "config": {
            "quick": True,
            "momentum": 0.001,
            "budget_s": 0.1,
            "warmup_s": 0.05,
            "min_warmup_calls": 2,
            "min_samples": 3,
            "min_sample_s": 5e-5,
            "threads": 2,
            "wait_quiet_s": 0.0,
            "cold": True,
            "elapsed_s": 1.0,
        },
        "shapes": shapes,
        "results": results,
        "best_alternative": {"tiny": "ema-pytorch", "wide": "ema-pytorch"},
        "targets": [],
        "iteration": None,
        "memory": [
            _mem("polyak-ema", "float32", 4.0),
            _mem("ema-pytorch", "float32", 4.1),
            _mem("polyak-ema", "bfloat16", 6.2),
            _mem("ema-pytorch", "bfloat16", 2.0),
        ],
        "scaling": [
            _scale(impl, dtype, n, s * 1e-9)
            for impl, s in (("floor", 0.3), ("polyak-ema", 0.4))
            for dtype in ("float32", "bfloat16")
            for n in (10**6, 10**7, 10**8)
        ],
    }


def _svg_text(path: Path) -> str:
    root = ET.parse(path).getroot()  # well-formed XML ...
    assert root.tag == SVG  # ... whose root is an SVG element
    return " ".join("".join(e.itertext()) for e in root.iter() if e.tag.endswith("text"))


def test_the_drawing_code_turns_a_results_file_into_the_files_it_names(tmp_path: Path) -> None:
    drawn = figures.draw(synthetic_run(), tmp_path / "figures")
    assert list(drawn) == ["update-vs-floor", "memory", "scaling"]  # the order of BENCHMARKS.md's sections
    for kind, fig in drawn.items():
        assert fig.path == tmp_path / "figures" / f"{kind}.svg" and fig.path.is_file()
    expected = {
        "update-vs-floor": ["tiny", "wide", "polyak EMA (default)", "ema-pytorch EMA (foreach)", "float32 floor"],
        "memory": ["polyak EMA (default)", "ema-pytorch EMA (foreach)", "float32 model: held", "bfloat16 model"],
        "scaling": ["polyak EMA (default), float32 model", "float32 floor", "parameters (log)", "per parameter"],
    }
    for kind, labels in expected.items():
        text = _svg_text(drawn[kind].path)
        for label in labels:
            assert label in text, (kind, label)
        assert "Synthetic CPU 9000" in drawn[kind].caption and "torch 9.9.9" in drawn[kind].caption


def test_a_redraw_of_the_same_results_writes_the_same_bytes(tmp_path: Path) -> None:
    first = {k: f.path.read_bytes() for k, f in figures.draw(synthetic_run(), tmp_path / "a").items()}
    second = {k: f.path.read_bytes() for k, f in figures.draw(synthetic_run(), tmp_path / "b").items()}
    assert first == second


def test_a_section_the_run_skipped_draws_no_figure(tmp_path: Path) -> None:
    run = synthetic_run()
    run["memory"] = run["scaling"] = None
    assert list(figures.draw(run, tmp_path)) == ["update-vs-floor"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["update-vs-floor.svg"]


def test_the_bench_draws_the_figures_and_the_report_shows_them(tmp_path: Path, capsys) -> None:
    results, report = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    results.write_text(json.dumps(synthetic_run()))
    assert bench.main(["--render-only", "--json", str(results), "--markdown", str(report)]) == 0
    text = report.read_text()
    images = re.findall(r"^!\[[^\]]+\]\(([^)]+)\)$", text, flags=re.M)
    assert images == ["docs/figures/update-vs-floor.svg", "docs/figures/memory.svg", "docs/figures/scaling.svg"]
    for link in images:
        assert (tmp_path / link).is_file()  # relative to the report, as on the repository page
    for number in (1, 2, 3):
        assert f"*Figure {number}.*" in text
    out = capsys.readouterr().out
    assert "docs/figures/scaling.svg" in out and "BENCHMARKS.md" in out  # it says what it wrote where


def test_the_repository_figures_are_those_of_the_results_on_record(tmp_path: Path) -> None:
    """BENCHMARKS.md's figures are drawn from benchmarks/results.json, not by hand (or from another run): byte for
    byte with the matplotlib that drew them, their text (labels, ticks, titles) with another."""
    import matplotlib

    root = Path(bench.__file__).resolve().parents[1]
    run = json.loads((root / "benchmarks" / "results.json").read_text())
    drawn = figures.draw(copy.deepcopy(run), tmp_path)
    assert list(drawn) == ["update-vs-floor", "memory", "scaling"]
    for kind, fig in drawn.items():
        on_record = root / "docs" / "figures" / f"{kind}.svg"
        if f"Matplotlib v{matplotlib.__version__}," in on_record.read_text():
            assert fig.path.read_bytes() == on_record.read_bytes(), kind
        else:
            assert _svg_text(fig.path) == _svg_text(on_record), kind
        assert f"]({Path('docs/figures') / fig.path.name})" in (root / "BENCHMARKS.md").read_text()


def test_the_bench_progress_bar_is_on_stderr_and_its_lines_on_stdout(capsys) -> None:
    pytest.importorskip("tqdm")
    with bench.progress(2, enabled=True) as bar:
        bar.set_description("tiny")
        print("a line of the run")
        bar.update()
    out, err = capsys.readouterr()
    assert out == "a line of the run\n" and "tiny" in err
    with bench.progress(2, enabled=False) as bar:  # not a terminal: no bar, nothing on stderr
        bar.set_description("tiny")
        bar.update()
    assert capsys.readouterr().err == ""
