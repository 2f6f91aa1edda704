"""The demo (``python -m polyak demo``): short runs, checked end to end."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from polyak import EMAHandler
from polyak.__main__ import main
from polyak.demo import (
    DEFAULT_SWEEP,
    DemoResult,
    EpochRecord,
    SweepPoint,
    _load_digits,
    format_sweep,
    format_table,
    make_model,
    run_demo,
)
from polyak.posthoc import list_snapshots, snapshot_name, synthesize

N_DIGITS = 1797
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SNAPSHOT_EVERY = 30  # in the shared run: snapshots at 30 and 60, and one more at the end (80)


def _iterations(epochs: int, batch_size: int = 32, held_out: float = 0.3) -> int:
    n_train = N_DIGITS - round(held_out * N_DIGITS)
    return epochs * math.ceil(n_train / batch_size)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, Path, int]:
    """One 2-epoch run shared by the tests that only read its results: (result, output dir, threads before)."""
    out = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    # A warm-up shorter than the run, so the checkpoint is taken after it ended; snapshots that do not divide the
    # run, so the last iteration gets an extra one.
    result = run_demo(epochs=2, warmup_iters=50, snapshot_every=SNAPSHOT_EVERY, progress=False, output_dir=out)
    return result, out, threads


def _held_out() -> tuple[torch.Tensor, torch.Tensor]:
    _, test_set = _load_digits(0.3, torch.Generator().manual_seed(0))  # the split of seed 0
    return test_set.tensors


def _accuracy(weights: dict[str, torch.Tensor]) -> float:
    x, y = _held_out()
    model = make_model()
    model.load_state_dict(weights)
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def test_run_dir_holds_plot_and_checkpoint(two_epochs: tuple[DemoResult, Path, int]) -> None:
    result, out, _ = two_epochs
    assert result.run_dir.is_dir()
    assert result.run_dir.parent == out
    assert result.plot_path.parent == result.run_dir
    assert result.plot_path.suffix == ".png"
    assert result.plot_path.read_bytes()[:8] == PNG_MAGIC
    assert result.checkpoint_path.parent == result.run_dir
    assert result.checkpoint_path.is_file()
    assert result.sweep_plot_path is not None
    assert result.sweep_plot_path.parent == result.run_dir
    assert result.sweep_plot_path.suffix == ".png"
    assert result.sweep_plot_path.read_bytes()[:8] == PNG_MAGIC
    assert result.posthoc_dir == result.run_dir / "posthoc"
    assert sorted(p.name for p in result.run_dir.iterdir()) == sorted(
        [result.plot_path.name, result.sweep_plot_path.name, result.checkpoint_path.name, "posthoc"]
    )


def test_posthoc_folder_holds_the_snapshots(two_epochs: tuple[DemoResult, Path, int]) -> None:
    result, _, _ = two_epochs
    assert result.posthoc_dir is not None and result.posthoc_dir.is_dir()
    assert result.posthoc_sigma_rels == (0.05, 0.10)
    assert result.held_out_size == round(0.3 * N_DIGITS) == 539
    times = [SNAPSHOT_EVERY, 2 * SNAPSHOT_EVERY, result.iterations]  # 30, 60 and the end, 80
    assert times[-1] == _iterations(2) == 80
    expected = {snapshot_name(s, t) for s in (0.05, 0.10) for t in times}
    assert {p.name for p in result.posthoc_dir.iterdir()} == expected  # 6 files, nothing else
    snapshots = list_snapshots(result.posthoc_dir)
    assert sorted({s.t for s in snapshots}) == times
    assert sorted({s.sigma_rel for s in snapshots}) == [0.05, 0.10]


def test_checkpoint_loads_weights_only_with_the_ema_state(two_epochs: tuple[DemoResult, Path, int]) -> None:
    result, _, _ = two_epochs
    assert result.iterations == _iterations(2)
    ckpt = torch.load(result.checkpoint_path, weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "trainer", "ema", "posthoc"}
    assert ckpt["ema"]["num_updates"] == result.iterations
    assert ckpt["posthoc"]["sigma_rels"] == [0.05, 0.10]
    assert [e["num_updates"] for e in ckpt["posthoc"]["emas"]] == [result.iterations] * 2
    assert ckpt["trainer"]["iteration"] == result.iterations
    assert ckpt["trainer"]["max_epochs"] == 2
    ema_weights, online_weights = ckpt["ema"]["ema_model"], ckpt["model"]
    assert set(ema_weights) == set(online_weights)
    # the EMA is an average of the online weights, not a copy of them
    assert any(not torch.equal(ema_weights[k], online_weights[k]) for k in online_weights)

    # A fresh handler resumes from it: the update count, and so the warm-up, continues where it stopped.
    handler = EMAHandler(make_model(), momentum=0.02, momentum_warmup=0.5, warmup_iters=50)
    handler.load_state_dict(ckpt["ema"])
    assert handler.ema.num_updates == result.iterations
    assert handler.ema.momentum_at(handler.ema.num_updates + 1) == pytest.approx(0.02)


def test_checkpointed_models_score_as_recorded(two_epochs: tuple[DemoResult, Path, int]) -> None:
    """The last epoch's accuracies are those of the checkpointed online and EMA weights on the held-out set."""
    result, _, _ = two_epochs
    ckpt = torch.load(result.checkpoint_path, weights_only=True)
    last = result.history[-1]
    for weights, recorded in [(ckpt["model"], last.online_accuracy), (ckpt["ema"]["ema_model"], last.ema_accuracy)]:
        assert _accuracy(weights) == pytest.approx(recorded, abs=1e-6)


