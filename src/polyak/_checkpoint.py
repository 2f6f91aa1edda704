"""An EMA's checkpoint: what :meth:`polyak.EMA.state_dict` holds, and its load, checked whole before anything
is written."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from polyak import _sharding as sharding
from polyak._tracking import averaged_kind, unwrap_model

if TYPE_CHECKING:
    from polyak.ema import EMA


def collect(ema: EMA) -> dict[str, Any]:
    shared = {p.name for p in ema._plan.swap_pairs(roles=("share",))}  # the model's own tensors: not saved
    tensors = unwrap_model(ema.ema_model).state_dict()
    state: dict[str, Any] = {
        "num_updates": ema.num_updates,
        "num_skipped": ema.num_skipped,
        "ema_model": OrderedDict((k, v) for k, v in tensors.items() if k not in shared) if shared else tensors,
    }
    masters = ema._plan.master_views(saving=True)
    if masters:
        state["master"] = masters
    generator = ema._lasting.generator
    if generator is not None:
        state["generator"] = generator.get_state()
    if ema._plan.zero:  # this rank's ZeRO-3 partitions: they load on this rank only
        rank, world = sharding.zero_rank()
        state["zero"] = {"rank": rank, "world_size": world}
    return state


def load(ema: EMA, state_dict: Mapping[str, Any]) -> None:
    """Everything is checked, then written; a module's load that fails late is put back."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    missing = {"num_updates", "ema_model"} - set(state_dict)
    if missing:
        raise ValueError(f"state_dict lacks {sorted(missing)}; it has {sorted(state_dict)}")
    counts = {key: _plain_count(state_dict, key) for key in ("num_updates", "num_skipped") if key in state_dict}
    plan = ema._plan
    module = unwrap_model(ema.ema_model)
    own = module.state_dict()
    shared = {p.name for p in plan.swap_pairs(roles=("share",))}  # the model's data: not the EMA's to load
    given = state_dict["ema_model"]
    if shared and isinstance(given, Mapping) and not shared <= set(given):  # saved without them (state_dict())
        state_dict = {**state_dict, "ema_model": {**{k: own[k] for k in shared if k not in given}, **given}}
    if plan.zero:
        state_dict = _zero_parts(state_dict, plan.zero, own)
    check_tensors("state_dict['ema_model']", state_dict["ema_model"], own)
    ema_state = {
        k: sharding.shard_like(t, own[k]) if isinstance(own[k], Tensor) else t
        for k, t in state_dict["ema_model"].items()
    }
    masters = state_dict.get("master")
    if masters is not None:
        if not isinstance(masters, Mapping):
            raise TypeError(f"state_dict['master'] must be a mapping, got {type(masters).__name__}")
        unknown = sorted(set(masters) - set(own))
        lacking = sorted(set(plan.master_views()) - set(masters))
        if unknown or lacking:
            raise ValueError(
                f"state_dict['master'] does not match the EMA model: missing {lacking}, unexpected {unknown}"
            )
        check_tensors("state_dict['master']", masters, {k: own[k] for k in masters})
        # Whole tensors (full_state_dict()) give this rank's shard; and the masters may be our own (a state dict
        # loaded in place, as torch.distributed.checkpoint does, or ema.load_state_dict(ema.state_dict())): keep
        # their values first.
        masters = {k: sharding.shard_like(t, own[k], copy=True) for k, t in masters.items()}
    generator = state_dict.get("generator")
    own_generator = ema._lasting.generator
    if generator is not None and own_generator is not None:
        own_state = own_generator.get_state()
        if (
            not isinstance(generator, Tensor)
            or generator.dtype != own_state.dtype
            or generator.shape != own_state.shape
        ):
            got = f"{generator.dtype} {tuple(generator.shape)}" if isinstance(generator, Tensor) else generator
            raise ValueError(
                f"state_dict['generator'] must be a generator state ({own_state.dtype} {tuple(own_state.shape)}), "
                f"got {got!r}"
            )
    loaded = {k: v for k, v in ema_state.items() if k not in shared}

    with torch.no_grad():
        backup = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in own.items() if k in loaded}
        try:
            module.load_state_dict(loaded, strict=False)  # copies into the EMA model's own tensors
        except BaseException:
            module.load_state_dict(backup, strict=False)
            raise
        # the average itself: the saved masters, else the saved values as they were (a float32 EMA model's values
        # are exact for a master; rounding them into a bf16 EMA model first would lose bits)
        for k in plan.kernels:
            k.refetch()
            for i, name in enumerate(k.names):
                value = masters.get(name) if masters is not None else None
                value = sharding.local(ema_state[name] if value is None else value)
                if k.has_master:
                    k.write_master(i, value)
                    if k.master is not None:  # the EMA model shows the loaded average, as an update leaves it
                        k.ema.views[i].copy_(k.master.views[i])
                else:
                    k.ema.views[i].copy_(value)
    if generator is not None and own_generator is not None:
        own_generator.set_state(generator)
    ema.num_updates = counts["num_updates"]
    ema.num_skipped = counts.get("num_skipped", 0)
    plan.record_versions()


