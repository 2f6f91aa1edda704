"""Run by tests/test_deepspeed_trainers.py as ``deepspeed --num_gpus 2 tests/_deepspeed_lightning.py OUT``: Lightning's
``DeepSpeedStrategy(stage=3)`` on 2 CPU ranks with polyak's ``EMACallback``.

Lightning 2.6 refuses DeepSpeed on the CPU (``setup_environment``: "only supported on CUDA GPUs"): the run records
that refusal, then goes on with the same strategy but for that one check (a subclass), to see what the callback does
under ZeRO-3 beyond it, against a float64 EMA of the gathered weights. Every rank writes ``OUT/rank{r}.json``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import deepspeed
import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn

from polyak.lightning import EMACallback

MOMENTUM = 0.25
STEPS = 6


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.body(x) - y).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", (self.body(x) - y).pow(2).mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 12, generator=g), torch.randn(n, 5, generator=g))


def gathered(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole weights, float64 (a collective: every rank calls it)."""
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {n: p.detach().double().clone() for n, p in module.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


VALIDATION = data(8, 1)


class Reference(L.Callback):
    """A float64 EMA of the gathered weights, updated after each optimizer step (after the EMACallback)."""

    def on_train_start(self, trainer, pl_module):
        self.ema = gathered(pl_module)
        self.updates = 0

    def on_train_end(self, trainer, pl_module):
        self.online_at_end = gathered(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = gathered(pl_module)
        for k in self.ema:
            self.ema[k].lerp_(now[k], MOMENTUM)
        self.updates += 1
        self.last_online = now

    def on_validation_epoch_end(self, trainer, pl_module):
        evaluator = Net().double()
        evaluator.load_state_dict(self.ema)
        x, y = VALIDATION.tensors
        with torch.no_grad():
            self.expected_val_loss = float((evaluator.body(x.double()) - y.double()).pow(2).mean())


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy but for its CUDA check (DDPStrategy's set-up, which DeepSpeed's then calls)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:  # its check that CUDA device indices match the local ranks left out
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        # Lightning passes device_rank=root_device.index, None on the CPU, which DeepSpeed compares with 0
        engine, optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, optimizer


def trainer_with(strategy, callbacks) -> L.Trainer:
    return L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }


def loader(dataset):
    return torch.utils.data.DataLoader(dataset, batch_size=4)


def main() -> None:
    """Every rank: the two fits, the checks, ``OUT/rank{r}.json`` (a program, run by the launcher: pytest's doctest
    collection imports this module and must run nothing)."""
    # DeepSpeed's CPU accelerator compiles a shared-memory collective at start-up (minutes on two cores): gloo suffices
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    out = Path(sys.argv[-1])  # (the launcher puts --local_rank first)
    found: dict = {}

    # 1. the strategy as Lightning ships it
    try:
        trainer_with(DeepSpeedStrategy(config=config()), [EMACallback(momentum=MOMENTUM)]).fit(
            Net(), loader(data(4 * STEPS * 2, 0))
        )
        found["stock"] = "ran"
    except Exception as e:
        found["stock"] = f"{type(e).__name__}: {e}"

    # 2. the same strategy without its CUDA checks; weights_at_end="online": the default's copy into the module is tried
    # on its own below
    callback, reference = EMACallback(momentum=MOMENTUM, copy_first=0, weights_at_end="online"), Reference()
    model = Net()
    trainer = trainer_with(CPUDeepSpeedStrategy(config=config()), [callback, reference])
    try:
        trainer.fit(model, loader(data(4 * STEPS * 2, 0)), loader(VALIDATION))
        found["fit"] = "ran"
    except Exception as e:
        found["fit"] = f"{type(e).__name__}: {e}"
        found["fit_where"] = traceback.format_exc(limit=-4)
    rank = int(os.environ["RANK"])
    ema = callback.ema
    if ema is not None and torch.distributed.is_initialized():
        found["partitioned"] = all(hasattr(p, "ds_tensor") for p in model.parameters())
        found["ema_numel"] = sum(t.numel() for t in ema.ema_model.state_dict().values())
        found["model_numel"] = sum(p.ds_numel for p in model.parameters())
        found["num_updates"] = ema.num_updates
        found["reference_updates"] = getattr(reference, "updates", None)
        found["diff"] = max_diff(ema.full_state_dict()["ema_model"], reference.ema)
        found["val_loss"] = float(trainer.callback_metrics["val_loss"])
        found["expected_val_loss"] = getattr(reference, "expected_val_loss", None)
        found["online_back"] = max_diff(reference.online_at_end, reference.last_online) == 0.0  # validated between
        # the callback's checkpoint state (Lightning asks every rank): the EMA whole
        state = callback.state_dict()
        whole = state.get("ema", {}).get("ema_model", {})
        found["state_shapes"] = {k: list(v.shape) for k, v in whole.items()}
        found["state_diff"] = max_diff(whole, reference.ema) if whole else None
        # the strategy's checkpoint (engine.save_checkpoint on every rank, the callback's state in its client state)
        try:
            trainer.save_checkpoint(out / "last.ckpt")
            found["save_checkpoint"] = "ok"
            written = torch.load(  # DeepSpeed's file of this rank (pickled: DeepSpeed's own objects in it)
                out / "last.ckpt" / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False
            )
            in_file = written["callbacks"][callback.state_key]["ema"]
            found["file_diff"] = max_diff(in_file["ema_model"], reference.ema)
            found["file_num_updates"] = in_file["num_updates"]
        except Exception as e:
            found["save_checkpoint"] = f"{type(e).__name__}: {e}"
        # what weights_at_end="ema" (the default) does in on_train_end
        try:
            ema.copy_to(model)
            found["copy_to_module"] = "ok"
            found["copy_to_diff"] = max_diff(gathered(model), reference.ema)  # the module holds the average now
        except Exception as e:
            found["copy_to_module"] = f"{type(e).__name__}: {e}".splitlines()[0]
    (out / f"rank{rank}.json").write_text(json.dumps(found, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        # gloo's threads stopped before the interpreter's teardown, which otherwise aborts now and then
        # ("terminate called without an active exception")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
