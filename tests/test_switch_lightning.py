"""docs/switching/lightning.md: its before and after programs (real ``lightning.Trainer`` runs) give the same
average; where Lightning's ``EMAWeightAveraging`` is wrong (the integer counter, a validation before the first
update), the numbers. (bf16 and ``update_every_n_steps`` are measured in tests/test_lightning.py.)"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from _docs import DOCS
from _switching import run
from polyak.lightning import EMACallback

PAGE = DOCS / "switching" / "lightning.md"


def test_before_and_after_give_the_same_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = run(PAGE, "before", tmp_path, monkeypatch)
    after = run(PAGE, "after", tmp_path, monkeypatch)
    theirs, ours = before["averaged"].state_dict(), after["averaged"].state_dict()
    assert theirs.keys() == ours.keys()
    for k, v in ours.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    # Lightning's get_ema_avg_fn computes 0.99 * ema + 0.01 * theta for the counter, truncated into int64
    assert after["model"].net[1].num_batches_tracked.item() == ours["net.1.num_batches_tracked"].item() == 40
    assert theirs["net.1.num_batches_tracked"].item() == 1
    assert after["callback"].ema.num_updates == 40
    # both modules hold the average after fit
    for k, v in after["model"].state_dict().items():
        assert torch.equal(v, ours[k]), k


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", (self.net(x) - y).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_validation_before_the_first_update() -> None:
    """Lightning #21724: with update_starting_at_step=100, the validation after 16 steps swaps in the copy made at
    setup, and measures the untrained model."""
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    losses = {}
    for name, callbacks in (
        ("lightning", [EMAWeightAveraging(decay=0.99, update_starting_at_step=100)]),
        ("polyak", [EMACallback(decay=0.99, update_starting_at_step=100)]),
        ("no EMA", []),
        ("untrained", None),
    ):
        trainer = L.Trainer(
            max_epochs=1,
            max_steps=16 if callbacks is not None else 0,
            callbacks=callbacks or [],
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        if callbacks is None:
            losses[name] = trainer.validate(Net(), data, verbose=False)[0]["val_loss"]
        else:
            trainer.fit(Net(), data, data)
            losses[name] = trainer.callback_metrics["val_loss"].item()
    print({k: round(v, 3) for k, v in losses.items()})
    # measured: Lightning 4.59 (the untrained model's loss), polyak and no EMA 0.128 (the trained weights)
    assert losses["lightning"] == pytest.approx(losses["untrained"], rel=1e-6)
    assert losses["polyak"] == pytest.approx(losses["no EMA"], rel=1e-6)
    assert losses["polyak"] < 0.2 * losses["lightning"]


def test_a_run_resumed_from_lightnings_checkpoint_continues_as_lightnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint block: 16 steps with EMAWeightAveraging, 16 more with EMACallback; against 32 steps with
    EMAWeightAveraging alone."""
    ns = run(PAGE, "checkpoint", tmp_path, monkeypatch)
    assert ns["callback"].ema.num_updates == 32
    torch.manual_seed(0)
    model = ns["Net"]()
    ns["trainer"](32, [EMAWeightAveraging(decay=0.99)]).fit(model, ns["data"])  # ends holding its average
    theirs = model.state_dict()
    for k, v in ns["averaged"].state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, theirs[k], rtol=1e-5, atol=1e-6, msg=k)
