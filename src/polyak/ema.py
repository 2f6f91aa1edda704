"""The EMA core: one fused update per (device, dtype) group, on tensor lists built once."""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from polyak.schedules import Schedule, _check_int, _check_momentum, constant

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support
    DTensor = distribute_tensor = FSDPModule = None  # type: ignore[assignment,misc]

__all__ = ["EMA"]

HANDLE_BUFFERS = ("copy", "update", "ema_train")
_DEFAULT_MOMENTUM = 0.0002
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_local_tensor = operator.attrgetter("_local_tensor")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose tensors are averaged: ``model.module`` for DataParallel and DistributedDataParallel."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules in ``module``: their parameters are resharded by :func:`_reshard`."""
    return [m for m in module.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]


def _reshard(modules: list[nn.Module]) -> None:
    """Free FSDP2's unsharded parameters, so that the next forward gathers the shards anew.

    After a forward outside of training (an evaluation), FSDP2 keeps the root's parameters unsharded, and
    the next forward reuses them: without this, it would not see what an update or a swap wrote into the
    shards since.
    """
    for m in modules:
        m.reshard()  # type: ignore[operator]


@dataclass
class _Buf:
    """Tensors updated together: ``views``, and ``flat`` where they are exactly the views of one buffer."""

    views: list[Tensor]
    flat: Tensor | None = None

    @classmethod
    def empty_like(cls, like: list[Tensor], dtype: torch.dtype, device: torch.device, pin: bool = False) -> _Buf:
        flat = torch.empty(sum(t.numel() for t in like), dtype=dtype, device=device, pin_memory=pin)
        return cls(_split_views(flat, like), flat)


def _lerp(dst: _Buf, src: _Buf, m: float) -> None:
    if dst.flat is not None and src.flat is not None:
        dst.flat.lerp_(src.flat, m)
    else:
        torch._foreach_lerp_(dst.views, src.views, m)


def _copy(dst: _Buf, src: _Buf, non_blocking: bool = False) -> None:
    if dst.flat is not None and src.flat is not None:
        dst.flat.copy_(src.flat, non_blocking=non_blocking)
    else:
        torch._foreach_copy_(dst.views, src.views, non_blocking=non_blocking)


@dataclass
class _Group:
    """The averaged tensors of one (device, dtype) of the online model, and everything their update needs.

    ``ema`` and ``online`` pair the EMA model's and the online model's tensors by position. The average is
    accumulated in ``master`` (a wider dtype) where there is one, else in ``ema`` itself. ``staging``
    receives the online values first where they must change dtype or device before the ``lerp_``. For
    DTensors (FSDP2) the views are the local shards, fetched afresh at each update from ``*_params``
    because FSDP may re-allocate them.
    """

    online_device: torch.device
    dtype: torch.dtype
    names: list[str]
    ema: _Buf
    online: _Buf
    ema_params: list[Tensor] | None = None  # DTensors whose local shards ema.views are
    online_params: list[Tensor] | None = None
    master: _Buf | None = None
    staging: _Buf | None = None
    rounding: _Buf | None = None  # float32 work buffer of stochastic rounding
    rounding_mask: Tensor | None = None  # int32 mask of a float32's bfloat16 bits, a tensor: no scalar per update
    wait_for: torch.device | None = None  # a CUDA device whose copies must land before the CPU reads them
    # flat mode: one tensor of each module that owns some (a "canary"), and where it must point. Moving a
    # module (.to(), .half(), .cuda()) re-allocates all its tensors together, so one per module tells.
    canaries: list[Tensor] = field(default_factory=list)
    canary_ptrs: list[int] = field(default_factory=list)
    # compile=True: master, source and EMA updated by one compiled kernel; the momentum as a tensor, so that
    # a changing momentum does not recompile
    fused: bool = False
    weight: Tensor | None = None
    simple: bool = False  # one _foreach_lerp_ of the online tensors into the EMA's is all the update

    @property
    def staged(self) -> bool:
        """Whether the update has work to do before the lerp (fetch shards, check flat views, stage)."""
        return self.online_params is not None or self.online.flat is not None or self.staging is not None

    @property
    def acc(self) -> _Buf:
        return self.master if self.master is not None else self.ema


@dataclass
class _Copies:
    """Tensors copied from the online model at each update (buffers, integer tensors)."""

    ema: list[Tensor] = field(default_factory=list)
    online: list[Tensor] = field(default_factory=list)


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


def _split_views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


def _describe(t: Tensor) -> str:
    where = f"{t.dtype} {tuple(t.shape)} on {t.device}"
    if _is_dtensor(t):
        where += f", sharded {tuple(t.placements)} over {t.device_mesh}, local {tuple(t._local_tensor.shape)}"
    return where


def _check_alike(name: str, online: Tensor, ema: Tensor) -> None:
    """``ema_model`` given by the user must hold its tensors exactly as the model does, sharding included."""
    same = (
        online.shape == ema.shape
        and online.dtype == ema.dtype
        and _is_dtensor(online) == _is_dtensor(ema)
        and (
            not _is_dtensor(online)
            or (
                online.placements == ema.placements
                and online.device_mesh == ema.device_mesh
                and online._local_tensor.shape == ema._local_tensor.shape
            )
        )
    )
    if not same:
        raise ValueError(
            f"ema_model must be built and sharded like the model: its tensor {name!r} is {_describe(ema)}, "
            f"the model's is {_describe(online)}"
        )


