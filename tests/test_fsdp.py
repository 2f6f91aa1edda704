"""FSDP2 (``fully_shard``) with EMA and EMAHandler, on 2 gloo ranks (CPU).

Two runs of 2 forked ranks (module-scoped fixtures), whose results the tests check:

* ``trained``: three trainings (float32 with BatchNorm buffers averaged, a warm-up through EMAHandler in an
  ignite Engine, bfloat16 with a float32 master), each rank recording the gathered online weights after
  every step; an evaluation of the EMA module and of ``swapped()`` midway; what is refused, and why.
* ``resumed``: resume through torch.distributed.checkpoint (sharded) and through a full state dict saved on
  rank 0, against an uninterrupted run, in float32 and bfloat16.

The references are computed here, in the parent, on the gathered (full) tensors with the same elementwise
operation as the core (``lerp_`` in the accumulator's dtype): the sharded EMA must equal them bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
try:  # imported here, once: the forked ranks inherit them
    import torch._dynamo  # fully_shard imports it at its first call: seconds, in every rank
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError as e:  # pragma: no cover - a torch without FSDP2
    pytest.skip(f"FSDP2 is not available: {e}", allow_module_level=True)

from ignite.engine import Engine, Events

from _dist import finish_rank, free_port, init_rank, no_collectives, rank_env, run_ranks
from polyak import EMA, EMAHandler
from polyak.schedules import linear_warmup

WORLD = 2
STEPS = 6
MID = 3  # the step after which the EMA module is evaluated (its lazy init), or the checkpoint taken
TIMEOUT = 90

# name -> (dtype, batch norm with averaged buffers, through EMAHandler in an Engine)
TRAIN_CONFIGS = {
    "float32": (torch.float32, True, False),
    "warmup": (torch.float32, False, True),
    "bfloat16": (torch.bfloat16, False, False),
}
MOMENTUM, MOMENTUM_WARMUP, WARMUP_ITERS = 0.05, 0.5, 4


# -- in the ranks ---------------------------------------------------------------------------------------


def _net(dtype: torch.dtype = torch.float32, seed: int = 0, bn: bool = False, width: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, width)]  # 7 rows: uneven shards
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.Tanh(), nn.Linear(width, 3)]
    return nn.Sequential(*layers).to(dtype)


def _sharded(module: nn.Module, **kwargs: Any) -> nn.Module:
    """``fully_shard`` every Linear but the last, then the root (which so holds some parameters itself: after a
    forward outside of training, FSDP2 keeps the root's gathered), the usual FSDP2 wrapping."""
    for sub in list(module)[:-1]:
        if isinstance(sub, nn.Linear):
            fully_shard(sub, **kwargs)
    fully_shard(module, **kwargs)
    return module


def _build(dtype: torch.dtype = torch.float32, seed: int = 0, bn: bool = False) -> nn.Module:
    return _sharded(_net(dtype, seed, bn))


def _full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole (DTensors gathered: a collective), detached and cloned; on every rank."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


def _local_numel(state: dict[str, torch.Tensor]) -> int:
    return sum((v._local_tensor if isinstance(v, DTensor) else v).numel() for v in state.values())


def _batches(rank: int, n: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    return [(torch.randn(8, 5, generator=g).to(dtype), torch.randn(8, 3, generator=g)) for _ in range(n)]


def _eval_input() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(7))  # the same on every rank


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    optimizer.zero_grad()
    (model(x).float() - y).pow(2).mean().backward()
    optimizer.step()


def _caught(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return "nothing", ""


def _train_config(rank: int, name: str) -> dict[str, Any]:
    dtype, bn, with_engine = TRAIN_CONFIGS[name]
    model = _build(dtype, seed=0, bn=bn)
    ema_module = _build(dtype, seed=1, bn=bn)  # other values: the EMA must start from the model's
    initial = _full(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    if with_engine:
        handler = EMAHandler(
            model,
            momentum=MOMENTUM,
            momentum_warmup=MOMENTUM_WARMUP,
            warmup_iters=WARMUP_ITERS,
            ema_model=ema_module,
        )
        ema = handler.ema
    else:
        schedule = linear_warmup(MOMENTUM_WARMUP, MOMENTUM, WARMUP_ITERS) if dtype == torch.bfloat16 else None
        kwargs: dict[str, Any] = {"schedule": schedule} if schedule else {"momentum": 0.1}
        ema = EMA(model, handle_buffers="update" if bn else "copy", ema_model=ema_module, **kwargs)
    out: dict[str, Any] = {
        "initial": initial,
        "starts_from_model": _full(ema_module.state_dict()),
        "online": [],
        "momenta": [],
        "ema_is_given_module": ema.ema_model is ema_module,
    }

    def after_step() -> None:
        out["online"].append(_full(model.state_dict()))
        if len(out["online"]) == MID:
            out.update(_evaluate(model, ema))

    data = _batches(rank, STEPS, dtype)
    if with_engine:
        trainer = Engine(lambda engine, batch: _step(model, optimizer, batch))
        handler.attach(trainer)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: out["momenta"].append(e.state.ema_momentum))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: after_step())
        trainer.run(data, max_epochs=1)
    else:
        for batch in data:
            _step(model, optimizer, batch)
            out["momenta"].append(ema.update())
            after_step()

    # evaluated again after the updates since MID: FSDP2 kept the root's parameters gathered at the last
    # evaluation, and a forward must not reuse them (polyak reshards the EMA module after each update)
    with torch.no_grad():
        out["out_ema_end"] = ema.ema_model(_eval_input().to(dtype))
    state = ema.state_dict()
    out["num_updates"] = ema.num_updates
    out["ema"] = _full(state["ema_model"])
    out["master"] = _full(state["master"]) if "master" in state else None
    out["master_is_dtensor"] = all(isinstance(v, DTensor) for v in state.get("master", {}).values())
    out["ema_local"] = _local_numel(dict(ema_module.named_parameters()))
    out["master_local"] = _local_numel(state.get("master", {}))
    out["ema_full"] = sum(p.numel() for p in ema_module.parameters())
    out["local_shapes"] = {k: tuple(p._local_tensor.shape) for k, p in ema_module.named_parameters()}
    plain = _net(dtype, bn=bn)
    plain.load_state_dict(out["ema"])
    with torch.no_grad():
        out["out_plain_end"] = plain.eval()(_eval_input().to(dtype))
    if with_engine:
        with no_collectives():  # ignite's Checkpoint calls it on every rank: it must not communicate
            out["handler_state_keys"] = sorted(handler.state_dict())
    return out


def _evaluate(model: nn.Module, ema: EMA) -> dict[str, Any]:
    """The EMA module evaluated as an FSDP module (its first forward: FSDP's lazy init), and ``swapped()``."""
    x = _eval_input().to(next(model.parameters()).dtype)
    with torch.no_grad():
        out_ema = ema.ema_model(x)
    online_before, ema_before = _full(model.state_dict()), _full(ema.ema_model.state_dict())
    model.eval()  # as the EMA module is: BatchNorm then uses the (averaged) running statistics
    with torch.no_grad(), ema.swapped() as swapped_model:
        out_swapped = swapped_model(x)
        inside = _full(model.state_dict())
    model.train()
    online_after, ema_after = _full(model.state_dict()), _full(ema.ema_model.state_dict())
    with torch.no_grad():  # and leaves the EMA module's root gathered: the updates that follow must show
        out_ema_again = ema.ema_model(x)
    return {
        "out_ema_again": out_ema_again,
        "swapped_yields_model": swapped_model is model,
        "out_ema": out_ema,
        "out_swapped": out_swapped,
        "inside_is_ema": all(torch.equal(inside[k], ema_before[k]) for k in inside),
        "online_restored": all(torch.equal(online_after[k], online_before[k]) for k in online_before),
        "ema_restored": all(torch.equal(ema_after[k], ema_before[k]) for k in ema_before),
    }


def _shard_even_columns(p: nn.Parameter) -> Shard | None:
    """Shard(1) where the columns split evenly (FSDP2 shards other dims than 0 only evenly), else the default."""
    return Shard(1) if p.ndim == 2 and p.shape[1] % WORLD == 0 else None


def _refusals(rank: int) -> dict[str, tuple[str, str]]:
    model = _build()
    refused = {
        "no_ema_model": _caught(lambda: EMA(model, momentum=0.1)),
        "handler_no_ema_model": _caught(lambda: EMAHandler(model, momentum=0.1)),
        "not_sharded": _caught(lambda: EMA(model, momentum=0.1, ema_model=_net())),
        "other_placement": _caught(
            lambda: EMA(model, momentum=0.1, ema_model=_sharded(_net(), shard_placement_fn=_shard_even_columns))
        ),
        "other_dtype": _caught(lambda: EMA(model, momentum=0.1, ema_model=_build(torch.float64))),
        "other_architecture": _caught(
            lambda: EMA(model, momentum=0.1, ema_model=_sharded(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))))
        ),
        "other_width": _caught(lambda: EMA(model, momentum=0.1, ema_model=_sharded(_net(width=6)))),
        "itself": _caught(lambda: EMA(model, momentum=0.1, ema_model=model)),
    }
    # state_dict() communicates with no one: rank 0 calls it alone while rank 1 waits at the barrier
    ema = EMA(model, momentum=0.1, ema_model=_build(seed=1))
    if rank == 0:
        with no_collectives():
            state = ema.state_dict()
            refused["state_dict_on_one_rank"] = ("nothing", ",".join(sorted(state)))
    dist.barrier()
    return refused


