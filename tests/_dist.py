"""Helpers for multi-process tests: a free port, spawned ranks with a timeout, and the DDP worker.

The worker lives in an importable module (not a test file) so that ``spawn`` children import little.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

DDP_STEPS = 6
DDP_MOMENTUM = 0.05
DDP_MOMENTUM_WARMUP = 0.5
DDP_WARMUP_ITERS = 4

# Objects of a finished rank that must never be destroyed: see the end of ddp_worker.
_KEEP_ALIVE: list[object] = []


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    target: Callable[..., None],
    nprocs: int,
    args: Sequence[object],
    timeout: float,
    start_method: str | None = None,
) -> None:
    """Run ``target(rank, *args)`` in ``nprocs`` processes; kill them all and raise on timeout.

    ``start_method`` defaults to ``"fork"`` where there is one: the ranks inherit the imported torch and
    ignite instead of importing them again (seconds each on a small machine). ``target`` must call
    ``torch.set_num_threads(1)`` before any tensor work, as DataLoader workers do, so that no OpenMP pool
    inherited from the parent is used. ``POLYAK_TEST_START_METHOD`` overrides the default.

    Raises ``TimeoutError`` if they are not done within ``timeout`` seconds, ``RuntimeError`` if one exits
    with a non-zero code (its traceback is on stderr).
    """
    if start_method is None:
        start_method = os.environ.get("POLYAK_TEST_START_METHOD") or (
            "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        )
    ctx = mp.get_context(start_method)
    procs = [ctx.Process(target=target, args=(rank, *args), daemon=True) for rank in range(nprocs)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [rank for rank, p in enumerate(procs) if p.is_alive()]
        if alive:
            raise TimeoutError(f"ranks {alive} still running after {timeout} s")
        failed = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode != 0}
        if failed:
            raise RuntimeError(f"ranks exited with non-zero codes {failed}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One DDP rank: same seeded model, its own data, a few SGD steps in an ignite Engine with EMAHandler.

    Writes ``rank{rank}.pt`` with the initial weights, the online weights after every step, the momentum
    of every update, the final EMA state dict and a few facts about the handler.
    """
    import torch.distributed as dist
    from ignite.engine import Engine, Events
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from polyak import EMAHandler

    torch.set_num_threads(1)  # first: see run_ranks
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(0)  # same initial model on every rank
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2)
        g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
        data = [
            (torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64))
            for _ in range(DDP_STEPS)
        ]
        online: list[dict[str, torch.Tensor]] = []
        momenta: list[float] = []

        def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
            ddp.train()
            optimizer.zero_grad()
            x, y = batch
            loss = (ddp(x) - y).pow(2).mean()
            loss.backward()
            optimizer.step()
            online.append({k: v.detach().clone() for k, v in ddp.module.state_dict().items()})
            return loss.item()

        trainer = Engine(step)
        handler = EMAHandler(
            ddp, momentum=DDP_MOMENTUM, momentum_warmup=DDP_MOMENTUM_WARMUP, warmup_iters=DDP_WARMUP_ITERS
        )
        handler.attach(trainer)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: momenta.append(e.state.ema_momentum))
        trainer.run(data, max_epochs=1)

        result = {
            "initial": initial,
            "online": online,
            "momenta": momenta,
            "ema": {k: v.detach().clone() for k, v in handler.ema_model.state_dict().items()},
            "num_updates": handler.ema.num_updates,
            "model_is_module": handler.model is ddp.module,
            "ema_model_type": type(handler.ema_model).__name__,
            "ema_model_training": handler.ema_model.training,
            "ema_shares_storage": any(
                e.data_ptr() == o.data_ptr()
                for e, o in zip(handler.ema_model.parameters(), ddp.module.parameters(), strict=True)
            ),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")

        # Teardown. Destroying a gloo process group (the DDP reducer holds the last reference) joins gloo's
        # threads while holding the GIL; a thread still releasing its last finished work needs the GIL:
        # a deadlock, seen under load. So wait until both ranks are past every collective, give those
        # threads time (sleep releases the GIL), and never destroy the DDP at all: a forked rank leaves
        # through os._exit, so objects kept alive here are not finalised.
        dist.barrier()
        time.sleep(0.2)
        _KEEP_ALIVE.extend([ddp, trainer, handler, optimizer])
    finally:
        dist.destroy_process_group()
