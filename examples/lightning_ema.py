"""Train a small network on scikit-learn's digits with Lightning and polyak's EMACallback; compare accuracies.

    python examples/lightning_ema.py                 # a few seconds on a CPU
    python examples/lightning_ema.py --epochs 20 --precision bf16-true

The network is trained at a deliberately high learning rate, so that its weights keep jumping around the
minimum, and :class:`polyak.lightning.EMACallback` averages them once per optimizer step. Validation runs
with the EMA's weights in the module (the callback swaps them in and out); after each epoch the script also
evaluates the online weights, and prints both accuracies. Needs scikit-learn (the digits ship with it) and
Lightning (``pip install "polyak[lightning,demo]"``).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyak.lightning import EMACallback


class Digits(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.lr = lr
        self.online_accuracy: list[float] = []
        self.ema_accuracy: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).float(), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        accuracy = (self(x).argmax(1) == y).float().mean()
        self.log("val_accuracy", accuracy)  # with the EMA's weights: the callback swapped them in

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    model.train()
    return right / len(loader.dataset)


class Report(L.Callback):
    """After each validation: the EMA's accuracy (what validation measured) and the online model's."""

    def __init__(self, held_out: DataLoader) -> None:
        self.held_out = held_out

    def on_validation_end(self, trainer: L.Trainer, pl_module: Digits) -> None:
        if trainer.sanity_checking:
            return
        ema = float(trainer.callback_metrics["val_accuracy"])
        online = accuracy(pl_module, self.held_out)  # the online weights are back in the module here
        pl_module.ema_accuracy.append(ema)
        pl_module.online_accuracy.append(online)
        print(f"epoch {trainer.current_epoch:2d}  held-out accuracy: online {100 * online:.2f}%  EMA {100 * ema:.2f}%")


def main(argv: list[str] | None = None) -> Digits:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--decay", type=float, default=0.98, help="the EMA's decay (momentum = 1 - decay)")
    parser.add_argument("--precision", default="32-true", help="Lightning's precision, e.g. bf16-true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, held = order[:1300], order[1300:]
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    train_loader = DataLoader(TensorDataset(x[train].to(dtype), y[train]), batch_size=32, shuffle=True)
    held_out = DataLoader(TensorDataset(x[held].to(dtype), y[held]), batch_size=512)

    model = Digits(args.lr)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        precision=args.precision,
        callbacks=[EMACallback(decay=args.decay, weights_at_end="online"), Report(held_out)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train_loader, held_out)
    return model


if __name__ == "__main__":
    main()