def test_sweep(two_epochs: tuple[DemoResult, Path, int]) -> None:
    result, _, _ = two_epochs
    assert [p.sigma_rel for p in result.sweep] == list(DEFAULT_SWEEP)
    assert all(0.0 < s < 12**-0.5 for s in DEFAULT_SWEEP)
    assert {0.05, 0.10} <= set(DEFAULT_SWEEP)
    for p in result.sweep:
        assert isinstance(p, SweepPoint)
        assert 0.0 <= p.accuracy <= 1.0
        assert 0.0 < p.loss < math.inf
    assert max(p.accuracy for p in result.sweep) > 0.5
    best = result.best
    assert best is not None and best in result.sweep and best.sigma_rel in DEFAULT_SWEEP
    # the highest accuracy, and among equal accuracies the lowest loss
    assert best.accuracy == max(p.accuracy for p in result.sweep)
    assert best.loss == min(p.loss for p in result.sweep if p.accuracy == best.accuracy)


def test_sweep_scores_the_synthesized_models(two_epochs: tuple[DemoResult, Path, int]) -> None:
    """Each point is the held-out accuracy of synthesize(sigma_rel) at the end; at a tracked width, of that EMA."""
    result, _, _ = two_epochs
    assert result.posthoc_dir is not None
    by_sigma = {p.sigma_rel: p for p in result.sweep}
    for sigma_rel in (0.02, 0.15, 0.25):
        state = synthesize(result.posthoc_dir, sigma_rel)
        assert _accuracy(state) == pytest.approx(by_sigma[sigma_rel].accuracy, abs=1e-6)
    ckpt = torch.load(result.checkpoint_path, weights_only=True)  # taken at the last iteration, like the sweep
    for sigma_rel, ema_state in zip((0.05, 0.10), ckpt["posthoc"]["emas"], strict=True):
        assert _accuracy(ema_state["ema_model"]) == pytest.approx(by_sigma[sigma_rel].accuracy, abs=1e-6)


def test_history(two_epochs: tuple[DemoResult, Path, int]) -> None:
    result, _, _ = two_epochs
    assert [r.epoch for r in result.history] == [1, 2]
    for r in result.history:
        assert isinstance(r, EpochRecord)
        assert 0.0 <= r.online_accuracy <= 1.0
        assert 0.0 <= r.ema_accuracy <= 1.0
        assert 0.0 < r.online_loss < math.inf
        assert 0.0 < r.ema_loss < math.inf
    # two epochs are enough to learn the digits far beyond chance (10%), for both models
    assert result.history[-1].online_accuracy > 0.5
    assert result.history[-1].ema_accuracy > 0.5


def test_thread_count_is_restored(two_epochs: tuple[DemoResult, Path, int]) -> None:
    _, _, threads_before = two_epochs
    assert torch.get_num_threads() == threads_before


