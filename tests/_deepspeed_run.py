"""Run by tests/test_deepspeed.py as ``deepspeed --num_gpus 2 tests/_deepspeed_run.py OUT``: polyak's EMA on
DeepSpeed engines (ZeRO stages 1 to 3, gloo on the CPU), each against a float64 EMA of the gathered weights.
Every rank writes what it found to ``OUT/rank{r}.json`` (and rank 0 a whole EMA state to ``OUT/full.pt``)."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import warnings
from pathlib import Path

import deepspeed
import torch
from torch import nn

from polyak import EMA

# DeepSpeed's CPU accelerator compiles a shared-memory collective at start-up (a C++ extension, minutes on two
# cores); gloo is all these runs need
# (importlib: deepspeed.comm re-exports torch under the name torch)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

OUT = Path(sys.argv[-1])  # (the launcher puts --local_rank first)
deepspeed.init_distributed(dist_backend="gloo")
RANK = torch.distributed.get_rank()
found: dict = {}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))


def engine_for(stage: int, bf16: bool = False, persistence: int = 0):
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": persistence},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
    }
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def gathered(engine) -> dict[str, torch.Tensor]:
    """The model's whole weights, float64 (gathered where ZeRO-3 partitions them)."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if hasattr(params[0], "ds_tensor") else contextlib.nullcontext():
        return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}


def step(engine, i: int) -> None:
    g = torch.Generator().manual_seed(100 * i + RANK)
    x = torch.randn(4, 12, generator=g)
    dtype = next(p for p in engine.module.parameters()).dtype
    loss = engine(x.to(dtype)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()


class Collectives:
    """Counts the collectives called while it is active (an update must call none)."""

    names = ("all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce_scatter_tensor")

    def __enter__(self):
        self.count = 0
        self.saved = {n: getattr(torch.distributed, n) for n in self.names}
        for n, f in self.saved.items():

            def counted(*a, _f=f, **k):
                self.count += 1
                return _f(*a, **k)

            setattr(torch.distributed, n, counted)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.distributed, n, f)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def run(stage: int, key: str, bf16: bool = False, persistence: int = 0, of_engine: bool = True) -> None:
    engine = engine_for(stage, bf16, persistence)
    momentum = 0.25
    ema = EMA(engine if of_engine else engine.module, momentum=momentum, skip_nonfinite=stage == 3)
    plan = ema._plan
    reference = gathered(engine)
    collectives = 0
    for i in range(6):
        step(engine, i)
        with Collectives() as c:
            ema.update()
        collectives += c.count - (1 if stage == 3 else 0)  # skip_nonfinite's one agreement (an all_reduce)
        now = gathered(engine)
        for k in reference:
            reference[k].lerp_(now[k], momentum)
    full = ema.full_state_dict()
    result = {
        "diff": max_diff(full["ema_model"], reference),
        "collectives_in_update": collectives,
        "rebuilt": ema._plan is not plan,
        "ema_numel": sum(t.numel() for t in ema.ema_model.state_dict().values()),
        "model_numel": sum(t.numel() for t in reference.values()),
    }
    if "master" in full:
        result["master_diff"] = max_diff(full["master"], reference)
    # evaluating with the average in place: the engine's forward inside swapped() is the reference's
    evaluator = net()
    evaluator.load_state_dict({k: v.float() for k, v in reference.items()})
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(7))
    dtype = next(p for p in engine.module.parameters()).dtype
    online_before = gathered(engine)
    with torch.no_grad(), ema.swapped():
        inside = engine(x.to(dtype)).float()
    result["swapped_diff"] = float((inside - evaluator(x)).detach().abs().max())
    result["online_back"] = max_diff(gathered(engine), online_before) == 0.0
    target = net()
    ema.copy_to(target)
    result["copy_to_diff"] = max_diff(dict(target.named_parameters()), reference)
    if stage == 3:
        # resume on the same ranks from this rank's state; the whole state on any number (rank 0 saves it)
        own = OUT / f"{key}_rank{RANK}.pt"
        torch.save(ema.state_dict(), own)
        if RANK == 0:
            torch.save(full, OUT / f"{key}_full.pt")
        resumed = EMA(engine, momentum=momentum, skip_nonfinite=True)
        resumed.load_state_dict(torch.load(own, weights_only=True))
        from_whole = EMA(engine, momentum=momentum, skip_nonfinite=True)
        torch.distributed.barrier()
        from_whole.load_state_dict(torch.load(OUT / f"{key}_full.pt", weights_only=True))
        other = OUT / f"{key}_rank{1 - RANK}.pt"
        torch.distributed.barrier()
        try:
            EMA(engine, momentum=momentum).load_state_dict(torch.load(other, weights_only=True))
            result["other_rank_refused"] = False
        except ValueError as e:
            result["other_rank_refused"] = "ZeRO-3 partitions of rank" in str(e)
        untagged = ema.state_dict()
        untagged.pop("zero")  # partitions that do not say whose they are
        try:
            EMA(engine, momentum=momentum).load_state_dict(untagged)
            result["untagged_refused"] = False
        except ValueError as e:
            result["untagged_refused"] = "must be the whole tensor" in str(e)
        step(engine, 10)
        for e in (ema, resumed, from_whole):
            e.update()
        a, b, c = (e.full_state_dict()["ema_model"] for e in (ema, resumed, from_whole))
        result["resume_diff"] = max(max_diff(a, b), max_diff(a, c))
        # skip_nonfinite agrees across ranks: a NaN in rank 0's partition only skips on both
        if RANK == 0:
            with torch.no_grad():
                next(engine.module.parameters()).ds_tensor[0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result["skipped_momentum"] = ema.update()
        result["num_skipped"] = ema.num_skipped
    found[key] = result


for stage in (1, 2, 3):
    run(stage, f"stage{stage}")
run(1, "stage1-module", of_engine=False)
run(3, "stage3-module", of_engine=False)
run(3, "stage3-persistent", persistence=40)  # biases and norms persistent, weights partitioned
run(3, "stage3-bf16", bf16=True)
(OUT / f"rank{RANK}.json").write_text(json.dumps(found, indent=1))
torch.distributed.barrier()
