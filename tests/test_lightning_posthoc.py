"""polyak.lightning.PostHocEMACallback over its lifetime, with a real ``lightning.Trainer`` on the CPU: reused for
a second fit (of the same module, of another), the folder's lock given back when fit ends or raises, and the
warnings of a resumed run pointing at the user's line."""

from __future__ import annotations

import errno
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from polyak.lightning import PostHocEMACallback
from polyak.posthoc import FolderInUse, PostHocEMA, list_snapshots
from polyak.posthoc._lock import claim


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(L.LightningModule):
    def __init__(self, fail_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.fail_at_step = fail_at_step

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step >= self.fail_at_step:
            raise RuntimeError("training failed on purpose")
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), batch_size=4)


def trainer(callbacks, max_steps: int = 6, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def callback(directory: Path, **kwargs) -> PostHocEMACallback:
    return PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_every=4, directory=str(directory), **kwargs)


def assert_free(directory: Path) -> None:
    """No PostHocEMA holds ``directory``: another claimer gets it (while held: FolderInUse)."""
    mine, _ = claim(directory, "someone-else")
    mine.release()


def test_a_second_fit_of_the_same_module_continues_its_posthoc_ema(tmp_path: Path) -> None:
    cb, net = callback(tmp_path / "ema"), Net()
    trainer([cb]).fit(net, data())
    first = cb.posthoc
    trainer([cb]).fit(net, data())
    assert cb.posthoc is first and first.num_updates == 12
    assert [s.t for s in list_snapshots(tmp_path / "ema")] == [4, 4, 6, 6, 8, 8, 12, 12]


def test_a_fit_of_another_module_builds_a_new_posthoc_ema_and_refuses_the_first_runs_folder(tmp_path: Path) -> None:
    cb = callback(tmp_path / "ema")
    trainer([cb]).fit(Net(), data())
    first = cb.posthoc
    other = Net()
    with pytest.raises(ValueError, match=r"holds the snapshots of another run") as refused:
        trainer([cb]).fit(other, data())
    assert repr(str(tmp_path / "ema")) in str(refused.value)
    assert other.layer.weight.grad is None  # refused before any training step
    assert_free(tmp_path / "ema")  # the first run's lock is given back, and the new one holds none
    assert [s.t for s in list_snapshots(tmp_path / "ema")] == [4, 4, 6, 6]

    cb.directory = str(tmp_path / "other")  # what a sweep does: each fit its own folder
    trainer([cb]).fit(other, data())
    assert cb.posthoc is not first and cb.posthoc.run_id != first.run_id
    assert cb.posthoc.emas[0].model is other and cb.posthoc.num_updates == 6
    assert first.num_updates == 6  # the first module's EMA is left as it was


def test_a_fit_of_another_module_in_its_own_folder_tracks_that_module(tmp_path: Path) -> None:
    cb = callback(tmp_path / "a")
    trainer([cb]).fit(Net(), data())
    first = cb.posthoc
    cb.directory, other = str(tmp_path / "b"), Net()
    trainer([cb], max_steps=4).fit(other, data())
    assert cb.posthoc is not first and cb.posthoc.emas[0].model is other
    assert cb.posthoc.num_updates == 4 and cb.posthoc.directory == tmp_path / "b"
    assert [s.t for s in list_snapshots(tmp_path / "b")] == [4, 4]
    assert_free(tmp_path / "a")
    assert_free(tmp_path / "b")


def test_the_folder_is_given_back_when_fit_ends(tmp_path: Path) -> None:
    cb, net = callback(tmp_path / "ema"), Net()
    trainer([cb]).fit(net, data())
    assert_free(tmp_path / "ema")
    cb.posthoc.snapshot()  # a later snapshot claims it again
    with pytest.raises(FolderInUse, match="in use by another PostHocEMA"):
        claim(tmp_path / "ema", "someone-else")
    cb.posthoc.close()
    trainer([cb]).fit(net, data())  # and a second fit writes on
    assert_free(tmp_path / "ema")
    assert max(s.t for s in list_snapshots(tmp_path / "ema")) == 12


def test_the_folder_is_given_back_when_fit_raises(tmp_path: Path) -> None:
    cb = callback(tmp_path / "ema")
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer([cb]).fit(Net(fail_at_step=5), data())
    assert [s.t for s in list_snapshots(tmp_path / "ema")] == [4, 4]
    assert_free(tmp_path / "ema")
    resumed = PostHocEMA(Net(), (0.05, 0.10), 4, tmp_path / "ema")  # another object continues the run
    resumed.load_state_dict(cb.posthoc.state_dict())
    assert resumed.num_updates == 5
    resumed.close()


def test_a_resumed_runs_warning_points_at_the_users_line(tmp_path: Path) -> None:
    """Resuming from an earlier checkpoint moves the later snapshots aside, with a UserWarning: reported at the
    ``trainer.fit`` line of the caller (this file), not inside polyak or Lightning."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = callback(tmp_path / "ema")
    trainer([first, checkpoints], enable_checkpointing=True).fit(Net(), data())
    early = next(p for p in (tmp_path / "ckpt").iterdir() if "step=2" in p.name)
    resumed = callback(tmp_path / "ema")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([resumed]).fit(Net(), data(), ckpt_path=str(early))
    moved = [w for w in caught if "moved the" in str(w.message)]
    assert len(moved) == 1, [str(w.message) for w in caught]
    assert moved[0].filename == __file__
    assert resumed.posthoc.num_updates == 6


def test_a_direct_load_state_dict_warns_at_the_callers_line(tmp_path: Path) -> None:
    net = Net()
    with PostHocEMA(net, (0.05,), 2, tmp_path / "ema") as posthoc:
        posthoc.update()
        state = posthoc.state_dict()
        posthoc.update()
        posthoc.update()
    again = PostHocEMA(net, (0.05,), 2, tmp_path / "ema")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.load_state_dict(state)
    assert [w.filename for w in caught] == [__file__], [str(w.message) for w in caught]
    again.close()


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_a_folder_that_cannot_be_locked_warns_at_the_users_line(tmp_path: Path, monkeypatch) -> None:
    """Where the file system refuses ``flock`` (some network mounts) the first snapshot warns, reported at the
    ``trainer.fit`` line, three polyak frames and Lightning's below it (update, snapshot, claim)."""
    import polyak.posthoc._lock as lock

    def refused(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(lock.fcntl, "flock", refused)
    cb = callback(tmp_path / "ema")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([cb]).fit(Net(), data())
    locked = [w for w in caught if "cannot be locked" in str(w.message)]
    assert len(locked) == 1 and locked[0].filename == __file__, [(str(w.message), w.filename) for w in caught]
