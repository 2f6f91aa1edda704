"""Run by tests/test_deepspeed_trainers.py as ``deepspeed --num_gpus 2 tests/_deepspeed_transformers.py OUT``: the
transformers ``Trainer`` under a DeepSpeed ZeRO-3 config (CPU, gloo, 2 ranks) with polyak's ``EMACallback``, against
a float64 EMA of the gathered weights kept by a callback beside it. Every rank writes what it found to
``OUT/rank{r}.json``."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
from safetensors import safe_open
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from polyak.transformers import EMACallback

MOMENTUM = 0.25
STEPS, ACCUMULATION, BATCH = 8, 2, 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        y = self.body(x)
        return {"logits": y, "loss": None if labels is None else per_sample(y, labels).mean()}


def per_sample(y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (y.float() - labels.float()).pow(2).mean(dim=1)


def data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x, labels = torch.randn(n, 12, generator=g), torch.randn(n, 5, generator=g)
    return [{"x": x[i], "labels": labels[i]} for i in range(n)]


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole weights, float64 (a collective: every rank calls it)."""
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().double().clone() for n, p in model.named_parameters()}


class Reference(TrainerCallback):
    """A float64 EMA of the gathered weights, updated when the EMACallback (before it) updates; the evaluation
    loss of the reference's weights at each evaluation, to compare with what the Trainer reports."""

    def __init__(self, evaluation: list[dict]) -> None:
        self.evaluation = evaluation
        self.ema: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.evaluations: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = gathered(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # the EMACallback (before this one) updated its EMA and, before an evaluation, swapped its average in:
        # gather the online weights with the swap undone, as the EMA read them
        now = self.online(model)
        for k in self.ema:
            self.ema[k].lerp_(now[k], MOMENTUM)
        self.updates += 1

    def online(self, model):
        callback = next(c for c in self.callbacks if isinstance(c, EMACallback))
        swapped = callback._run is not None and callback._run._swap is not None
        if swapped:
            callback.restore()
        now = gathered(model)
        if swapped:
            callback._run.enter()
        return now

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        evaluator = Net().double()
        evaluator.load_state_dict(self.ema)
        x = torch.stack([d["x"] for d in self.evaluation]).double()
        labels = torch.stack([d["labels"] for d in self.evaluation]).double()
        with torch.no_grad():
            expected = float(per_sample(evaluator.body(x), labels).mean())
        self.evaluations.append({"step": state.global_step, "reported": metrics["eval_loss"], "expected": expected})


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def main() -> None:
    """Every rank: train, compare, write ``OUT/rank{r}.json`` (a program, run by the launcher: pytest's doctest
    collection imports this module and must run nothing)."""
    # DeepSpeed's CPU accelerator compiles a shared-memory collective at start-up (minutes on two cores): gloo suffices
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    out = Path(sys.argv[-1])  # (the launcher puts --local_rank first)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    found: dict = {}
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,  # every parameter partitioned (none kept gathered)
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,
    }
    args = TrainingArguments(
        output_dir=str(out / "run"),
        deepspeed=config,
        use_cpu=True,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        save_only_model=False,
        logging_steps=4,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    evaluation = data(8, 1)
    callback = EMACallback(momentum=MOMENTUM)
    reference = Reference(evaluation)
    model = Net()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data(STEPS * ACCUMULATION * BATCH * 2, 0),
        eval_dataset=evaluation,
        callbacks=[callback, reference],
    )
    reference.callbacks = trainer.callback_handler.callbacks
    trainer.train()
    ema = callback.ema
    engine = trainer.model_wrapped
    module = engine.module
    found["engine"] = type(engine).__name__
    found["zero_stage"] = engine.zero_optimization_stage()
    found["partitioned"] = all(hasattr(p, "ds_tensor") for p in module.parameters())
    found["ema_numel"] = sum(t.numel() for t in ema.ema_model.state_dict().values())
    found["model_numel"] = sum(p.ds_numel for p in module.parameters())
    found["num_updates"] = ema.num_updates
    found["reference_updates"] = reference.updates
    full = ema.full_state_dict()["ema_model"]  # every rank: a collective
    found["diff"] = max_diff(full, reference.ema)
    found["evaluations"] = reference.evaluations
    found["online_back"] = max_diff(gathered(module), reference.online(module)) == 0.0

    # what the callback wrote: on_save and on_train_end run on rank 0 only
    checkpoint = out / "run" / f"checkpoint-{STEPS}"
    torch.distributed.barrier()
    with safe_open(str(checkpoint / "ema.safetensors"), framework="pt") as f:
        found["saved_shapes"] = {k: list(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118
        found["saved_metadata"] = dict(f.metadata())
    found["model_shapes"] = {n: list(p.ds_shape) for n, p in module.named_parameters()}
    final = out / "run" / "ema" / "ema.safetensors"  # on_train_end (the model has no save_pretrained)
    with safe_open(str(final), framework="pt") as f:
        found["final_shapes"] = {k: list(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118
    found["checkpoint_files"] = sorted(os.listdir(checkpoint))
    own = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    saved_partitions_of = {}
    with safe_open(str(checkpoint / "ema.safetensors"), framework="pt") as f:
        for k in own:
            saved_partitions_of[k] = torch.equal(f.get_tensor(k), own[k])
    found["file_is_this_ranks_partitions"] = all(saved_partitions_of.values())
    # resuming from that folder (what train(resume_from_checkpoint=...) does through on_train_begin): every rank loads
    # the one file rank 0 wrote
    try:
        callback.load(checkpoint)
        found["load"] = "ok"
        found["diff_after_load"] = max_diff(ema.full_state_dict()["ema_model"], reference.ema)
    except Exception as e:
        found["load"] = f"{type(e).__name__}: {e}"
    (out / f"rank{rank}.json").write_text(json.dumps(found, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads stopped before the interpreter's teardown


if __name__ == "__main__":
    main()
