"""The benchmark harness runs (a smoke run of `make bench`'s code), and the memory it reports is what the EMA
must hold: measured from resident memory in a fresh process, as BENCHMARKS.md's table is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import __main__ as bench
from benchmarks import memory


def test_a_quick_run_writes_cold_and_warm_timings(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    argv = ["--quick", "--budget", "0.05", "--shapes", "linear", "--impls", "floor,polyak-ema,polyak-posthoc"]
    argv += ["--no-iteration", "--no-memory", "--no-scaling", "--json", str(out_json), "--markdown", str(out_md)]
    assert bench.main(argv) == 0
    run = json.loads(out_json.read_text())
    rows = {r["impl"]: r for r in run["results"]}
    assert run["config"]["cold"] and all(r["status"] == "ok" and r["cold"] for r in rows.values())
    assert rows["polyak-ema"]["warm"]["median_s"] > 0 and rows["polyak-ema"]["timing"]["samples"] >= 3
    text = out_md.read_text()
    assert "warm median" in text and "Cold, as the headline" in text


@pytest.mark.parametrize("impl, low, high", [("polyak-ema", 6.3, 6.9), ("polyak-split", 4.9, 5.5)])
def test_the_memory_table_measures_what_a_bf16_ema_holds(impl: str, low: float, high: float) -> None:
    """bf16, 8M parameters: master 4 + EMA 2 + 4 MiB of scratch (0.52 per parameter here); split: 2 + 2 +
    8 MiB (1.05 here). What the process pays once (threads, kernels: a few MiB, 0.4-1.4 per parameter here
    and more in CI) is paid on a tiny model before the measurement starts."""
    row = memory._run_child(impl, "bfloat16", 8_000_000, timeout=300)
    assert row["status"] == "ok", row
    assert low <= row["held_bytes_per_param"] <= high, row
    assert row["peak_bytes_per_param"] <= high, row