class EMA:
    r"""Exponential moving average of a model's weights, for any training loop.

    After each optimizer step, :meth:`update` moves every floating tensor of :attr:`ema_model` towards the
    online model's::

        ema_k = (1 - m_k) * ema_{k-1} + m_k * theta_k

    where ``m_k`` is the momentum of update ``k`` (the weight of the *online* model; other libraries write
    ``decay = 1 - m``). The update is one multi-tensor ``torch._foreach_lerp_`` per (device, dtype) group
    (one fused kernel on CUDA), over tensor lists paired by name once, here: no Python loop over tensors,
    no lookups, no allocation. The EMA model's tensors are views into one contiguous buffer per group;
    with ``flat=True`` the online model's are too, and the update is a single ``lerp_`` per group.

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
        dtype: the dtype the average is accumulated in. By default float16 and bfloat16 tensors are
            averaged in a float32 *master* (in their own dtype, an update of momentum 2e-4 is smaller than
            half a unit in the last place and rounds away: the EMA never moves), other dtypes in their own.
            ``dtype=torch.bfloat16`` keeps a bf16 model's EMA in bf16 to save memory (then consider
            ``stochastic_rounding``). :attr:`ema_model` always keeps the online model's dtypes; it is
            refreshed from the master after each update.
        stochastic_rounding: round each update of a bfloat16 average stochastically (unbiased), so that
            small updates move it on average instead of rounding away. Needs a bfloat16 accumulator.
        seed: seed of the private generator of stochastic rounding; the same on every rank, so all ranks
            round alike.
        per_step: the momentum is meant per optimizer step. ``update(steps=n)`` after ``n`` steps then
            uses ``1 - (1 - m) ** n``, so updating every few steps tracks the every-step EMA.
        skip_nonfinite: skip (and count in :attr:`num_skipped`) an update whose online values hold NaN or
            Inf, warning once, so that one diverged step cannot poison the EMA. Costs a reduction over the
            online tensors and a host synchronisation per update.
        device: keep the EMA on this device (e.g. ``"cpu"`` for a model on a GPU, to save GPU memory);
            the online values are staged through pinned memory with non-blocking copies.
        flat: make the online model's averaged tensors views into one contiguous buffer per group too, so
            that an update is a single ``lerp_`` per group however many tensors the model has. The
            parameters stay the same objects (an optimizer built before or after keeps working). If
            something re-allocates them later (``model.to()``, ``model.half()``,
            ``load_state_dict(assign=True)``), the next update notices: it re-flattens, or raises where
            the dtypes or devices changed. (It checks one tensor of each module, at no cost that grows
            with the model: after assigning a single parameter's ``.data`` by hand, call
            :meth:`refresh`.)
        compile: for float16/bfloat16 models with a float32 master, run the update of each group as one
            kernel generated by ``torch.compile`` (reading the online values and the master once, writing
            the master and the EMA model once) instead of three passes; with ``flat=True`` the online values
            need no staging copy at all. The first update pays the compilation (seconds); it needs what
            ``torch.compile`` needs (a C++ compiler on the CPU, Triton on CUDA), and falls back to the eager
            update with a warning where that fails.
        ema_model: the module to hold the average, built by you like the model, for models that cannot be
            deep-copied: FSDP2 (``fully_shard``) models, whose EMA module must be sharded the same way (it
            is checked, and starts from the model's values). The EMA then stays sharded: each rank updates
            and holds only its shard.

    Attributes:
        ema_model: the averaged model, on the online model's device (or ``device``).
        model: the online model (``model.module`` for ``DistributedDataParallel``).
        momentum: the momentum given (the schedule decides the momentum of each update).
        schedule: the schedule in use.
        handle_buffers: as given.
        num_updates: how many updates have been made; saved in :meth:`state_dict`.
        num_skipped: how many updates ``skip_nonfinite`` skipped; saved in :meth:`state_dict`.

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
        dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        per_step: bool = False,
        skip_nonfinite: bool = False,
        device: torch.device | str | None = None,
        flat: bool = False,
        ema_model: nn.Module | None = None,
        compile: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}: {model!r}")
        momentum = _check_momentum("momentum", momentum)
        if schedule is not None:
            if not callable(schedule):
                raise TypeError(f"schedule must be a callable k -> momentum, got {schedule!r}")
            if momentum != _DEFAULT_MOMENTUM:
                raise ValueError(
                    f"give either momentum or schedule, not both: got momentum={momentum!r} and schedule={schedule!r}"
                )
        if handle_buffers not in HANDLE_BUFFERS:
            raise ValueError(
                f"handle_buffers must be one of {', '.join(map(repr, HANDLE_BUFFERS))}, got {handle_buffers!r}"
            )
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if stochastic_rounding and dtype != torch.bfloat16:
            raise ValueError(
                f"stochastic_rounding needs a bfloat16 average: pass dtype=torch.bfloat16, got dtype={dtype!r}"
            )
        seed = _check_int("seed", seed, 0)
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device must name a torch device, got {device!r}") from e
        if ema_model is not None:
            if not isinstance(ema_model, nn.Module):
                raise TypeError(f"ema_model must be an nn.Module, got {type(ema_model).__name__}")
            if device is not None:
                raise ValueError(f"give either ema_model or device, not both: got device={device!r}")

        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.momentum = momentum
        self.schedule: Schedule = schedule if schedule is not None else constant(momentum)
        self.handle_buffers = handle_buffers
        self.dtype = dtype
        self.stochastic_rounding = bool(stochastic_rounding)
        self.per_step = bool(per_step)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.device = device
        self.flat = bool(flat)
        self.compile = bool(compile)
        self.num_updates = 0
        self.num_skipped = 0
        self._generator: torch.Generator | None = None
        self._seed = seed

        if ema_model is None:
            self.ema_model = self._copy_model(model)
        else:
            if isinstance(ema_model, nn.parallel.DistributedDataParallel):
                ema_model = ema_model.module
            if ema_model is model or ema_model is unwrap_model(model):
                raise ValueError("ema_model must be a separate module, not the online model itself")
            self.ema_model = ema_model
        self.ema_model.requires_grad_(False)
        self.ema_model.train(handle_buffers == "ema_train")
        self._groups, self._copies = self._build_groups(own_storage=ema_model is None)
        self._fsdp_ema = _fsdp_modules(unwrap_model(self.ema_model))
        self._fsdp_online = _fsdp_modules(unwrap_model(self.model))
        self._stale = False
        self._staged = any(g.staged for g in self._groups)
        _watch(self)
        if any(g.master is not None for g in self._groups):
            # Whoever loads weights into ema_model directly (ignite's to_load={"ema_model": ...}) must not
            # have them overwritten from a stale master at the next update.
            unwrap_model(self.ema_model).register_load_state_dict_post_hook(
                lambda module, incompatible: self._master_from_model()
            )

    # -- construction -------------------------------------------------------------------------------
    @staticmethod
    def _copy_model(model: nn.Module) -> nn.Module:
        if any(_is_dtensor(p) for p in model.parameters()):
            raise TypeError(
                "model holds sharded DTensor parameters (FSDP2), and FSDP modules cannot be deep-copied: build "
                "the EMA module like the model (same architecture, fully_shard with the same mesh and "
                "arguments) and pass it as EMA(model, ..., ema_model=ema_module)"
            )
        try:
            return copy.deepcopy(model)
        except Exception as e:  # a module that refuses deepcopy says why; say what to do about it
            raise TypeError(
                f"could not deep-copy model of type {type(model).__name__} for the EMA ({e}): build a copy "
                "yourself and pass it as ema_model="
            ) from e

    def _accumulator_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float32 if dtype in _LOW_PRECISION else dtype

    def _roles(self, ema: Mapping[str, tuple[Tensor, bool]]) -> dict[str, str | None]:
        """What each tensor gets at an update: "lerp" (averaged), "copy" (copied) or None (left alone)."""
        roles: dict[str, str | None] = {}
        for name, (t, is_param) in ema.items():
            if not is_param and self.handle_buffers == "ema_train":
                roles[name] = None
            elif t.is_floating_point():
                roles[name] = "lerp" if is_param or self.handle_buffers == "update" else "copy"
            else:  # integer tensors (num_batches_tracked, ...) are copied, never averaged
                roles[name] = "copy"
        return roles

    def _build_groups(self, own_storage: bool) -> tuple[list[_Group], list[_Copies]]:
        """Pair tensors by name, group them by (device, dtype), build the lists every update runs on.

        Where the EMA model is our own copy, its tensors of each group become views into one buffer
        (averaged ones first, as one span). A user's ``ema_model`` (FSDP2) keeps its storage: it is
        checked to be built like the model and starts from the model's values.
        """
        online = _named_tensors(unwrap_model(self.model))
        ema_module = unwrap_model(self.ema_model)
        ema = _named_tensors(ema_module)
        if list(online) != list(ema):
            missing = sorted(set(online) - set(ema))
            extra = sorted(set(ema) - set(online))
            raise ValueError(f"ema_model's tensors do not match the model's: missing {missing}, unexpected {extra}")
        if not own_storage:
            for name, (t, _) in online.items():
                _check_alike(name, t, ema[name][0])
        roles = self._roles(ema)
        keyed: dict[tuple[torch.device, torch.dtype, bool], list[str]] = {}
        for name, (t, _) in online.items():
            keyed.setdefault((t.device, t.dtype, _is_dtensor(t)), []).append(name)

        aliases = _aliases(ema_module)
        groups, copies = [], []
        for (online_device, dtype, _), names in keyed.items():
            names.sort(key=lambda n: {"lerp": 0, "copy": 1, None: 2}[roles[n]])
            ema_flat = None
            if own_storage:
                device = self.device or online_device
                ema_flat = torch.empty(sum(ema[n][0].numel() for n in names), device=device, dtype=dtype)
                for name, view in zip(names, _split_views(ema_flat, [ema[n][0] for n in names]), strict=True):
                    old, is_param = ema[name]
                    view.copy_(old)
                    new = nn.Parameter(view, requires_grad=False) if is_param else view
                    for alias, alias_is_param in aliases[id(old)]:
                        _set_tensor(ema_module, alias, new, alias_is_param)
                ema = _named_tensors(ema_module)
            else:
                with torch.no_grad():  # the EMA starts where the model is, as a deep copy would
                    for name in names:
                        if roles[name] is not None:
                            ema[name][0].copy_(online[name][0])
            lerp_names = [n for n in names if roles[n] == "lerp"]
            copy_names = [n for n in names if roles[n] == "copy"]
            copies.append(_Copies([ema[n][0] for n in copy_names], [online[n][0] for n in copy_names]))
            if lerp_names:
                groups.append(self._make_group(online_device, dtype, lerp_names, online, ema, ema_flat))
        if self.stochastic_rounding:
            device = groups[0].acc.views[0].device if groups else torch.device("cpu")
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return groups, [c for c in copies if c.ema]

    def _make_group(
        self,
        online_device: torch.device,
        dtype: torch.dtype,
        names: list[str],
        online: Mapping[str, tuple[Tensor, bool]],
        ema: Mapping[str, tuple[Tensor, bool]],
        ema_flat: Tensor | None,
    ) -> _Group:
        online_tensors = [online[n][0] for n in names]
        ema_tensors = [ema[n][0] for n in names]
        sharded = _is_dtensor(online_tensors[0])
        n = sum(t.numel() for t in ema_tensors)
        g = _Group(
            online_device,
            dtype,
            names,
            ema=_Buf(
                list(map(_local_tensor, ema_tensors)) if sharded else ema_tensors,
                ema_flat[:n] if ema_flat is not None else None,  # the averaged span: they come first
            ),
            online=_Buf(list(map(_local_tensor, online_tensors)) if sharded else online_tensors),
            ema_params=ema_tensors if sharded else None,
            online_params=online_tensors if sharded else None,
        )
        device = g.ema.views[0].device
        acc_dtype = self._accumulator_dtype(dtype)
        if acc_dtype != dtype:
            g.master = _Buf.empty_like(g.ema.views, acc_dtype, device)
            _copy(g.master, g.ema)
        work_dtype = torch.float32 if self.stochastic_rounding else acc_dtype
        if work_dtype != dtype or device != online_device or self.stochastic_rounding:
            pin = device.type == "cpu" and online_device.type == "cuda"
            g.staging = _Buf.empty_like(g.ema.views, work_dtype, device, pin)
            if pin:
                g.wait_for = online_device
        if self.stochastic_rounding:
            g.rounding = _Buf.empty_like(g.ema.views, torch.float32, device)
            g.rounding_mask = torch.tensor(-65536, dtype=torch.int32, device=device)
        if self.flat and not sharded:
            _flatten_online(g)
        if self.compile and g.master is not None and g.ema.flat is not None and not self.stochastic_rounding:
            g.fused = True
            g.weight = torch.zeros((), dtype=acc_dtype, device=device)
            if g.online.flat is not None and device == online_device:
                g.staging = None  # the kernel reads the online values as they are
        g.simple = g.master is None and g.rounding is None and not g.staged
        return g

    def _refresh_online(self) -> None:
        """Pair again with the online model's current tensors, after something re-registered or moved them."""
        online = _named_tensors(unwrap_model(self.model))
        for g in self._groups:
            current = []
            for name, ema_t in zip(g.names, g.ema_params or g.ema.views, strict=True):
                t = online.get(name, (None,))[0]
                if t is None or t.shape != ema_t.shape or t.dtype != ema_t.dtype or t.device != g.online_device:
                    got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}"
                    raise RuntimeError(
                        f"the model's tensor {name!r} changed from {ema_t.dtype} {tuple(ema_t.shape)} on "
                        f"{g.online_device} to {got} after the EMA was built (model.to(), .half(), "
                        "load_state_dict(assign=True)?): build a new EMA for the converted model, or convert "
                        "the model back"
                    )
                current.append(t)
            if g.online_params is not None:
                g.online_params = current
                g.online.views = list(map(_local_tensor, current))
            else:
                g.online.views = current
            if g.online.flat is not None:
                _flatten_online(g)
        ema = _named_tensors(unwrap_model(self.ema_model))
        by_ema = {id(t): name for name, (t, _) in ema.items()}
        for c in self._copies:
            c.online = [online[by_ema[id(e)]][0] for e in c.ema]
        self._stale = False

    def refresh(self) -> None:
        """Pair with the online model's tensors again, re-flattening in flat mode.

        Updates notice on their own when a module of the model is moved or converted, or a tensor is
        registered anew; call this after replacing a single tensor's ``.data`` by hand.
        """
        self._refresh_online()

    def _master_from_model(self) -> None:
        with torch.no_grad():
            for g in self._groups:
                if g.master is not None:
                    self._fetch_local_shards(g)
                    _copy(g.master, g.ema)

    @staticmethod
    def _fetch_local_shards(g: _Group) -> None:
        # FSDP2 may re-allocate a shard (padding it at lazy init, on load_state_dict): take the current ones
        if g.online_params is not None:
            g.online.views = list(map(_local_tensor, g.online_params))
        if g.ema_params is not None:
            g.ema.views = list(map(_local_tensor, g.ema_params))

    # -- the update ---------------------------------------------------------------------------------
    def update(self, steps: int = 1, *, momentum: float | None = None) -> float:
        """Fold the online model's current weights into the EMA; returns the momentum used.

        Call it after ``optimizer.step()``. The momentum is ``schedule(num_updates + 1)``, unless given.

        Args:
            steps: optimizer steps since the last update, with ``per_step=True``: the momentum used is
                then ``1 - (1 - m) ** steps``.
            momentum: the momentum of this update, in [0, 1], instead of the schedule's (a number, a numpy
                scalar or a one-element tensor); the update still counts in :attr:`num_updates`. This is how
                :class:`~polyak.EMAHandler` uses whatever ``engine.state`` holds.

        Returns:
            The momentum used (0.0 for an update that ``skip_nonfinite`` skipped).
        """
        if steps != 1:
            if not self.per_step:
                raise ValueError(f"steps={steps!r} needs per_step=True: without it each update is one step")
            steps = _check_int("steps", steps, 1)
        k = self.num_updates + 1
        if momentum is None:
            m = float(self.schedule(k))
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"schedule must return a momentum in [0, 1], got {m!r} for update {k}")
        else:
            m = _check_momentum("momentum", momentum, closed=True)
        if steps != 1:
            m = 1.0 - (1.0 - m) ** steps
        # torch.no_grad() as a decorator costs more than a small model's whole update: switch it directly
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if not self._fold(m, k):
                return 0.0
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        self.num_updates = k
        return m

    def _stage(self) -> None:
        """Bring the online values to where the update reads them: re-pair if needed, then staging copies."""
        if self._stale:
            self._refresh_online()
        for g in self._groups:
            if g.online_params is not None:
                self._fetch_local_shards(g)
            if g.online.flat is not None and list(map(Tensor.data_ptr, g.canaries)) != g.canary_ptrs:
                self._refresh_online()
            if g.staging is not None:
                _copy(g.staging, g.online, non_blocking=g.wait_for is not None)
                if g.wait_for is not None:
                    torch.cuda.current_stream(g.wait_for).synchronize()

    def _skips(self, k: int) -> bool:
        """``skip_nonfinite``: whether update ``k`` is skipped (counted, and warned about once)."""
        if not self.skip_nonfinite or self._online_is_finite():
            return False
        self.num_skipped += 1
        if self.num_skipped == 1:
            warnings.warn(
                f"skipped EMA update {k}: the online model holds NaN or Inf (counted in EMA.num_skipped; "
                "this warning is shown once)",
                RuntimeWarning,
                stacklevel=4,
            )
        return True

    def _fold(self, m: float, k: int) -> bool:
        """The fused update itself; False where ``skip_nonfinite`` skipped it."""
        if self._stale or self._staged:
            self._stage()
        if self.skip_nonfinite and self._skips(k):
            return False
        try:
            for g in self._groups:
                if g.simple:  # the common case, as directly as it goes: it is all of a small model's update
                    torch._foreach_lerp_(g.ema.views, g.online.views, m)
                    continue
                if g.fused and self._fused_update(g, m):
                    continue
                if g.rounding is not None:
                    self._lerp_stochastic(g, m)
                else:
                    _lerp(g.acc, g.staging if g.staging is not None else g.online, m)
                if g.master is not None:
                    _copy(g.ema, g.master)
            for c in self._copies:
                torch._foreach_copy_(c.ema, c.online)
        except RuntimeError:
            self._refresh_online()  # says clearly which tensor changed dtype or device, if one did
            raise
        if self._fsdp_ema:
            _reshard(self._fsdp_ema)
        return True

    def _fused_update(self, g: _Group, m: float) -> bool:
        """``compile=True``: the whole update of a group with a master in one kernel; False if it cannot run."""
        assert g.master is not None and g.master.flat is not None and g.ema.flat is not None and g.weight is not None
        g.weight.fill_(m)
        source = g.staging if g.staging is not None else g.online
        try:
            _compiled_master_update(g.master.flat.numel())(g.master.flat, source.flat, g.ema.flat, g.weight)
            return True
        except Exception as e:  # torch.compile needs a working compiler (a C++ one on the CPU)
            warnings.warn(
                f"EMA(compile=True) could not compile its update ({type(e).__name__}: {e}); "
                "using the eager update instead",
                RuntimeWarning,
                stacklevel=4,
            )
            g.fused = False
            self._staged = True
            if g.staging is None:
                g.staging = _Buf.empty_like(g.ema.views, g.master.flat.dtype, g.master.flat.device)
                _copy(g.staging, g.online)
            return False

    def _lerp_stochastic(self, g: _Group, m: float) -> None:
        """``acc <- lerp(acc, staging, m)`` computed in float32, rounded to bfloat16 stochastically."""
        assert g.staging is not None and g.rounding is not None and g.rounding.flat is not None
        _copy(g.rounding, g.acc)
        _lerp(g.rounding, g.staging, m)
        # Adding uniform random bits below bfloat16's last place and truncating rounds up with
        # probability equal to the distance to the lower neighbour: unbiased.
        assert g.staging.flat is not None
        noise = g.staging.flat.view(torch.int32)
        torch.randint(0, 1 << 16, noise.shape, out=noise, generator=self._generator)
        g.rounding.flat.view(torch.int32).add_(noise).bitwise_and_(g.rounding_mask)
        _copy(g.acc, g.rounding)

    def _online_is_finite(self) -> bool:
        """Whether every averaged online value is finite.

        A sum (a flat buffer) or a 2-norm (a list) carries any NaN or Inf into its result and runs at memory
        speed; only where it is not finite (a non-finite value, or a finite sum that overflowed) does an exact
        check decide. A max-abs norm would decide alone, but runs ~8x slower than the update on the CPU.
        """

        def probe(g: _Group, exact: bool) -> Tensor:
            source = g.staging if g.staging is not None else g.online
            if source.flat is not None:
                if exact:
                    return torch.isfinite(source.flat).all()
                wide = torch.float64 if source.flat.dtype == torch.float64 else torch.float32
                return torch.isfinite(source.flat.sum(dtype=wide))
            norms = torch._foreach_norm(source.views, ord=float("inf") if exact else 2)
            return torch.isfinite(torch.stack(norms)).all()

        def all_finite(exact: bool) -> Tensor:
            flags = [probe(g, exact).to("cpu") for g in self._groups]
            return torch.stack(flags).all() if flags else torch.tensor(True)

        finite = all_finite(exact=False)
        if not finite:
            finite = all_finite(exact=True)
        if any(g.online_params is not None for g in self._groups) and torch.distributed.is_initialized():
            # each rank sees only its shard: all must agree, or their EMAs would part ways
            flag = finite.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        return bool(finite)

    def momentum_at(self, k: int) -> float:
        """The momentum of update ``k`` (1-based) under this EMA's schedule."""
        return float(self.schedule(k))

    # -- using the average --------------------------------------------------------------------------
    def _pairs(self) -> Iterator[tuple[Tensor, Tensor]]:
        online = _named_tensors(unwrap_model(self.model))
        ema = _named_tensors(unwrap_model(self.ema_model))
        for name, (t, _) in online.items():
            e = ema[name][0]
            yield (t._local_tensor, e._local_tensor) if _is_dtensor(t) else (t, e)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[nn.Module]:
        """Inside the block, the online model holds the EMA's weights (and buffers); yields the online model.

        The way to evaluate a model too large for a second copy on its device, or one sharded by FSDP: no
        extra model is built. The values trade places, so inside the block :attr:`ema_model` holds the online
        weights; on exit, also when the block raises, both are back bit for bit.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from polyak import EMA
            >>> model = nn.Linear(2, 1)
            >>> ema = EMA(model, momentum=0.5)
            >>> with torch.no_grad():
            ...     _ = model.weight.add_(1.0)
            >>> _ = ema.update()
            >>> online, average = model.weight.clone(), ema.ema_model.weight.clone()
            >>> with ema.swapped() as m:
            ...     torch.equal(m.weight, average)
            True
            >>> torch.equal(model.weight, online), torch.equal(ema.ema_model.weight, average)
            (True, True)
        """
        fsdp = self._fsdp_online + self._fsdp_ema
        _reshard(fsdp)  # the swap is of the shards: no forward may reuse parameters gathered before it
        pairs = list(self._pairs())
        for online, ema in pairs:
            _swap(online, ema)
        try:
            yield self.model
        finally:
            _reshard(fsdp)
            for online, ema in pairs:
                _swap(online, ema)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Copy the EMA's weights and buffers into ``module`` (a model of the same architecture).

        Example:
            >>> from torch import nn
            >>> from polyak import EMA
            >>> ema = EMA(nn.Linear(2, 1))
            >>> target = nn.Linear(2, 1)
            >>> ema.copy_to(target)
            >>> bool((target.weight == ema.ema_model.weight).all())
            True
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        unwrap_model(module).load_state_dict(unwrap_model(self.ema_model).state_dict())

    def hook(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Update the EMA after every ``optimizer.step()``; returns a handle whose ``remove()`` undoes it.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from polyak import EMA
            >>> model = nn.Linear(2, 1)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> ema = EMA(model, momentum=0.01)
            >>> handle = ema.hook(optimizer)
            >>> model(torch.ones(1, 2)).sum().backward()
            >>> optimizer.step()
            >>> ema.num_updates
            1
            >>> handle.remove()
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.update())

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All that resuming needs: the EMA tensors, the float32 masters if any, and the counts.

        Holds only tensors and plain values, so it loads with ``torch.load(..., weights_only=True)``. The
        tensors are the live ones (like ``nn.Module.state_dict``), but for the masters of a sharded EMA,
        which are copies; the schedule is a pure function of the count and is not saved.
        """
        state: dict[str, Any] = {
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "ema_model": unwrap_model(self.ema_model).state_dict(),
        }
        masters = self._master_views(saving=True)
        if masters:
            state["master"] = masters
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def full_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with every tensor whole and on the CPU, for ``torch.save`` on one rank.

        For a sharded (FSDP2) EMA this gathers the shards: a collective, so call it on every rank (each gets
        the whole state), and save it on one. :meth:`load_state_dict` takes it back on any rank of a run
        sharded the same way, each rank keeping its shard, masters included (so a bf16 model resumes
        exactly, which ``set_model_state_dict`` on :attr:`ema_model` alone cannot do).
        """
        state = self.state_dict()
        state["ema_model"] = OrderedDict((k, _whole(v)) for k, v in state["ema_model"].items())
        if "master" in state:
            state["master"] = {k: _whole(v) for k, v in state["master"].items()}
        return state

    def _master_views(self, saving: bool = False) -> dict[str, Tensor]:
        """The float32 masters by tensor name; for sharded models, as DTensors sharded like the model's.

        ``saving``: the DTensors hold copies, not views into the flat master: torch.save cannot pickle a
        DTensor whose local tensor starts inside its storage ("invalid python storage", torch 2.13).
        """
        masters = {}
        for g in self._groups:
            if g.master is None:
                continue
            for i, (name, view) in enumerate(zip(g.names, g.master.views, strict=True)):
                if g.online_params is not None:
                    if saving:
                        view = view.clone()
                    like = g.online_params[i]
                    view = DTensor.from_local(
                        view, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
                    )
                masters[name] = view
        return masters

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Everything is checked before anything is changed.

        A state without masters (saved by an EMA kept in the model's dtype) loads too: the masters are then
        taken from its weights.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = {"num_updates", "ema_model"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}; it has {sorted(state_dict)}")
        counts = {key: _plain_count(state_dict, key) for key in ("num_updates", "num_skipped") if key in state_dict}
        module = unwrap_model(self.ema_model)
        own = module.state_dict()
        _check_tensors("state_dict['ema_model']", state_dict["ema_model"], own)
        ema_state = {k: _shard_like(t, own[k]) for k, t in state_dict["ema_model"].items()}
        masters = state_dict.get("master")
        if masters is not None:
            own_masters = self._master_views()
            _check_tensors("state_dict['master']", masters, own_masters)
            # Whole tensors (full_state_dict()) give this rank's shard; and the masters may be our own (a state
            # dict loaded in place, as torch.distributed.checkpoint does, or ema.load_state_dict(ema.state_dict())),
            # which loading ema_model re-syncs from the weights below: keep their values first.
            masters = {k: _shard_like(t, own_masters[k], copy=True) for k, t in masters.items()}
        generator = state_dict.get("generator")
        if generator is not None and self._generator is not None:
            own_state = self._generator.get_state()
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

        module.load_state_dict(ema_state)  # copies into the flat storage; re-syncs masters
        if masters is not None:
            with torch.no_grad():
                own = self._master_views()
                for name, t in masters.items():
                    own[name].copy_(t)
        if generator is not None and self._generator is not None:
            self._generator.set_state(generator)
        self.num_updates = counts["num_updates"]
        self.num_skipped = counts.get("num_skipped", 0)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{g.dtype}@{g.online_device}: "
            + (f"{g.ema.flat.numel()} elements" if g.ema.flat is not None else f"{len(g.ema.views)} tensors")
            + (f" (master {g.master.views[0].dtype})" if g.master is not None else "")
            for g in self._groups
        )
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, handle_buffers={self.handle_buffers!r}, "
            f"num_updates={self.num_updates}, groups=[{sizes}])"
        )