def test_same_seed_same_run(tmp_path: Path) -> None:
    sweep = (0.05, 0.12, 0.2)  # a short grid: three runs
    a = run_demo(epochs=1, seed=3, progress=False, output_dir=tmp_path, sweep=sweep)
    b = run_demo(epochs=1, seed=3, progress=False, output_dir=tmp_path, sweep=sweep)
    c = run_demo(epochs=1, seed=4, progress=False, output_dir=tmp_path, sweep=sweep)
    assert a.history == b.history
    assert a.history != c.history
    assert a.sweep == b.sweep
    assert a.sweep != c.sweep
    assert len({a.run_dir, b.run_dir, c.run_dir}) == 3  # a new run directory each time, even within a second
    assert torch.equal(
        torch.load(a.checkpoint_path, weights_only=True)["ema"]["ema_model"]["0.weight"],
        torch.load(b.checkpoint_path, weights_only=True)["ema"]["ema_model"]["0.weight"],
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"epochs": 1.5},
        {"batch_size": 0},
        {"lr": 0.0},
        {"held_out": 1.0},
        {"num_threads": 0},
        {"snapshot_every": 0},
        {"sweep": []},
        {"sweep": [0.1, 0.3]},  # 0.3 > 1/sqrt(12)
        {"momentum": 1.5},  # checked by the EMAHandler, before the run directory is made
    ],
)
def test_run_demo_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        run_demo(progress=False, output_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_format_table() -> None:
    table = format_table([EpochRecord(1, 0.5, 0.75, 1.25, 0.5), EpochRecord(2, 0.9, 0.95, 0.3, 0.2)])
    lines = table.splitlines()
    assert lines[0].split() == ["epoch", "online", "acc", "EMA", "acc", "online", "loss", "EMA", "loss"]
    assert lines[1].split() == ["1", "50.00%", "75.00%", "1.2500", "0.5000"]
    assert lines[2].split() == ["2", "90.00%", "95.00%", "0.3000", "0.2000"]


def test_format_sweep() -> None:
    sweep = [SweepPoint(0.05, 0.5, 1.25), SweepPoint(0.1, 0.9, 0.3), SweepPoint(0.15, 0.9, 0.2)]
    lines = format_sweep(sweep, best=sweep[2], tracked=(0.05, 0.10)).splitlines()
    assert lines[0].split() == ["sigma_rel", "held-out", "acc", "held-out", "loss"]
    assert lines[1].split() == ["0.050", "50.00%", "1.2500", "<-", "tracked"]
    assert lines[2].split() == ["0.100", "90.00%", "0.3000", "<-", "tracked"]
    assert lines[3].split() == ["0.150", "90.00%", "0.2000", "<-", "best"]
    assert format_sweep(sweep).splitlines()[1].split() == ["0.050", "50.00%", "1.2500"]


def test_main_demo_prints_table_and_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--epochs", "1", "--output-dir", str(tmp_path), "--progress", "--snapshot-every", "25"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["epoch", "online", "acc", "EMA", "acc", "online", "loss", "EMA", "loss"]
    row = lines[1].split()
    assert row[0] == "1"
    assert all(0.0 <= float(cell.rstrip("%")) <= 100.0 for cell in row[1:3])
    assert lines[-1].startswith("run directory: ")
    run_dir = Path(lines[-1].removeprefix("run directory: "))
    assert run_dir.parent == tmp_path
    assert (run_dir / "curves.png").is_file()
    (ckpt,) = run_dir.glob("*.pt")
    assert torch.load(ckpt, weights_only=True)["ema"]["num_updates"] == _iterations(1)
    # the progress bar and the per-epoch line go to stderr, not into the table
    assert "epoch   1: accuracy online" in captured.err
    assert "accuracy online" not in captured.out
    # the sweep: its table, its best sigma_rel (one of the grid), its plot and the snapshots (at 25 and the end)
    assert "sigma_rel  held-out acc  held-out loss" in lines
    (best,) = [line for line in lines if line.startswith("best post-hoc EMA: sigma_rel=")]
    assert float(best.removeprefix("best post-hoc EMA: sigma_rel=").split(",")[0]) in DEFAULT_SWEEP
    assert any(line.startswith("note: sigma_rel is chosen on the held-out set") for line in lines)
    assert (run_dir / "posthoc_sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert len(list((run_dir / "posthoc").glob("*.safetensors"))) == 2 * 2
    assert sorted({s.t for s in list_snapshots(run_dir / "posthoc")}) == [25, _iterations(1)]


def test_main_demo_no_posthoc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "1", "--output-dir", str(tmp_path), "--no-progress", "--no-posthoc"]) == 0
    out = capsys.readouterr().out
    assert "post-hoc" not in out and "sweep plot" not in out
    run_dir = Path(out.splitlines()[-1].removeprefix("run directory: "))
    (ckpt,) = run_dir.glob("*.pt")
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(["curves.png", ckpt.name])
    assert set(torch.load(ckpt, weights_only=True)) == {"model", "optimizer", "trainer", "ema"}


def test_main_demo_notes_a_best_at_the_end_of_the_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import polyak.demo

    # a grid of two values: its best is at one of its ends
    monkeypatch.setattr(polyak.demo, "run_demo", functools.partial(run_demo, sweep=(0.05, 0.10)))
    assert main(["demo", "--epochs", "1", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "note: the best sigma_rel is at an end of the grid; the optimum may lie beyond it." in lines
    assert sum(line.endswith("tracked") for line in lines) == 2  # "<- tracked" or "<- best, tracked"


def test_run_demo_without_posthoc(tmp_path: Path) -> None:
    result = run_demo(epochs=1, progress=False, posthoc=False, output_dir=tmp_path)
    assert result.sweep == [] and result.best is None
    assert result.posthoc_dir is None and result.sweep_plot_path is None and result.posthoc_sigma_rels == ()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["demo", "--momentum", "1.5"],
        ["demo", "--epochs", "0"],
        ["demo", "--lr", "abc"],
        ["demo", "--snapshot-every", "0"],
        ["nope"],
    ],
)
def test_main_rejects_bad_command_lines(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv + ["--output-dir", str(tmp_path)] if argv and argv[0] == "demo" else argv)
    assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []
