"""The demo (``python -m polyak demo``): short runs, checked end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from polyak import EMAHandler
from polyak.__main__ import main
from polyak.demo import (
    DemoResult,
    EpochRecord,
    _load_digits,
    format_table,
    make_model,
    run_demo,
)

N_DIGITS = 1797
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _iterations(epochs: int, batch_size: int = 32, held_out: float = 0.3) -> int:
    n_train = N_DIGITS - round(held_out * N_DIGITS)
    return epochs * math.ceil(n_train / batch_size)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, Path, int]:
    """One 2-epoch run shared by the tests that only read its results: (result, output dir, threads before)."""
    out = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    # a warm-up shorter than the run, so the checkpoint is taken after it ended
    return run_demo(epochs=2, warmup_iters=50, progress=False, output_dir=out), out, threads


def test_run_dir_holds_plot_and_checkpoint(two_epochs: tuple[DemoResult, Path, int]) -> None:
    result, out, _ = two_epochs
    assert result.run_dir.is_dir()
    assert result.run_dir.parent == out
    assert result.plot_path.parent == result.run_dir
    assert result.plot_path.suffix == ".png"
    assert result.plot_path.read_bytes()[:8] == PNG_MAGIC
    assert result.checkpoint_path.parent == result.run_dir
    assert result.checkpoint_path.is_file()
    assert sorted(p.name for p in result.run_dir.iterdir()) == sorted(
        [result.plot_path.name, result.checkpoint_path.name]
    )


def test_checkpoint_loads_weights_only_with_the_ema_state(two_epochs: tuple[DemoResult, Path, int]) -> None:
    result, _, _ = two_epochs
    assert result.iterations == _iterations(2)
    ckpt = torch.load(result.checkpoint_path, weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "trainer", "ema"}
    assert ckpt["ema"]["num_updates"] == result.iterations
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
    _, test_set = _load_digits(0.3, torch.Generator().manual_seed(0))  # the split of seed 0
    x, y = test_set.tensors
    last = result.history[-1]
    for weights, recorded in [(ckpt["model"], last.online_accuracy), (ckpt["ema"]["ema_model"], last.ema_accuracy)]:
        model = make_model()
        model.load_state_dict(weights)
        with torch.no_grad():
            accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
        assert accuracy == pytest.approx(recorded, abs=1e-6)


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
    a = run_demo(epochs=1, seed=3, progress=False, output_dir=tmp_path)
    b = run_demo(epochs=1, seed=3, progress=False, output_dir=tmp_path)
    c = run_demo(epochs=1, seed=4, progress=False, output_dir=tmp_path)
    assert a.history == b.history
    assert a.history != c.history
    assert len({a.run_dir, b.run_dir, c.run_dir}) == 3  # a new run directory each time, even within a second
    assert torch.equal(
        torch.load(a.checkpoint_path, weights_only=True)["ema"]["ema_model"]["0.weight"],
        torch.load(b.checkpoint_path, weights_only=True)["ema"]["ema_model"]["0.weight"],
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"epochs": 0}, {"epochs": 1.5}, {"batch_size": 0}, {"lr": 0.0}, {"held_out": 1.0}, {"num_threads": 0}],
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


def test_main_demo_prints_table_and_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "1", "--output-dir", str(tmp_path), "--progress"]) == 0
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


@pytest.mark.parametrize(
    "argv",
    [[], ["demo", "--momentum", "1.5"], ["demo", "--epochs", "0"], ["demo", "--lr", "abc"], ["nope"]],
)
def test_main_rejects_bad_command_lines(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv + ["--output-dir", str(tmp_path)] if argv and argv[0] == "demo" else argv)
    assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []
