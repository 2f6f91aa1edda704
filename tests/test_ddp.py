"""DistributedDataParallel: EMA and EMAHandler on 2 gloo ranks started by ``ignite.distributed.Parallel``.

One launch (a module-scoped fixture; ``Parallel(start_method="fork")`` in a process of its own, killed with
everything it started on timeout) runs, on each rank:

* a training of a model wrapped by ``idist.auto_model`` (a DDP), with EMAHandler in an ignite Engine and
  ignite's ``Checkpoint`` saving on rank 0 after each epoch; then fresh objects on every rank load the
  checkpoint of epoch 1 and train on;
* ``swapped()`` on the DDP model;
* EMA, EMAHandler and their state dicts on rank 0 alone, with every collective forbidden: the EMA of a DDP
  model needs no communication.

The tests check what the ranks recorded: the same EMA, bit for bit, on both ranks, equal to a reference
over the recorded online weights; resume equal to the uninterrupted run; swapped() exact.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch.nn.parallel import DistributedDataParallel

from _dist import finish_rank, free_port, no_collectives, run_session
from polyak import EMA, EMAHandler

WORLD = 2
EPOCHS = 2
BATCHES = 3  # per epoch and rank
MOMENTUM, MOMENTUM_WARMUP, WARMUP_ITERS = 0.05, 0.5, 4
TIMEOUT = 120


# -- in the ranks ---------------------------------------------------------------------------------------


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _training(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Engine, EMAHandler, list]:
    model = idist.auto_model(_net(seed))  # a DDP on 2 ranks; the same initial weights on both (DDP broadcasts)
    optimizer = idist.auto_optim(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5))
    online: list[dict[str, torch.Tensor]] = []

    def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        model.train()
        optimizer.zero_grad()
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        online.append(_state(model.module))
        return loss.item()

    trainer = Engine(step)
    handler = EMAHandler(model, momentum=MOMENTUM, momentum_warmup=MOMENTUM_WARMUP, warmup_iters=WARMUP_ITERS)
    handler.attach(trainer)
    return model, optimizer, trainer, handler, online


def _data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    return [
        (torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64))
        for _ in range(BATCHES)
    ]


def rank_main(local_rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = idist.get_rank()
    out = Path(out_dir)
    data = _data(rank)
    result: dict[str, Any] = {"world_size": idist.get_world_size(), "backend": idist.backend()}

    # uninterrupted, checkpointed by ignite's Checkpoint after every epoch (written on rank 0 only)
    model, optimizer, trainer, handler, online = _training(seed=0)
    initial = _state(model.module)
    momenta: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: momenta.append(e.state.ema_momentum))
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "ema": handler}
    checkpoint = Checkpoint(to_save, DiskSaver(out / "checkpoints", require_empty=False), n_saved=None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    trainer.run(data, max_epochs=EPOCHS)
    result.update(
        auto_model_is_ddp=isinstance(model, DistributedDataParallel),
        model_is_module=handler.model is model.module,
        ema_model_type=type(handler.ema_model).__name__,
        initial=initial,
        online=online,
        momenta=momenta,
        ema=_state(handler.ema_model),
        num_updates=handler.ema.num_updates,
        ema_momentum=trainer.state.ema_momentum,
        saved=sorted(p.name for p in (out / "checkpoints").iterdir()) if rank == 0 else None,
    )

    # swapped() on the DDP model: its forward runs on the EMA's weights inside, the online ones after
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        out_ema = handler.ema_model(x)
        with handler.swapped() as swapped_model:
            out_swapped = model(x)
        out_online = model(x)
    result.update(
        swapped_yields_module=swapped_model is model.module,
        swapped_equal=torch.equal(out_swapped, out_ema),
        online_restored=all(torch.equal(v, online[-1][k]) for k, v in model.module.state_dict().items()),
        ema_restored=all(torch.equal(v, result["ema"][k]) for k, v in handler.ema_model.state_dict().items()),
        online_after_is_online=torch.equal(out_online, model.module(x)) and not torch.equal(out_online, out_ema),
    )

    # resume on every rank from the checkpoint of epoch 1 (written by rank 0: wait for it)
    idist.barrier()
    model2, optimizer2, trainer2, handler2, _ = _training(seed=1)
    to_load = {"model": model2, "optimizer": optimizer2, "trainer": trainer2, "ema": handler2}
    Checkpoint.load_objects(to_load=to_load, checkpoint=str(out / "checkpoints" / f"checkpoint_{BATCHES}.pt"))
    result["resumed_num_updates_at_load"] = handler2.ema.num_updates
    trainer2.run(data, max_epochs=EPOCHS)
    result.update(
        resumed_online=_state(model2.module),
        resumed_ema=_state(handler2.ema_model),
        resumed_num_updates=handler2.ema.num_updates,
        resumed_ema_momentum=trainer2.state.ema_momentum,
    )

    # nothing communicates: rank 0 alone builds, updates, swaps and checkpoints EMAs of the DDP model
    idist.barrier()
    if rank == 0:
        with no_collectives():
            ema = EMA(model, momentum=0.1, skip_nonfinite=True)
            ema.update()
            with ema.swapped():
                pass
            ema.load_state_dict(ema.state_dict())
            handler.load_state_dict(handler.state_dict())
            handler.ema.update()
        result["alone_ok"] = ema.model is model.module and ema.num_updates == 1
    torch.save(result, out / f"rank{rank}.pt")
    finish_rank(model, model2, trainer, trainer2, handler, handler2, optimizer, optimizer2, destroy=False)


def launch(out_dir: str, port: int) -> None:
    with idist.Parallel(
        backend="gloo", nproc_per_node=WORLD, master_port=port, start_method="fork"
    ) as parallel:  # fork: the ranks inherit torch and ignite instead of importing them again
        parallel.run(rank_main, out_dir)


# -- in the parent --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    try:
        run_session(launch, (str(out), free_port()), timeout=TIMEOUT)
    except Exception:
        pytest.fail(f"the ranks failed:\n{traceback.format_exc()}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _warmup(k: int) -> float:
    """The seed's linear warm-up, written out independently of polyak.schedules."""
    m = MOMENTUM_WARMUP + (MOMENTUM - MOMENTUM_WARMUP) * (k - 1) / max(1, WARMUP_ITERS - 1)
    return max(MOMENTUM, m)


def test_ema_of_auto_model_averages_module_identically_on_every_rank(ranks: list[dict]) -> None:
    steps = EPOCHS * BATCHES
    for r in ranks:
        assert (r["world_size"], r["backend"]) == (WORLD, "gloo")
        assert r["auto_model_is_ddp"] and r["model_is_module"]
        assert r["ema_model_type"] == "Sequential"  # a copy of model.module, not a DDP
        assert r["num_updates"] == steps == len(r["online"])
        assert r["momenta"] == pytest.approx([_warmup(k) for k in range(1, steps + 1)], rel=1e-15)
        # the reference: the core's lerp_, over the recorded online weights
        ref = {k: v.clone() for k, v in r["initial"].items()}
        for theta, m in zip(r["online"], r["momenta"], strict=True):
            for k in ref:
                ref[k].lerp_(theta[k], m)
        for k, v in r["ema"].items():
            assert torch.equal(v, ref[k]), k
            assert not torch.equal(v, r["online"][-1][k]) and not torch.equal(v, r["initial"][k])
    r0, r1 = ranks
    for k in r0["ema"]:  # DDP keeps the online models in sync: the EMAs are the same, bit for bit
        assert torch.equal(r0["initial"][k], r1["initial"][k])
        assert torch.equal(r0["online"][-1][k], r1["online"][-1][k])
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k


def test_checkpoint_saved_on_rank0_resumes_exactly_on_every_rank(ranks: list[dict]) -> None:
    # named by iteration, on rank 0 only (the directory is shared: rank 1 wrote nothing there)
    assert ranks[0]["saved"] == [f"checkpoint_{e * BATCHES}.pt" for e in range(1, EPOCHS + 1)]
    for r in ranks:
        assert r["resumed_num_updates_at_load"] == BATCHES
        assert r["resumed_num_updates"] == r["num_updates"] == EPOCHS * BATCHES
        assert r["resumed_ema_momentum"] == r["ema_momentum"]
        for k in r["ema"]:
            assert torch.equal(r["resumed_ema"][k], r["ema"][k]), k
            assert torch.equal(r["resumed_online"][k], r["online"][-1][k]), k


def test_swapped_on_ddp_model(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["swapped_yields_module"]  # the model the handler averages: ddp.module
        assert r["swapped_equal"]  # the DDP's forward inside: the EMA module's output, bit for bit
        assert r["online_restored"] and r["ema_restored"]
        assert r["online_after_is_online"]


def test_ema_of_ddp_model_communicates_with_no_one(ranks: list[dict]) -> None:
    assert ranks[0]["alone_ok"]
    assert "alone_ok" not in ranks[1]
