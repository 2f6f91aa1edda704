"""DTensor (FSDP2) helpers: the sharded path of the core, kept apart so the rest reads as one process."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support
    DTensor = distribute_tensor = FSDPModule = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor an update reads or writes: a DTensor's local shard, any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def describe(t: Tensor) -> str:
    where = f"{t.dtype} {tuple(t.shape)} on {t.device}"
    if is_dtensor(t):
        where += f", sharded {tuple(t.placements)} over {t.device_mesh}, local {tuple(local(t).shape)}"  # type: ignore[attr-defined]
    return where


def same_sharding(a: Tensor, b: Tensor) -> bool:
    if is_dtensor(a) != is_dtensor(b):
        return False
    if not is_dtensor(a):
        return True
    return (
        a.placements == b.placements  # type: ignore[attr-defined]
        and a.device_mesh == b.device_mesh  # type: ignore[attr-defined]
        and local(a).shape == local(b).shape
    )


def check_alike(name: str, online: Tensor, ema: Tensor) -> None:
    """``ema_model`` given by the user must hold its tensors exactly as the model does, sharding included."""
    if online.shape != ema.shape or online.dtype != ema.dtype or not same_sharding(online, ema):
        raise ValueError(
            f"ema_model must be built and sharded like the model: its tensor {name!r} is {describe(ema)}, "
            f"the model's is {describe(online)}"
        )


def whole(t: Tensor) -> Tensor:
    """A copy of ``t`` on the CPU; gathered whole if it is a DTensor (a collective)."""
    return (t.full_tensor() if is_dtensor(t) else t).detach().to("cpu", copy=True)  # type: ignore[attr-defined]


def shard_like(t: Tensor, own: Tensor, copy: bool = False) -> Tensor:
    """A whole tensor given for a sharded one: this rank's shard of it, sliced here (no communication)."""
    if is_dtensor(own) and isinstance(t, Tensor) and not is_dtensor(t):
        return distribute_tensor(t.to(own.device), own.device_mesh, own.placements, src_data_rank=None)  # type: ignore[attr-defined]
    return t.detach().clone() if copy and isinstance(t, Tensor) else t


def as_dtensor_like(view: Tensor, like: Tensor) -> Tensor:
    """``view`` (a local shard) as a DTensor sharded like ``like``."""
    return DTensor.from_local(
        view,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),  # type: ignore[attr-defined]
    )


def check_shard_origin(what: str, name: str, t: Tensor, own: Tensor) -> None:
    """A shard saved by one rank must not be loaded on another: say so, and how to checkpoint instead."""
    if not (is_dtensor(t) and is_dtensor(own)):
        return
    mine, theirs = own.device_mesh.get_coordinate(), t.device_mesh.get_coordinate()  # type: ignore[attr-defined]
    if mine != theirs or t.placements != own.placements:  # type: ignore[attr-defined]
        raise ValueError(
            f"{what}[{name!r}] is the shard of the rank at {theirs} of its mesh, sharded "
            f"{tuple(t.placements)}; this rank is at {mine}, sharded {tuple(own.placements)}. "  # type: ignore[attr-defined]
            "A sharded EMA's state_dict() holds this rank's shards only: one saved on one rank (ignite's "
            "Checkpoint writes rank 0's) cannot be loaded on the others. Save it with "
            "torch.distributed.checkpoint (every rank its shards), or whole with full_state_dict()"
        )


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules in ``module``, whose parameters :func:`reshard` frees."""
    return [m for m in module.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]


def reshard(modules: Iterable[nn.Module]) -> None:
    """Free FSDP2's unsharded parameters, so that the next forward gathers the shards anew.

    After a forward outside of training (an evaluation), FSDP2 keeps the root's parameters unsharded, and the
    next forward reuses them: without this, it would not see what an update or a swap wrote into the shards.
    """
    for m in modules:
        m.reshard()  # type: ignore[operator]


def all_ranks_agree(flag: Tensor) -> Tensor:
    """``flag`` (a bool) and-ed over all ranks, where a process group runs (each rank sees only its shards)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = flag.to(torch.int32)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return value.bool()
    return flag