def train_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_rank(rank, world_size, port)
    result: dict[str, Any] = {}
    for name in TRAIN_CONFIGS:
        result[name] = _train_config(rank, name)
    result["refused"] = _refusals(rank)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finish_rank()


def _resume_run(
    rank: int, dtype: torch.dtype, how: str, ckpt: Path, exact_masters: bool = True
) -> dict[str, dict[str, torch.Tensor] | Any]:
    """Train MID steps, checkpoint (``how``: "dcp" or "full"), train on: the uninterrupted result; then fresh
    objects resume from the checkpoint and train on: the resumed result."""
    data = _batches(rank, STEPS, dtype)
    schedule = linear_warmup(MOMENTUM_WARMUP, MOMENTUM, WARMUP_ITERS)

    def make(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
        model = _build(dtype, seed=seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        return model, optimizer, EMA(model, schedule=schedule, ema_model=_build(dtype, seed=seed + 1))

    def finish(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> dict[str, Any]:
        for batch in data[MID:]:
            _step(model, optimizer, batch)
            ema.update()
        state = ema.state_dict()
        return {
            "online": _full(model.state_dict()),
            "ema": _full(state["ema_model"]),
            "master": _full(state["master"]) if "master" in state else {},
            "num_updates": ema.num_updates,
        }

    model, optimizer, ema = make(seed=0)
    for batch in data[:MID]:
        _step(model, optimizer, batch)
        ema.update()
    if how == "dcp":  # sharded: every rank writes its shards
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state, "ema": ema.state_dict()}, checkpoint_id=ckpt)
    else:  # whole tensors, gathered to rank 0 (a collective: every rank calls), saved there
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = {
            "model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optimizer, options=options),
            "ema_model": get_model_state_dict(ema.ema_model, options=options),
            "master": {k: v.full_tensor().cpu() for k, v in ema.state_dict().get("master", {}).items()},
            "num_updates": ema.num_updates,
        }
        if rank == 0:
            torch.save(full, ckpt)
        dist.barrier()
    out: dict[str, Any] = {"uninterrupted": finish(model, optimizer, ema)}

    model, optimizer, ema = make(seed=10)
    if how == "dcp":
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "ema": ema.state_dict()}
        dcp.load(state, checkpoint_id=ckpt)  # in place, each rank its shards; plain values replaced
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        out["loaded_num_updates"] = state["ema"]["num_updates"]
        ema.load_state_dict(state["ema"])
    else:  # rank 0 reads the file and broadcasts; each rank keeps its shards
        full = torch.load(ckpt, weights_only=True) if rank == 0 else {}
        broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full.get("model", {}), options=broadcast)
        set_optimizer_state_dict(model, optimizer, full.get("optim", {}), options=broadcast)
        set_model_state_dict(ema.ema_model, full.get("ema_model", {}), options=broadcast)
        count = [full.get("num_updates")]
        dist.broadcast_object_list(count, src=0)
        ema.num_updates = count[0]
        out["loaded_num_updates"] = ema.num_updates
        masters, weights = _full(ema.state_dict().get("master", {})), _full(ema.state_dict()["ema_model"])
        # the load re-synced the masters from the (rounded) weights
        out["master_from_weights"] = all(torch.equal(m, weights[k].float()) for k, m in masters.items())
        if exact_masters and masters:  # the gathered masters too (rank 0's, scattered): then resuming is exact
            state = ema.state_dict()
            state["master"] = {
                k: distribute_tensor(
                    full["master"][k] if rank == 0 else torch.empty(v.shape, dtype=v.dtype),
                    v.device_mesh,
                    v.placements,
                    src_data_rank=0,
                )
                for k, v in state["master"].items()
            }
            ema.load_state_dict(state)
    out["resumed"] = finish(model, optimizer, ema)
    return out