class _Together:
    """Several EMAs of one model (different schedules), updated in one pass.

    The online values are staged once, and where the EMAs accumulate in their own lists, one
    ``_foreach_lerp_`` per group covers all of them, with a list of momenta. Built once; the lists are
    reused at every update.
    """

    def __init__(self, emas: list[EMA]) -> None:
        first = emas[0]
        for e in emas[1:]:
            same = (
                e.model is first.model
                and len(e._groups) == len(first._groups)
                and all(
                    g.names == h.names and (g.master is None) == (h.master is None) and h.rounding is None
                    for g, h in zip(first._groups, e._groups, strict=True)
                )
                and e.skip_nonfinite == first.skip_nonfinite
            )
            if not same:
                raise ValueError("EMAs updated together must track the same model, grouped the same way")
        self.emas = emas
        self.fallback = first.stochastic_rounding or first.flat or first.per_step
        self.acc_views = [
            list(itertools.chain.from_iterable(e._groups[i].acc.views for e in emas)) for i in range(len(first._groups))
        ]
        self.sizes = [len(g.names) for g in first._groups]

    def update(self) -> list[float]:
        emas = self.emas
        if self.fallback or any(g.online_params is not None for g in emas[0]._groups):
            return [e.update() for e in emas]
        ks = [e.num_updates + 1 for e in emas]
        ms = [float(e.schedule(k)) for e, k in zip(emas, ks, strict=True)]
        for m, k in zip(ms, ks, strict=True):
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"schedule must return a momentum in [0, 1], got {m!r} for update {k}")
        first = emas[0]
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for e in emas[1:]:
                if e._stale:
                    e._refresh_online()
            first._stage()  # once for all: the others read the first one's staging buffers
            if first._skips(ks[0]):
                for e in emas[1:]:
                    e.num_skipped += 1
                return [0.0] * len(emas)
            for i, (g, n) in enumerate(zip(first._groups, self.sizes, strict=True)):
                source = (g.staging if g.staging is not None else g.online).views
                weights = list(itertools.chain.from_iterable([m] * n for m in ms))
                torch._foreach_lerp_(self.acc_views[i], source * len(emas), weights)
            for e in emas:
                for g in e._groups:
                    if g.master is not None:
                        _copy(g.ema, g.master)
                for c in e._copies:
                    torch._foreach_copy_(c.ema, c.online)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        for e, k in zip(emas, ks, strict=True):
            e.num_updates = k
        return ms


