"""Flat mode: the averaged tensors of both models become views into one buffer per group, unseen by users.

Each tensor keeps its object (an optimizer built before or after keeps working) and its memory layout
(channels_last stays channels_last); tensors whose storage the user shares with others stay as they are;
buffers are made outside ``torch.inference_mode`` (parameters must stay normal tensors); tensors already
laid out one after the other in one buffer (by another EMA of the same model) are used where they lie.
``state_dict()`` of the modules concerned returns copies, so that a saved submodule holds itself only.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from polyak import _kernels
from polyak._kernels import dense_strides, split_views
from polyak._tracking import Pair


def _owns_storage(t: Tensor) -> bool:
    """Whether ``t`` alone uses its storage, laid out densely: then it can move into a flat buffer unseen."""
    return (
        t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        and t.stride() == dense_strides(t)
    )


def flattenable(members: list[Pair], ours: set[int]) -> tuple[list[Pair], list[Pair]]:
    """Pairs whose tensors can be flattened (or already are, alike), and the rest (e.g. storage the user
    shares between tensors, which flattening would split). A tensor in one of ``ours`` (flat buffers made
    before) moves freely."""
    if _flat_span(members) is not None and all(p.online.stride() == p.ema.stride() for p in members):
        return members, []  # (element for element: a flat lerp pairs the two buffers in memory order)

    def movable(t: Tensor) -> bool:
        return _owns_storage(t) or (t.untyped_storage().data_ptr() in ours and t.stride() == dense_strides(t))

    ok, rest = [], []
    for p in members:
        alone = movable(p.online) and movable(p.ema)
        (ok if alone and p.online.stride() == p.ema.stride() else rest).append(p)
    return ok, rest


def gatherable(members: list[Pair], ours: set[int]) -> tuple[list[Pair], list[Pair]]:
    """Pairs of small 1-D tensors (under ``GATHER_MAX`` elements) whose EMA side can be flattened, if there
    are at least ``GATHER_MIN`` of them; and the rest."""
    if _span([p.ema for p in members]) is not None:
        movable = [True] * len(members)
    else:
        movable = [
            _owns_storage(p.ema) or (p.ema.untyped_storage().data_ptr() in ours and p.ema.stride() == (1,))
            for p in members
        ]
    small, rest = [], []
    for p, ok in zip(members, movable, strict=True):
        fits = ok and p.online.dim() == p.ema.dim() == 1 and 0 < p.online.numel() < _kernels.GATHER_MAX
        (small if fits else rest).append(p)
    if len(small) < _kernels.GATHER_MIN:
        return [], members
    return small, rest


def _flat_span(members: list[Pair]) -> Tensor | None:
    """Where both models' tensors already lie one after the other in one buffer each (flattened by this or
    another EMA of the same model), nothing needs to move."""
    for side in ("online", "ema"):
        tensors = [getattr(p, side) for p in members]
        if _span(tensors) is None:
            return None
    return _span([p.online for p in members])


def _span(tensors: list[Tensor]) -> Tensor | None:
    storage = tensors[0].untyped_storage()
    offset = tensors[0].storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset:
            return None
        if t.stride() != dense_strides(t):
            return None
        offset += t.numel()
    first = tensors[0]
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, first.storage_offset(), (offset - first.storage_offset(),), (1,)
    )


def flatten(tensors: list[Tensor]) -> Tensor:
    """Make ``tensors`` views into one new buffer (each keeping its layout), keeping their objects; or, where
    they already lie one after the other in one buffer, use that."""
    span = _span(tensors)
    if span is not None:
        return span
    with torch.inference_mode(False), torch.no_grad():  # parameters must stay normal tensors
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
        for t, view in zip(tensors, split_views(flat, tensors), strict=True):
            view.copy_(t)
            t.data = view  # the same object, now backed by the flat buffer
    return flat


def scripted_owners(modules: list[nn.Module], names: list[str]) -> set[str]:
    """Those of ``names`` (tensors of each of ``modules``) whose owning module is a TorchScript module in any."""
    out = set()
    for name in names:
        owner = name.rpartition(".")[0]
        if any(isinstance(m.get_submodule(owner), torch.jit.ScriptModule) for m in modules):
            out.add(name)
    return out


def compact_state_dicts(module: nn.Module, names: list[str]) -> None:
    """``state_dict()`` of the modules holding flattened tensors (under any name: a tied weight's every owner)
    returns copies, each with its own storage, so that ``torch.save`` of a submodule's state writes that
    submodule only and safetensors accepts it; a tensor held under several names is copied once, so that the
    names stay tied in the state dict (as safetensors' ``save_model`` expects)."""
    flattened = set()
    for name in names:
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        t = sub._parameters.get(leaf, sub._buffers.get(leaf))
        if t is not None:
            flattened.add(id(t))
    for _, sub in module.named_modules(remove_duplicate=False):
        held = any(id(t) in flattened for t in itertools.chain(sub._parameters.values(), sub._buffers.values()))
        if held and not getattr(sub, "_polyak_compact_state_dict", False):
            sub.register_state_dict_post_hook(_compact)
            sub._polyak_compact_state_dict = True  # type: ignore[assignment]


# id of a module's tensor -> (it, the state dict being filled, the copy of it there), weakly: the copy made for
# one name of a tensor is the one its other names get in the same state_dict() call; nothing is kept past it
_COPIES: dict[int, tuple[weakref.ref, weakref.ref, weakref.ref]] = {}
_PRUNE_AT = 64


def _copy_of(source: Tensor, value: Tensor, state_dict: dict[str, Any]) -> Tensor:
    made = _COPIES.get(id(source))
    if made is not None and made[0]() is source and made[1]() is state_dict:
        copy = made[2]()
        if copy is not None:
            return copy
    copy = value.clone()
    global _PRUNE_AT
    if len(_COPIES) >= _PRUNE_AT:  # the entries of tensors gone (an EMA dropped), at each doubling: O(1) a copy
        for key in [k for k, (t, _, _) in _COPIES.items() if t() is None]:
            del _COPIES[key]
        _PRUNE_AT = max(64, 2 * len(_COPIES))
    _COPIES[id(source)] = (weakref.ref(source), weakref.ref(state_dict), weakref.ref(copy))
    return copy


def _compact(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name in itertools.chain(module._parameters, module._buffers):
        key = prefix + name
        value = state_dict.get(key)
        source = module._parameters.get(name, module._buffers.get(name))
        if (
            isinstance(value, Tensor)
            and source is not None
            and not isinstance(value, nn.Parameter)  # keep_vars=True: the caller asked for the objects
            and value is not module._buffers.get(name)
            and value.untyped_storage().nbytes() > value.numel() * value.element_size()
        ):
            state_dict[key] = _copy_of(source, value, state_dict)