def resume_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_rank(rank, world_size, port)
    result: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        result[f"dcp-{name}"] = _resume_run(rank, dtype, "dcp", Path(out_dir) / f"dcp-{name}")
        result[f"full-{name}"] = _resume_run(rank, dtype, "full", Path(out_dir) / f"full-{name}.pt")
    result["full-bfloat16-weights-only"] = _resume_run(
        rank, torch.bfloat16, "full", Path(out_dir) / "full-weights-only.pt", exact_masters=False
    )
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finish_rank()


# -- in the parent --------------------------------------------------------------------------------------


def _run(worker: Callable[..., None], out_dir: Path) -> list[dict[str, Any]]:
    try:
        run_ranks(worker, nprocs=WORLD, args=(WORLD, free_port(), str(out_dir)), timeout=TIMEOUT)
    except Exception:
        pytest.fail(f"{worker.__name__} failed:\n{traceback.format_exc()}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run(train_worker, tmp_path_factory.mktemp("fsdp_train"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run(resume_worker, tmp_path_factory.mktemp("fsdp_resume"))


def _warmup(k: int) -> float:
    """The seed's linear warm-up, written out independently of polyak.schedules."""
    m = MOMENTUM_WARMUP + (MOMENTUM - MOMENTUM_WARMUP) * (k - 1) / max(1, WARMUP_ITERS - 1)
    return max(MOMENTUM, m)


def _reference(run: dict[str, Any], averaged: list[str], acc: torch.dtype) -> dict[str, torch.Tensor]:
    """``ref.lerp_(theta_k, m_k)`` over the gathered online weights, in the accumulator's dtype."""
    ref = {k: v.to(acc, copy=True) if k in averaged else v.clone() for k, v in run["initial"].items()}
    for theta, m in zip(run["online"], run["momenta"], strict=True):
        for k, v in theta.items():
            if k in averaged:
                ref[k].lerp_(v.to(acc), m)
            else:
                ref[k].copy_(v)
    return ref


@pytest.mark.parametrize("name", list(TRAIN_CONFIGS))
def test_sharded_ema_equals_reference_of_gathered_weights_bitwise(trained: list[dict], name: str) -> None:
    dtype, bn, _ = TRAIN_CONFIGS[name]
    for rank, result in enumerate(trained):
        run = result[name]
        assert run["ema_is_given_module"]
        assert run["num_updates"] == STEPS == len(run["online"])
        # the user's module, built with other values, starts from the model's
        for k, v in run["initial"].items():
            assert torch.equal(run["starts_from_model"][k], v), k
        if name == "float32":
            assert run["momenta"] == [0.1] * STEPS
        else:
            assert run["momenta"] == pytest.approx([_warmup(k) for k in range(1, STEPS + 1)], rel=1e-15)
        params = [k for k in run["initial"] if "running" not in k and "num_batches" not in k]
        averaged = [k for k, v in run["initial"].items() if v.is_floating_point()] if bn else params
        acc = torch.float32
        ref = _reference(run, averaged, acc)
        for k, v in run["ema"].items():
            assert v.dtype == dtype or not v.is_floating_point(), k
            assert torch.equal(v, ref[k].to(v.dtype)), (rank, k)
        if dtype == torch.bfloat16:  # the float32 master is the reference itself
            assert run["master_is_dtensor"]
            assert set(run["master"]) == set(params)
            for k, v in run["master"].items():
                assert v.dtype == torch.float32 and torch.equal(v, ref[k]), (rank, k)
        else:
            assert run["master"] is None
        last = run["online"][-1]
        for k in params:  # a real average: neither the first nor the last online weights
            if not torch.allclose(last[k], run["initial"][k]):  # (a bias before BatchNorm gets ~no gradient)
                assert not torch.equal(run["ema"][k], last[k]) and not torch.equal(run["ema"][k], run["initial"][k])
        if bn:  # BatchNorm's buffers are plain tensors, each rank's own: averaged, and the count copied
            assert "3.running_mean" in averaged
            assert int(run["ema"]["3.num_batches_tracked"]) == STEPS
    # the gathered EMA is the same on both ranks (BatchNorm's statistics are each rank's own)
    for k, v in trained[0][name]["ema"].items():
        if "running" not in k:
            assert torch.equal(v, trained[1][name]["ema"][k]), k


@pytest.mark.parametrize("name", list(TRAIN_CONFIGS))
def test_each_rank_holds_its_shard_only(trained: list[dict], name: str) -> None:
    runs = [result[name] for result in trained]
    full = runs[0]["ema_full"]
    assert sum(run["ema_local"] for run in runs) == full  # the shards partition the EMA: no copy anywhere
    for rank, run in enumerate(runs):
        # dim-0 shards as torch.chunk cuts them: the 7-row weight splits 4 + 3, the 3-row one 2 + 1
        for k, local in run["local_shapes"].items():
            shape = tuple(run["ema"][k].shape)
            chunks = torch.arange(shape[0]).chunk(WORLD)
            assert local == (len(chunks[rank]) if rank < len(chunks) else 0, *shape[1:]), k
        assert run["local_shapes"]["0.weight"] == ((4, 5), (3, 5))[rank]
        assert abs(run["ema_local"] - full / WORLD) <= 0.15 * full  # about half (uneven rows: not exactly)
        # a master, where there is one, is the size of the local shard only
        assert run["master_local"] == (run["ema_local"] if name == "bfloat16" else 0)


@pytest.mark.parametrize("name", list(TRAIN_CONFIGS))
def test_ema_module_evaluates_as_fsdp_module_and_swapped_restores(trained: list[dict], name: str) -> None:
    for run in (result[name] for result in trained):
        assert run["swapped_yields_model"]
        assert run["inside_is_ema"]  # inside the block, the online FSDP model holds the EMA's weights
        assert run["online_restored"] and run["ema_restored"]  # bit for bit, both
        assert torch.equal(run["out_swapped"], run["out_ema"]) and torch.equal(run["out_ema_again"], run["out_ema"])
        torch.testing.assert_close(run["out_ema_end"], run["out_plain_end"])  # not the weights of step MID
        assert not torch.allclose(run["out_ema_end"], run["out_ema"])
    # the EMA module's forward (all-gathering its shards) gives the same output on both ranks (with
    # BatchNorm, each rank's running statistics are its own: not there)
    if not TRAIN_CONFIGS[name][1]:
        assert torch.equal(trained[0][name]["out_ema"], trained[1][name]["out_ema"])


def test_handler_state_dict_communicates_with_no_one(trained: list[dict]) -> None:
    for result in trained:
        assert result["warmup"]["handler_state_keys"] == [
            "ema_model",
            "momentum",
            "num_skipped",
            "num_updates",
            "scheduler_events",
        ]
    kind, keys = trained[0]["refused"]["state_dict_on_one_rank"]
    assert (kind, keys) == ("nothing", "ema_model,num_skipped,num_updates")


def test_refusals_say_why(trained: list[dict]) -> None:
    for result in trained:
        refused = result["refused"]
        for key in ("no_ema_model", "handler_no_ema_model"):
            kind, message = refused[key]
            assert kind == "TypeError", (key, refused[key])
            assert "ema_model=" in message and "deep-copied" in message and "fully_shard" in message
        for key in ("not_sharded", "other_placement", "other_dtype", "other_width"):
            kind, message = refused[key]
            assert kind == "ValueError", (key, refused[key])
            assert "sharded like the model" in message, (key, message)
        assert "Shard(dim=1)" in refused["other_placement"][1]
        assert refused["other_architecture"][0] == "ValueError"
        assert "missing" in refused["other_architecture"][1]
        assert refused["itself"][0] == "ValueError" and "separate module" in refused["itself"][1]


@pytest.mark.parametrize("how", ["dcp", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_is_exact(resumed: list[dict], how: str, dtype: str) -> None:
    for rank, result in enumerate(resumed):
        run = result[f"{how}-{dtype}"]
        assert run["loaded_num_updates"] == MID and type(run["loaded_num_updates"]) is int  # a plain int, still
        a, b = run["uninterrupted"], run["resumed"]
        assert a["num_updates"] == b["num_updates"] == STEPS
        for part in ("online", "ema", "master"):
            assert set(a[part]) == set(b[part])
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (rank, part, k)
        assert bool(a["master"]) == (dtype == "bfloat16")
        if how == "full":
            # set_model_state_dict loads the EMA module: the masters are re-synced from its weights first
            assert run["master_from_weights"]


def test_full_state_dict_without_masters_resumes_within_rounding(resumed: list[dict]) -> None:
    """Saving only the EMA module's (bf16) weights loses the masters' low bits: the resumed masters start
    from the rounded weights. The difference stays within the rounding (half a bf16 ulp, shrinking)."""
    for result in resumed:
        run = result["full-bfloat16-weights-only"]
        a, b = run["uninterrupted"], run["resumed"]
        for k in a["online"]:
            assert torch.equal(a["online"][k], b["online"][k])
        assert any(not torch.equal(a["master"][k], b["master"][k]) for k in a["master"])  # not exact
        for k in a["master"]:
            # at the checkpoint the masters lost at most half a bf16 ulp (<= 2**-8 of the value); the later
            # updates only shrink that: the tensor's scale bounds it
            diff = (a["master"][k] - b["master"][k]).abs()
            assert diff.max() <= 2.0**-8 * a["master"][k].abs().max(), k
        for k in a["ema"]:  # the bf16 weights: by one ulp of the tensor's scale at most, where at all
            x, y = a["ema"][k].float(), b["ema"][k].float()
            assert (x - y).abs().max() <= 2.0**-7 * x.abs().max(), k


# -- examples/fsdp2_ema.py ------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp2_ema.py"


def example_worker(rank: int, world_size: int, ports: list[int], out_dir: str) -> None:
    """The example's main() in this rank, as torchrun starts it: 2 epochs; 1 epoch and a checkpoint, resumed."""
    import importlib.util

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("fsdp2_ema_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ckpt = str(Path(out_dir) / "ckpt")
    results = {}
    for port, (name, argv) in zip(
        ports,
        [
            ("uninterrupted", ["--epochs", "2"]),
            ("first", ["--epochs", "1", "--checkpoint", ckpt]),
            ("resumed", ["--epochs", "2", "--checkpoint", ckpt]),
        ],
        strict=True,
    ):
        rank_env(rank, world_size, port)  # main() starts a process group and destroys it: a new one each time
        results[name] = example.main(argv)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_example_trains_evaluates_and_resumes_exactly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn.datasets")  # imported here, once: the forked ranks inherit it
    ports = [free_port() for _ in range(3)]
    run_ranks(example_worker, nprocs=WORLD, args=(WORLD, ports, str(tmp_path)), timeout=TIMEOUT)
    printed = capfd.readouterr().out
    assert "test accuracy: online" in printed and "resumed from" in printed
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_001", "epoch_002"]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    steps = (1437 // WORLD) // 32  # per epoch: each rank its half of the 1437 training images, full batches
    for r in results:
        uninterrupted, first, resumed = r["uninterrupted"], r["first"], r["resumed"]
        assert uninterrupted["world"] == WORLD
        assert [h["epoch"] for h in uninterrupted["history"]] == [1, 2]
        assert first["history"] == uninterrupted["history"][:1]
        assert resumed["history"] == uninterrupted["history"][1:]  # resumed after epoch 1: the same numbers
        assert uninterrupted["num_updates"] == resumed["num_updates"] == 2 * steps
        assert 2 * resumed["local"] == resumed["full"]  # each rank holds half of the EMA
        assert resumed["history"][0]["ema"] > 0.7  # the EMA module evaluates (after 2 epochs: ~0.81)
    assert results[0]["uninterrupted"]["history"] == results[1]["uninterrupted"]["history"]  # all-reduced


@pytest.mark.skipif(
    not os.environ.get("POLYAK_TEST_TORCHRUN"),
    reason="the example under torchrun itself takes ~10 s (two fresh interpreters): set POLYAK_TEST_TORCHRUN=1",
)
def test_example_under_torchrun(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    command = [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", str(EXAMPLE), "--epochs", "1"]
    command += ["--checkpoint", str(tmp_path / "ckpt")]
    # a session of its own: on timeout, torchrun and its ranks are killed together
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "epoch  1" in out and "test accuracy: online" in out and "EMA elements on rank 0" in out
    assert (tmp_path / "ckpt" / "epoch_001" / ".metadata").exists()


def proposals_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_rank(rank, world_size, port)
    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        data = _batches(rank, STEPS, dtype)

        def make(seed: int, dtype: torch.dtype = dtype) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
            model = _build(dtype, seed)
            return (
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                EMA(model, momentum=0.1, ema_model=_build(dtype, seed + 1)),
            )

        model, optimizer, ema = make(0)
        for batch in data[:MID]:
            _step(model, optimizer, batch)
            ema.update()
        full = ema.full_state_dict()  # every rank: a collective
        online = _full(model.state_dict())
        if rank == 0:
            torch.save({"ema": full, "model": online}, Path(out_dir) / f"{name}.pt")
            torch.save(ema.state_dict(), Path(out_dir) / f"{name}-rank0-shards.pt")  # what ignite's Checkpoint writes
        dist.barrier()
        out[f"{name}-whole"] = all(
            not isinstance(v, DTensor) and v.device.type == "cpu"
            for v in [*full["ema_model"].values(), *full.get("master", {}).values()]
        )
        for batch in data[MID:]:
            _step(model, optimizer, batch)
            ema.update()
        a = _full(ema.state_dict()["ema_model"]), _full(ema.state_dict().get("master", {}))

        model, optimizer, ema = make(10)
        saved = torch.load(Path(out_dir) / f"{name}.pt", weights_only=True)  # every rank reads the whole file
        ema.load_state_dict(saved["ema"])  # each rank keeps its shard
        model.load_state_dict(
            {
                k: distribute_tensor(v, w.device_mesh, w.placements, src_data_rank=None)
                for (k, v), w in zip(saved["model"].items(), model.state_dict().values(), strict=True)
            }
        )
        for batch in data[MID:]:
            _step(model, optimizer, batch)
            ema.update()
        b = _full(ema.state_dict()["ema_model"]), _full(ema.state_dict().get("master", {}))
        out[f"{name}-exact"] = all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
        out[f"{name}-masters"] = len(a[1])

        shards = torch.load(Path(out_dir) / f"{name}-rank0-shards.pt", weights_only=True)
        out[f"{name}-rank0-shards"] = _caught(lambda shards=shards: make(20)[2].load_state_dict(shards))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finish_rank()


def test_full_state_dict_saved_on_rank0_resumes_exactly_on_every_rank(tmp_path: Path) -> None:
    run_ranks(proposals_worker, nprocs=WORLD, args=(WORLD, free_port(), str(tmp_path)), timeout=TIMEOUT)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank, out in enumerate(results):
        for name in ("float32", "bfloat16"):
            assert out[f"{name}-whole"]
            assert out[f"{name}-exact"], (rank, name)  # masters included: bf16 too
            assert out[f"{name}-masters"] == (6 if name == "bfloat16" else 0)
            kind, message = out[f"{name}-rank0-shards"]
            if rank == 0:  # its own shards: they load
                assert kind == "nothing"
            else:  # rank 0's shards are refused, not loaded silently
                assert kind == "ValueError" and "torch.distributed.checkpoint" in message, message