def _master_update(master: Tensor, online: Tensor, ema: Tensor, weight: Tensor) -> None:
    master.lerp_(online.to(master.dtype), weight)
    ema.copy_(master)


_COMPILED: dict[int, Any] = {}


def _compiled_master_update(numel: int) -> Any:
    """``_master_update`` compiled for 1-D tensors of ``numel`` elements.

    Static shapes: a kernel compiled for any length ran at half the speed of one for a fixed length (85M
    elements, 2 CPU cores). Each length gets a code object of its own, so that many groups do not run into
    torch.compile's limit of recompilations per code object.
    """
    compiled = _COMPILED.get(numel)
    if compiled is None:
        code = _master_update.__code__.replace(co_name=f"_master_update_{numel}")
        function = types.FunctionType(code, _master_update.__globals__, code.co_name)
        compiled = _COMPILED[numel] = torch.compile(function, dynamic=False, fullgraph=True)
    return compiled


def _flatten_online(g: _Group) -> None:
    """Make the online tensors of ``g`` views into one new buffer, keeping their (Parameter) objects."""
    views = g.online.views
    flat = torch.empty(sum(t.numel() for t in views), dtype=views[0].dtype, device=views[0].device)
    with torch.no_grad():
        for t, view in zip(views, _split_views(flat, views), strict=True):
            view.copy_(t)
            t.data = view  # the same Parameter object, now backed by the flat buffer
    g.online.flat = flat
    owners: dict[str, Tensor] = {}
    for name, t in zip(g.names, views, strict=True):
        owners.setdefault(name.rpartition(".")[0], t)
    g.canaries = list(owners.values())
    g.canary_ptrs = list(map(Tensor.data_ptr, g.canaries))


_WATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[EMA]] = weakref.WeakKeyDictionary()
_HOOKS: list[RemovableHandle] = []


def _on_registration(module: nn.Module, name: str, tensor: object) -> None:
    for ema in _WATCHED.get(module, ()):
        ema._stale = True


def _watch(ema: EMA) -> None:
    """Note when a tensor of the online model is registered anew (``load_state_dict(assign=True)``...)."""
    if not _HOOKS:
        from torch.nn.modules import module as module_mod

        _HOOKS.append(module_mod.register_module_parameter_registration_hook(_on_registration))
        _HOOKS.append(module_mod.register_module_buffer_registration_hook(_on_registration))
    for sub in unwrap_model(ema.model).modules():
        _WATCHED.setdefault(sub, weakref.WeakSet()).add(ema)


def _swap(a: Tensor, b: Tensor) -> None:
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


def _whole(t: Tensor) -> Tensor:
    """A copy of ``t`` on the CPU; gathered whole if it is a DTensor (a collective)."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().to("cpu", copy=True)


def _shard_like(t: Tensor, own: Tensor, copy: bool = False) -> Tensor:
    """A whole tensor given for a sharded one: this rank's shard of it, sliced here (no communication)."""
    if _is_dtensor(own) and isinstance(t, Tensor) and not _is_dtensor(t):
        return distribute_tensor(t.to(own.device), own.device_mesh, own.placements, src_data_rank=None)
    return t.detach().clone() if copy and isinstance(t, Tensor) else t


def _plain_count(state_dict: Mapping[str, Any], key: str) -> int:
    value = state_dict[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {value!r}")
    return value


def _check_tensors(what: str, tensors: object, own: Mapping[str, Tensor]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(tensors).__name__}")
    if set(tensors) != set(own):
        raise ValueError(
            f"{what} does not match the EMA model: missing {sorted(set(own) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(own))}"
        )
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.shape != own[name].shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what}[{name!r}] must be a tensor of shape {tuple(own[name].shape)}, got {got}")
        if _is_dtensor(t) and _is_dtensor(own[name]):
            mine, theirs = own[name].device_mesh.get_coordinate(), t.device_mesh.get_coordinate()
            if mine != theirs or t.placements != own[name].placements:
                raise ValueError(
                    f"{what}[{name!r}] is the shard of the rank at {theirs} of its mesh, sharded "
                    f"{tuple(t.placements)}; this rank is at {mine}, sharded {tuple(own[name].placements)}. "
                    "A sharded EMA's state_dict() holds this rank's shards only: one saved on one rank (ignite's "
                    "Checkpoint writes rank 0's) cannot be loaded on the others. Save it with "
                    "torch.distributed.checkpoint (every rank its shards), or whole with full_state_dict()"
                )