def _zero_parts(state_dict: Mapping[str, Any], zero: dict[str, Tensor], own: Mapping[str, Any]) -> Mapping[str, Any]:
    """A state for a ZeRO-3 EMA: this rank's partitions as saved by it (refused on another rank), or whole
    tensors (``full_state_dict()``, an EMA of one process), of which this rank's partitions are taken."""
    saved = state_dict.get("zero")
    rank, world = sharding.zero_rank()
    if saved is not None:
        if saved != {"rank": rank, "world_size": world}:
            raise ValueError(
                f"state_dict holds the ZeRO-3 partitions of rank {saved.get('rank')!r} of "
                f"{saved.get('world_size')!r} (state_dict['zero']); this is rank {rank} of {world}. Load each "
                "rank's own state on it, or save the whole EMA with full_state_dict(), which loads on any number "
                "of ranks"
            )
        return state_dict

    def parts(tensors: object) -> object:
        if not isinstance(tensors, Mapping):
            return tensors
        out = {}
        for k, v in tensors.items():
            if k in zero and isinstance(v, Tensor):
                whole = tuple(zero[k].ds_shape)  # type: ignore[attr-defined]
                if tuple(v.shape) != whole:  # a partition without its rank: which one, nobody can tell
                    raise ValueError(
                        f"state_dict[...][{k!r}] must be the whole tensor, of shape {whole}, got {tuple(v.shape)}: "
                        "a state of ZeRO-3 partitions says whose they are (state_dict['zero'], as EMA.state_dict() "
                        "writes it); save the whole EMA with full_state_dict()"
                    )
                v = sharding.zero_part(v, zero[k], own[k])
            out[k] = v
        return out

    out = dict(state_dict)
    out["ema_model"] = parts(state_dict["ema_model"])
    if "master" in state_dict:
        out["master"] = parts(state_dict["master"])
    return out


def _plain_count(state_dict: Mapping[str, Any], key: str) -> int:
    value = state_dict[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {value!r}")
    return value


def check_tensors(what: str, tensors: object, own: Mapping[str, Any]) -> None:
    """``tensors`` must name exactly ``own``'s entries, each a tensor of its shape and kind, with values (or, for
    a module's extra state, whatever the module saved: its ``set_extra_state`` checks it)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(tensors).__name__}")
    if set(tensors) != set(own):
        raise ValueError(
            f"{what} does not match the EMA model: missing {sorted(set(own) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(own))}"
        )
    for name, t in tensors.items():
        if not isinstance(own[name], Tensor):
            continue
        if not isinstance(t, Tensor) or t.shape != own[name].shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what}[{name!r}] must be a tensor of shape {tuple(own[name].shape)}, got {got}")
        if t.device.type == "meta":
            raise ValueError(f"{what}[{name!r}] is a tensor on the meta device: it holds no values to load")
        if averaged_kind(t) != averaged_kind(own[name]) or (t.is_complex() and not own[name].is_complex()):
            raise ValueError(f"{what}[{name!r}] must hold values of {own[name].dtype}, got {t.dtype}")
        sharding.check_shard_origin(what, name, t, own[name])
