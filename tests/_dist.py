"""Helpers for multi-process tests: a free port, spawned ranks with a timeout, and the DDP worker.

The worker lives in an importable module (not a test file) so that ``spawn`` children import little.
Also: :func:`rank_env` / :func:`init_rank` / :func:`finish_rank` for the body of a rank,
:func:`run_session` for launchers that start processes of their own (``ignite.distributed.Parallel``),
and :func:`no_collectives`, which makes any collective call raise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
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


def run_program(command: Sequence[str], cwd: Path, timeout: float = 240) -> str:
    """Run ``command`` (with this checkout's ``src`` first on the path) in a session of its own, so that on a
    timeout it and the ranks it started are killed together; its output, asserting it succeeded."""
    import subprocess

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-5000:]
    return out


def rank_env(rank: int, world_size: int, port: int) -> None:
    """The environment variables torchrun sets (``env://`` rendezvous on 127.0.0.1:``port``)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )


def init_rank(rank: int, world_size: int, port: int, timeout: float = 30.0) -> None:
    """First thing in a rank: one thread (see :func:`run_ranks`), then a gloo process group on ``port``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank_env(rank, world_size, port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))


def finish_rank(*keep_alive: object, destroy: bool = True) -> None:
    """Last thing in a rank that went well: wait for the others, then destroy the process group.

    The objects given (DDP and FSDP modules, optimizers, ...) are never finalised: see the end of
    :func:`ddp_worker` for the deadlock that destroying them next to the process group can cause.
    ``destroy=False`` where a launcher destroys the process group itself (``ignite.distributed.Parallel``).
    """
    import torch.distributed as dist

    _KEEP_ALIVE.extend(keep_alive)
    dist.barrier()
    time.sleep(0.1)  # lets gloo's threads release their finished work (sleep releases the GIL)
    if destroy:
        dist.destroy_process_group()


def _session_main(target: Callable[..., None], args: Sequence[object]) -> None:
    os.setsid()  # a process group of its own: the timeout kills it and everything it started
    target(*args)


def run_session(target: Callable[..., None], args: Sequence[object], timeout: float) -> None:
    """Run ``target(*args)`` in one forked, non-daemonic process that may start processes of its own.

    For launchers such as ``ignite.distributed.Parallel(nproc_per_node=...)``, which start the ranks
    themselves and wait for them without a timeout. The process leads a session of its own; on timeout
    that whole process group (the launcher and its ranks) is killed and ``TimeoutError`` raised;
    ``RuntimeError`` if it exits with a non-zero code (its traceback is on stderr).
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    proc = ctx.Process(target=_session_main, args=(target, args), daemon=False)
    proc.start()
    try:
        proc.join(timeout)
        if proc.is_alive():
            raise TimeoutError(f"{getattr(target, '__name__', target)} still running after {timeout} s")
        if proc.exitcode != 0:
            raise RuntimeError(f"{getattr(target, '__name__', target)} exited with code {proc.exitcode}")
    finally:
        if proc.is_alive() or proc.exitcode != 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group led by the process we started
            proc.join(5)


# What a rank may call to communicate, by name in torch.distributed.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "irecv",
    "isend",
    "monitored_barrier",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
)


@contextlib.contextmanager
def no_collectives() -> Iterator[None]:
    """Inside the block, any collective or point-to-point call of ``torch.distributed`` raises.

    Functional collectives (``torch.distributed._functional_collectives``, which DTensor uses) are not
    caught: to show that nothing communicates, also run the block on one rank only, so that a collective
    there would find no partner.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    saved: list[tuple[object, str, object]] = []

    def forbidden(name: str) -> Callable[..., None]:
        def call(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"torch.distributed.{name} called where no communication is expected")

        return call

    for module in (dist, c10d):
        for name in COLLECTIVES:
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, forbidden(name))
    try:
        yield
    finally:
        for module, name, fn in reversed(saved):
            setattr(module, name, fn)


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str, flat: bool = False) -> None:
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
            ddp, momentum=DDP_MOMENTUM, momentum_warmup=DDP_MOMENTUM_WARMUP, warmup_iters=DDP_WARMUP_ITERS, flat=flat
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
            "online_storages": len({p.untyped_storage().data_ptr() for p in ddp.module.parameters()}),
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
