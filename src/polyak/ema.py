"""The EMA core: one fused update per (device, dtype) group, on tensor lists built once."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from polyak.schedules import Schedule, _check_momentum, constant

__all__ = ["EMA"]

HANDLE_BUFFERS = ("copy", "update", "ema_train")
_DEFAULT_MOMENTUM = 0.0002


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose tensors are averaged: ``model.module`` for DataParallel and DistributedDataParallel."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


@dataclass
class _Group:
    """Tensors of one (device, dtype): the EMA side are views into ``storage``, paired by position."""

    device: torch.device
    dtype: torch.dtype
    storage: Tensor
    lerp_ema: list[Tensor] = field(default_factory=list)
    lerp_online: list[Tensor] = field(default_factory=list)
    copy_ema: list[Tensor] = field(default_factory=list)
    copy_online: list[Tensor] = field(default_factory=list)


def _named_tensors(module: nn.Module) -> OrderedDict[str, tuple[Tensor, bool]]:
    """Parameters then buffers, by name, each tensor once (tied weights under their first name)."""
    out: OrderedDict[str, tuple[Tensor, bool]] = OrderedDict()
    for name, p in module.named_parameters():
        out[name] = (p, True)
    for name, b in module.named_buffers():
        out[name] = (b, False)
    return out


def _set_tensor(module: nn.Module, name: str, tensor: Tensor, is_param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if is_param:
        owner._parameters[leaf] = tensor  # type: ignore[assignment]
    else:
        owner._buffers[leaf] = tensor


def _aliases(module: nn.Module) -> dict[int, list[tuple[str, bool]]]:
    """Every name under which each tensor of ``module`` is registered (tied weights have several)."""
    names: dict[int, list[tuple[str, bool]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append((name, True))
    for name, b in module.named_buffers(remove_duplicate=False):
        names.setdefault(id(b), []).append((name, False))
    return names


class EMA:
    r"""Exponential moving average of a model's weights, for any training loop.

    After each optimizer step, :meth:`update` moves every floating tensor of :attr:`ema_model` towards the
    online model's::

        ema_k = (1 - m_k) * ema_{k-1} + m_k * theta_k

    where ``m_k`` is the momentum of update ``k`` (the weight of the *online* model; other libraries write
    ``decay = 1 - m``). The update is one fused multi-tensor ``lerp_`` per (device, dtype) group, over
    tensor lists paired by name once, here: no Python loop over tensors, no lookups, no allocation.
    The EMA model's tensors are views into one contiguous buffer per group.

    Args:
        model: the online model. For ``DataParallel`` the EMA model is a ``DataParallel`` too; for
            ``DistributedDataParallel`` the EMA model is a copy of ``model.module``.
        momentum: weight of the online model in each update, in (0, 1). Leave it at its default when
            giving a ``schedule``.
        schedule: a callable ``k -> momentum`` of the 1-based update index (see :mod:`polyak.schedules`);
            overrides ``momentum``.
        handle_buffers: what happens to buffers (BatchNorm statistics and the like) at each update:
            ``"copy"`` copies the online model's values into the EMA model's own tensors; ``"update"``
            averages floating buffers like parameters and copies integer ones; ``"ema_train"`` leaves the
            buffers alone and puts the EMA model in train mode. Otherwise the EMA model is in eval mode.

    Attributes:
        ema_model: the averaged model, on the online model's device.
        model: the online model (``model.module`` for ``DistributedDataParallel``).
        momentum: the momentum given (the schedule decides the momentum of each update).
        schedule: the schedule in use.
        handle_buffers: as given.
        num_updates: how many updates have been made; saved in :meth:`state_dict`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from polyak import EMA
        >>> model = nn.Linear(2, 1)
        >>> ema = EMA(model, momentum=0.1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(3):
        ...     optimizer.zero_grad()
        ...     model(torch.ones(4, 2)).pow(2).mean().backward()
        ...     optimizer.step()
        ...     m = ema.update()
        >>> ema.num_updates, m
        (3, 0.1)
        >>> ema.ema_model(torch.ones(1, 2)).shape
        torch.Size([1, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = _DEFAULT_MOMENTUM,
        *,
        schedule: Schedule | None = None,
        handle_buffers: str = "copy",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}: {model!r}")
        momentum = _check_momentum("momentum", momentum)
        if schedule is not None:
            if not callable(schedule):
                raise TypeError(f"schedule must be a callable k -> momentum, got {schedule!r}")
            if momentum != _DEFAULT_MOMENTUM:
                raise ValueError(
                    f"give either momentum or schedule, not both: got momentum={momentum!r} and "
                    f"schedule={schedule!r}"
                )
        if handle_buffers not in HANDLE_BUFFERS:
            raise ValueError(
                f"handle_buffers must be one of {', '.join(map(repr, HANDLE_BUFFERS))}, got {handle_buffers!r}"
            )

        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.momentum = momentum
        self.schedule: Schedule = schedule if schedule is not None else constant(momentum)
        self.handle_buffers = handle_buffers
        self.num_updates = 0

        try:
            self.ema_model = copy.deepcopy(model)
        except Exception as e:  # a module that refuses deepcopy says why; say what to do about it
            raise TypeError(f"could not deep-copy model of type {type(model).__name__} for the EMA: {e}") from e
        self.ema_model.requires_grad_(False)
        self.ema_model.train(handle_buffers == "ema_train")
        self._groups = self._build_groups()

    # -- construction -------------------------------------------------------------------------------
    def _build_groups(self) -> list[_Group]:
        """Pair tensors by name, put the EMA model's into one buffer per (device, dtype), build the lists."""
        online = _named_tensors(unwrap_model(self.model))
        ema_module = unwrap_model(self.ema_model)
        ema = _named_tensors(ema_module)
        if list(online) != list(ema):
            missing = sorted(set(online) - set(ema))
            extra = sorted(set(ema) - set(online))
            raise ValueError(
                f"ema_model's tensors do not match the model's: missing {missing}, unexpected {extra}"
            )

        # role of each tensor: "lerp" (averaged), "copy" (copied at each update) or None (left alone)
        roles: dict[str, str | None] = {}
        for name, (t, is_param) in ema.items():
            if not is_param and self.handle_buffers == "ema_train":
                roles[name] = None
            elif t.is_floating_point() or t.is_complex():
                roles[name] = "lerp" if is_param or self.handle_buffers == "update" else "copy"
            else:  # integer tensors (num_batches_tracked, ...) are copied, never averaged
                roles[name] = "copy"

        keyed: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name, (t, _) in ema.items():
            keyed.setdefault((t.device, t.dtype), []).append(name)

        aliases = _aliases(ema_module)
        groups = []
        for (device, dtype), names in keyed.items():
            # averaged tensors first, then copied ones: each kind is one contiguous span of the buffer
            names.sort(key=lambda n: {"lerp": 0, "copy": 1, None: 2}[roles[n]])
            storage = torch.empty(sum(ema[n][0].numel() for n in names), device=device, dtype=dtype)
            group = _Group(device, dtype, storage)
            offset = 0
            for name in names:
                old, is_param = ema[name]
                view = storage[offset : offset + old.numel()].view(old.shape)
                offset += old.numel()
                view.copy_(old)
                new = nn.Parameter(view, requires_grad=False) if is_param else view
                for alias, alias_is_param in aliases[id(old)]:
                    _set_tensor(ema_module, alias, new, alias_is_param)
                if roles[name] == "lerp":
                    group.lerp_ema.append(new)
                    group.lerp_online.append(online[name][0])
                elif roles[name] == "copy":
                    group.copy_ema.append(new)
                    group.copy_online.append(online[name][0])
            groups.append(group)
        return groups

    # -- the update ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> float:
        """Fold the online model's current weights into the EMA; returns the momentum used.

        Call it after ``optimizer.step()``. The momentum is ``schedule(num_updates + 1)``.
        """
        k = self.num_updates + 1
        m = float(self.schedule(k))
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"schedule must return a momentum in [0, 1], got {m!r} for update {k}")
        for g in self._groups:
            if g.lerp_ema:
                torch._foreach_lerp_(g.lerp_ema, g.lerp_online, m)
            if g.copy_ema:
                torch._foreach_copy_(g.copy_ema, g.copy_online)
        self.num_updates = k
        return m

    def momentum_at(self, k: int) -> float:
        """The momentum of update ``k`` (1-based) under this EMA's schedule."""
        return float(self.schedule(k))

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All that resuming needs: the EMA tensors and the update count.

        Holds only tensors and plain values, so it loads with ``torch.load(..., weights_only=True)``. The
        tensors are the live ones (like ``nn.Module.state_dict``); the schedule is a pure function of the
        count and is not saved.
        """
        return {"num_updates": self.num_updates, "ema_model": unwrap_model(self.ema_model).state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Everything is checked before anything is changed."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = {"num_updates", "ema_model"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}; it has {sorted(state_dict)}")
        num_updates = state_dict["num_updates"]
        if isinstance(num_updates, Tensor) and num_updates.numel() == 1 and not num_updates.is_floating_point():
            num_updates = int(num_updates)
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise ValueError(f"state_dict['num_updates'] must be an int >= 0, got {num_updates!r}")
        tensors = state_dict["ema_model"]
        if not isinstance(tensors, Mapping):
            raise TypeError(f"state_dict['ema_model'] must be a mapping, got {type(tensors).__name__}")
        module = unwrap_model(self.ema_model)
        own = module.state_dict()
        if set(tensors) != set(own):
            raise ValueError(
                "state_dict['ema_model'] does not match the EMA model: missing "
                f"{sorted(set(own) - set(tensors))}, unexpected {sorted(set(tensors) - set(own))}"
            )
        for name, t in tensors.items():
            if not isinstance(t, Tensor) or t.shape != own[name].shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"state_dict['ema_model'][{name!r}] must be a tensor of shape {tuple(own[name].shape)}, "
                    f"got {got}"
                )
        module.load_state_dict(tensors)  # copies into the existing (flat) storage
        self.num_updates = num_updates

    def __repr__(self) -> str:
        sizes = ", ".join(f"{g.dtype}@{g.device}: {g.storage.numel()}" for g in self._groups)
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, handle_buffers={self.handle_buffers!r}, "
            f"num_updates={self.num_updates}, groups=[{sizes}])"
        )
