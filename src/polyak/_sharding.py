"""Sharded tensors: DTensors (FSDP2) and DeepSpeed ZeRO-3 parameters, the sharded path of the core, kept apart
so the rest reads as one process.

A ZeRO-3 parameter holds an empty placeholder between uses and this rank's flat partition in ``p.ds_tensor``
(``p.ds_numel`` elements in all, shaped ``p.ds_shape``, the last partition padded): the EMA of such a parameter
is the EMA of its partition, updated with no collective; only what needs the whole average gathers it."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support
    DTensor = distribute_tensor = FSDPModule = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_zero3(t: object) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (its partition in ``ds_tensor``)."""
    return getattr(t, "ds_tensor", None) is not None and hasattr(t, "ds_shape") and hasattr(t, "ds_numel")


def is_sharded(t: object) -> bool:
    return is_dtensor(t) or is_zero3(t)


def local(t: Tensor) -> Tensor:
    """The tensor an update reads or writes: a DTensor's local shard, a ZeRO-3 parameter's partition, any other
    tensor itself."""
    if is_dtensor(t):
        return t._local_tensor  # type: ignore[attr-defined]
    if is_zero3(t):
        return t.ds_tensor  # type: ignore[attr-defined]
    return t


def is_deepspeed_engine(module: object) -> bool:
    """A DeepSpeed engine (``deepspeed.initialize``'s first result): the model is its ``module``."""
    engine = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)
    return engine is not None and isinstance(module, engine)


# -- ZeRO-3 ---------------------------------------------------------------------------------------------------
def zero_group(param: Tensor) -> Any:
    return getattr(param, "ds_process_group", None)


def zero_whole(part: Tensor, param: Tensor) -> Tensor:
    """The whole tensor (shaped like ``param``) of which ``part`` is this rank's partition, laid out as ZeRO-3
    lays out ``param``'s: gathered from every rank of its group (a collective)."""
    group = zero_group(param)
    world = torch.distributed.get_world_size(group)
    flat = torch.empty(part.numel() * world, dtype=part.dtype, device=part.device)
    torch.distributed.all_gather_into_tensor(flat, part.contiguous().view(-1), group=group)
    return flat[: param.ds_numel].view(param.ds_shape)  # type: ignore[attr-defined]


def zero_part(whole: Tensor, param: Tensor, like: Tensor) -> Tensor:
    """This rank's partition of ``whole`` (a tensor shaped like ``param``), shaped and placed like ``like``
    (its partition) in ``whole``'s dtype: sliced here, no communication."""
    group = zero_group(param)
    rank = torch.distributed.get_rank(group)
    size = like.numel()
    flat = whole.detach().reshape(-1).to(device=like.device)  # in its own dtype (a float32 master stays one)
    out = torch.zeros(size, dtype=flat.dtype, device=like.device)
    start = rank * size
    piece = flat[start : start + size]
    out[: piece.numel()].copy_(piece)
    return out.view(like.shape)


def zero_release(params: Iterable[Tensor]) -> None:
    """Free the gathered data of ZeRO-3 parameters (persistent ones, or those DeepSpeed kept after a forward),
    writing nothing back: the next forward gathers them from the partitions, as they are then."""
    for p in params:
        if p.numel() > 0 and getattr(p, "ds_status", None) is not None and p.ds_status.name == "AVAILABLE":  # type: ignore[attr-defined]
            p.partition(has_been_updated=False)  # type: ignore[attr-defined]


def zero_copy_into(target: nn.Module, ema: nn.Module, partitioned: dict[str, Tensor]) -> None:
    """Copy an EMA model into a ZeRO-3 module (the model itself, say, at the end of training): each partitioned
    parameter takes this rank's partition (the EMA's own where the EMA is partitioned alike, else sliced from
    its whole tensor), whatever DeepSpeed keeps gathered is freed; buffers and whole parameters are copied."""
    own = dict(ema.named_parameters()) | dict(ema.named_buffers())
    theirs = dict(target.named_parameters()) | dict(target.named_buffers())
    if set(own) != set(theirs):
        raise ValueError(
            f"module does not match the EMA model: missing {sorted(set(own) - set(theirs))}, "
            f"unexpected {sorted(set(theirs) - set(own))}"
        )
    with torch.no_grad():
        for name, t in theirs.items():
            source = own[name].detach()
            if not is_zero3(t):
                t.copy_(source)
                continue
            part = local(t)
            if name not in partitioned:  # the EMA holds it whole
                source = zero_part(source, t, part)
            if source.shape != part.shape:
                raise ValueError(
                    f"module's {name!r} is partitioned by ZeRO-3 in {part.numel()} elements here, the EMA's "
                    f"partition has {source.numel()}: the module must be partitioned like the model"
                )
            part.copy_(source)
        zero_release(p for p in target.parameters() if is_zero3(p))


def zero_rank() -> tuple[int, int]:
    """This rank and the world size, where a process group runs (else ``(0, 1)``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
