"""The EMA core: the public facade over the pairing (:mod:`polyak._tracking`) and the update kernels
(:mod:`polyak._kernels`), with the sharding helpers in :mod:`polyak._sharding`."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polyak import _sharding as sharding
from polyak._flat import compact_state_dicts, flatten, flattenable, gatherable, scripted_owners
from polyak._kernels import Buf, Compiled, CompiledSplit, Gathered, Kernel, Lerp, Split, Staged, Stochastic
from polyak._tracking import (
    UNAVERAGEABLE,
    Pair,
    Selector,
    SharedGuard,
    Structure,
    averaged_kind,
    canaries,
    copy_model,
    pair,
    parameter_selector,
    storage_users,
    unwrap_model,
    versions,
)
from polyak.schedules import Schedule, _check_int, _check_momentum, constant, delayed

__all__ = ["EMA"]

HANDLE_BUFFERS = ("copy", "update", "ema_train")
_DEFAULT_MOMENTUM = 0.0002
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# the dtype a finiteness probe sums in: wide enough not to lose a NaN, never narrower than the tensor
_WIDE_SUM = {torch.float64: torch.float64, torch.complex64: torch.complex64, torch.complex128: torch.complex128}


class EMA:
    r"""Exponential moving average of a model's weights, for any training loop.

    After each optimizer step, :meth:`update` moves every averaged tensor of :attr:`ema_model` towards the
    online model's::

        ema_k = (1 - m_k) * ema_{k-1} + m_k * theta_k

    where ``m_k`` is the momentum of update ``k`` (the weight of the *online* model; other libraries write
    ``decay = 1 - m``). The update is one multi-tensor ``torch._foreach_lerp_`` per (device, dtype) group
    (one fused kernel on CUDA), over tensor lists paired by name once: no Python loop over tensors, no
    lookups, no allocation. With ``flat=True`` both models' averaged tensors are views into one buffer per
    group, and the update is a single ``lerp_`` per group.

    **It follows the model, or says why it cannot.** Before each update the EMA checks, at the cost of a
    pointer comparison per tensor, that both models still hold the tensors it paired: a replaced submodule,
    a converted or moved model (``.to()``, ``.half()``, ``.cpu()``, on either model), a load with
    ``assign=True``, or a load into the EMA model (also into one of its submodules) is followed at the next
    update, exactly; where it cannot be (a tensor whose shape changed, names that no longer match) the
    update raises an error naming the tensor, and changes nothing (the documentation's lifecycle page has the
    table).

    Args:
        model: the online model. For ``DataParallel`` the EMA model is a ``DataParallel`` too; for
            ``DistributedDataParallel`` the EMA model is a copy of ``model.module``.
        momentum: weight of the online model in each update, in (0, 1). Leave it at its default when
            giving a ``schedule``.
        schedule: a callable ``k -> momentum`` of the 1-based update index (see :mod:`polyak.schedules`);
            overrides ``momentum``.
        copy_first: how many updates copy the online model before the averaging starts (a delayed start):
            updates ``1..copy_first`` copy, and update ``copy_first + k`` uses the momentum of update ``k``
            (``momentum``, or ``schedule(k)``). ``copy_first=1`` is "the first update copies", as in
            ``AveragedModel``, timm's EMA without warm-up and Lightning's ``EMAWeightAveraging``; the
            ``update_after_step=n`` of timm, ema-pytorch and diffusers copies ``n + 1`` updates: ``copy_first=n + 1``
            with a constant momentum, ``copy_first=n`` with :func:`~polyak.schedules.inverse_gamma` (whose own first
            update copies).
        handle_buffers: what happens to buffers (BatchNorm statistics and the like) at each update:
            ``"copy"`` copies the online model's values into the EMA model's own tensors; ``"update"``
            averages floating buffers like parameters and copies integer ones, and those that hold NaN or
            Inf when the EMA pairs the models (an attention mask of ``-inf``, whose average would be NaN);
            ``"ema_train"`` leaves the buffers alone and puts the EMA model in train mode. Otherwise the EMA
            model is in eval mode.
        dtype: the dtype the average is accumulated in. By default float16 and bfloat16 tensors are
            averaged in a float32 *master* (in their own dtype, an update of momentum 2e-4 is smaller than
            half a unit in the last place and rounds away: the EMA never moves), other dtypes in their own.
            ``dtype=torch.bfloat16`` keeps a bf16 model's EMA in bf16 to save memory (then consider
            ``stochastic_rounding``). :attr:`ema_model` always keeps its own dtypes; it is refreshed from
            the master after each update.
        stochastic_rounding: round each update of a bfloat16 average stochastically (unbiased), so that
            small updates move it on average instead of rounding away. Needs a bfloat16 accumulator.
        seed: seed of the private generator of stochastic rounding; the same on every rank, so all ranks
            round alike.
        per_step: the momentum is meant per optimizer step. ``update(steps=n)`` after ``n`` steps then
            uses ``1 - (1 - m) ** n``, so updating every few steps tracks the every-step EMA.
        skip_nonfinite: skip (and count in :attr:`num_skipped`) an update whose online values (averaged or
            copied) hold NaN or Inf, warning once, so that one diverged step cannot poison the EMA. Costs a
            reduction over the online tensors and a host synchronisation per update.
        device: keep the EMA on this device (e.g. ``"cpu"`` for a model on a GPU, to save GPU memory);
            the online values are staged through pinned memory with non-blocking copies.
        flat: make the online model's averaged tensors views into one contiguous buffer per group too (each
            keeping its memory format; tensors that share storage with others stay as they are), so that an
            update is a single ``lerp_`` per group however many tensors the model has. The parameters stay
            the same objects (an optimizer built before or after keeps working). ``state_dict()`` of either
            model then returns copies, so that what is saved (``torch.save``, safetensors) holds each tensor
            alone: write into them through ``load_state_dict``.
        compile: for float16/bfloat16 models with a float32 master, run the update of each group as one
            kernel generated by ``torch.compile`` (reading the online values and the master once, writing
            the master and the EMA model once) instead of three passes; it needs ``flat=True``. The first
            update pays the compilation (seconds); it needs what ``torch.compile`` needs (a C++ compiler on
            the CPU, Triton on CUDA), and falls back to the eager update with a warning where that fails.
        ema_model: the module to hold the average, built by you like the model, for models that cannot be
            deep-copied: FSDP2 (``fully_shard``) models, whose EMA module must be sharded the same way (it
            is checked, and starts from the model's values). The EMA then stays sharded: each rank updates
            and holds only its shard.
        include, exclude: which parameters are averaged, by name or shell-style glob (``"*.lora_*"``),
            matched against the whole name; ``exclude`` wins. Buffers follow ``handle_buffers``.
        predicate: a callable ``(name, parameter) -> bool``: only parameters for which it is true are
            averaged (with ``include``/``exclude``, all must agree).
        trainable_only: average only parameters with ``requires_grad=True`` (at construction).
        master: how the float32 master of bfloat16 tensors is kept: ``"float32"`` (a float32 copy, 4 bytes
            per parameter beside :attr:`ema_model`) or ``"split"``: :attr:`ema_model`'s bfloat16 values are
            its high half (rounded to nearest, ties away from zero) and an int16 buffer its low half, the
            same float32 arithmetic bit for bit in 2 bytes per parameter beside :attr:`ema_model`, for about
            three times the update time. Other dtypes are not affected.

    Parameters that are not averaged are *shared*: the EMA model holds the model's own tensor (no copy, no
    memory; it always shows the model's current values). That is the EMA of a LoRA adapter on a large frozen
    base, at the adapter's cost: ``EMA(model, trainable_only=True)``. Where the EMA model lives on another
    device (``device=``) or was given (``ema_model=``), they are copied at each update instead.

    Attributes:
        model: the online model (``model.module`` for ``DistributedDataParallel``).
        momentum: the momentum given (the schedule decides the momentum of each update).
        schedule: the schedule in use (the delayed one, with ``copy_first``).
        copy_first: as given.
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
        copy_first: int = 0,
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
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predicate: Selector | None = None,
        trainable_only: bool = False,
        master: str = "float32",
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
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype in UNAVERAGEABLE
        ):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if stochastic_rounding and dtype != torch.bfloat16:
            raise ValueError(
                f"stochastic_rounding needs a bfloat16 average: pass dtype=torch.bfloat16, got dtype={dtype!r}"
            )
        if master not in ("float32", "split"):
            raise ValueError(f"master must be 'float32' or 'split', got {master!r}")
        if master == "split" and dtype not in (None, torch.float32):
            raise ValueError(
                f"master='split' keeps a float32 average of bfloat16 tensors: it needs dtype=None, got dtype={dtype!r}"
            )
        seed = _check_int("seed", seed, 0)
        copy_first = _check_int("copy_first", copy_first, 0)
        if device is not None:
            device = _check_device(device)
        if ema_model is not None:
            if not isinstance(ema_model, nn.Module):
                raise TypeError(f"ema_model must be an nn.Module, got {type(ema_model).__name__}")
            if device is not None:
                raise ValueError(f"give either ema_model or device, not both: got device={device!r}")
        for name, value in (("per_step", per_step), ("skip_nonfinite", skip_nonfinite), ("flat", flat)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if not isinstance(compile, bool) or not isinstance(trainable_only, bool):
            raise TypeError(f"compile and trainable_only must be bools, got {compile!r}, {trainable_only!r}")
        if compile and not flat:
            raise ValueError("compile=True needs flat=True: the generated kernel works on the flat buffers")
        selector = parameter_selector(include, exclude, predicate, trainable_only)
        self._selected: Selector | None = None
        if selector is not None:  # decided once, here: freezing a parameter later does not change what is averaged
            averaged = {n for n, p in unwrap_model(model).named_parameters() if selector(n, p)}
            self._selected = lambda name, p: name in averaged

        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.momentum = momentum
        self.copy_first = copy_first
        self.schedule: Schedule = schedule if schedule is not None else constant(momentum)
        if copy_first:
            self.schedule = delayed(self.schedule, copy_first)
        self._handle_buffers = handle_buffers
        self.dtype = dtype
        self.stochastic_rounding = stochastic_rounding
        self.per_step = per_step
        self.skip_nonfinite = skip_nonfinite
        self.device = device
        self.flat = flat
        self.compile = compile
        self.master = master
        self.num_updates = 0
        self.num_skipped = 0
        self._swap_depth = 0
        self._generator: torch.Generator | None = None
        self._seed = seed
        self._flat_storages: set[int] = set()  # the flat buffers of flat mode: their views may move into new ones
        self._given_ema_model = ema_model is not None
        self._shared_guard = SharedGuard()
        self._hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()  # by hook(): one hook each

        online = unwrap_model(model)
        if ema_model is None:
            if any(sharding.is_dtensor(p) for p in online.parameters()):
                raise TypeError(
                    "model holds sharded DTensor parameters (FSDP2), and FSDP modules cannot be deep-copied: build "
                    "the EMA module like the model (same architecture, fully_shard with the same mesh and "
                    "arguments) and pass it as EMA(model, ..., ema_model=ema_module)"
                )
            shared = set()
            if device is None and self._selected is not None:
                shared = {id(p) for n, p in online.named_parameters() if not self._selected(n, p)}
            try:
                self.ema_model = copy_model(model, device, shared)
            except Exception as e:  # a module that refuses deepcopy says why; say what to do about it
                raise TypeError(
                    f"could not deep-copy model of type {type(model).__name__} for the EMA ({e}): build a copy "
                    "yourself and pass it as ema_model="
                ) from e
        else:
            if isinstance(ema_model, nn.parallel.DistributedDataParallel):
                ema_model = ema_model.module
            if ema_model is model or ema_model is online:
                raise ValueError("ema_model must be a separate module, not the online model itself")
            self.ema_model = ema_model
            self._start_from_model()
        self.ema_model.train(handle_buffers == "ema_train")
        self._fsdp_ema = sharding.fsdp_modules(unwrap_model(self.ema_model))
        self._fsdp_online = sharding.fsdp_modules(online)
        self._build()

    @property
    def ema_model(self) -> nn.Module:
        """The averaged model, on the online model's device (or ``device``).

        Assigning another module (built like the model) makes it the EMA model; the next update averages into
        it, from its own values."""
        return self._ema_model

    @ema_model.setter
    def ema_model(self, module: nn.Module) -> None:
        if not hasattr(self, "_ema_model"):  # construction
            self._ema_model = module
            return
        if module is self._ema_model:
            return
        if not isinstance(module, nn.Module):
            raise TypeError(f"ema_model must be an nn.Module, got {type(module).__name__}")
        if module is self.model or unwrap_model(module) is unwrap_model(self.model):
            raise ValueError("ema_model must be a separate module, not the online model itself")
        self._refuse_when_swapped("assigning ema_model")
        old = self._ema_model
        self._ema_model = module
        try:
            self._fsdp_ema = sharding.fsdp_modules(unwrap_model(module))
            self._build(keep_masters=False)  # checks it first: a part of the model in it is refused
        except BaseException:
            self._ema_model = old
            self._fsdp_ema = sharding.fsdp_modules(unwrap_model(old))
            raise
        module.requires_grad_(False)
        module.train(self.handle_buffers == "ema_train")

    @property
    def handle_buffers(self) -> str:
        """What happens to buffers at each update (see the class docstring); assignable."""
        return self._handle_buffers

    @handle_buffers.setter
    def handle_buffers(self, value: str) -> None:
        self._refuse_when_swapped("assigning handle_buffers")
        if value not in HANDLE_BUFFERS:
            raise ValueError(f"handle_buffers must be one of {', '.join(map(repr, HANDLE_BUFFERS))}, got {value!r}")
        if value == self._handle_buffers:
            return
        old, self._handle_buffers = self._handle_buffers, value
        try:
            self._build()
        except BaseException:
            self._handle_buffers = old
            raise
        self.ema_model.train(value == "ema_train")

    # -- construction -------------------------------------------------------------------------------
    def _start_from_model(self) -> None:
        """A user's ``ema_model`` (FSDP2) is checked to be built like the model, and starts from its values."""
        ema = unwrap_model(self.ema_model)
        advice = "ema_model must be built and sharded like the model"
        pairs = pair(unwrap_model(self.model), ema, self.handle_buffers, self._selected, ValueError, advice)
        for p in pairs:
            sharding.check_alike(p.name, p.online, p.ema)
        with torch.no_grad():
            for p in pairs:
                if p.role != "keep":
                    p.ema.copy_(p.online)
        ema.requires_grad_(False)

    def _accumulator_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype.is_complex:  # averaged in its own dtype: a real accumulator would drop the imaginary part
            return dtype
        if self.dtype is not None:
            return self.dtype
        return torch.float32 if dtype in _LOW_PRECISION else dtype

    def _build(self, keep_masters: bool = True) -> None:
        """Pair the two models' tensors and pick each group's kernel; masters kept where still valid."""
        with torch.inference_mode(False):  # buffers made here are used outside any inference_mode block
            self._build_now(keep_masters)

    def _build_now(self, keep_masters: bool) -> None:
        previous = self._masters_by_name() if keep_masters else {}
        pairs = pair(unwrap_model(self.model), unwrap_model(self.ema_model), self.handle_buffers, self._selected)
        self._materialise(pairs)
        self._separate(pairs)
        self._unmaterialised = [p.name for p in pairs if p.online.device.type == "meta" and p.role != "keep"]
        self._shared_guard.watch(unwrap_model(self.ema_model), {p.name: p.online for p in pairs if p.role == "share"})
        groups: dict[tuple[Any, ...], list[Pair]] = {}
        for p in pairs:
            if p.role == "lerp":
                key = (p.online.device, p.online.dtype, p.ema.device, p.ema.dtype, sharding.is_dtensor(p.online))
                groups.setdefault(key, []).append(p)
        if self.stochastic_rounding and self._generator is None:
            device = next((p.ema.device for p in pairs if p.role == "lerp"), torch.device("cpu"))
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        kernels: list[Kernel] = []
        for members in groups.values():
            kernels.extend(self._kernels_for(members))
        copies = [p for p in pairs if p.role == "copy"]
        self._copy_ema = [sharding.local(p.ema) for p in copies]
        self._copy_online = [sharding.local(p.online) for p in copies]
        self._copy_names = [p.name for p in copies]
        self._kernels = kernels
        self._restore_masters(previous)
        self._watch()

    def _materialise(self, pairs: list[Pair]) -> None:
        """Deferred initialisation: an EMA built from a model on the meta device (before ``to_empty()``) holds no
        values. Once the model's tensors have them, the EMA model's are made where they belong and start from
        the model's values, as at construction."""
        made: dict[int, Tensor] = {}
        with torch.no_grad():
            for p in pairs:
                if p.ema.device.type == "meta" and p.online.device.type != "meta":
                    device = self.device if self.device is not None else p.online.device
                    t = torch.empty_like(p.online, device=device, dtype=p.ema.dtype).copy_(p.online)
                    made[id(p.ema)] = nn.Parameter(t, requires_grad=False) if p.is_param else t
                    p.ema = made[id(p.ema)]
        if made:  # registered anew (a meta tensor's data cannot be set), tied tensors alike
            for module in unwrap_model(self.ema_model).modules():
                for registry in (module._parameters, module._buffers):
                    for leaf, value in registry.items():
                        if value is not None and id(value) in made:
                            registry[leaf] = made[id(value)]  # type: ignore[assignment]

    def _separate(self, pairs: list[Pair]) -> None:
        """The EMA model shares memory only where it is meant to: a parameter that is not averaged views the
        model's data (again, after the model's tensor was replaced alike); an averaged or copied tensor that
        came to share memory with the model's (a load with assign=True from the other model's state_dict)
        gets data of its own, the same values."""
        with torch.no_grad():
            for p in pairs:
                unselected = p.is_param and self._selected is not None and not self._selected(p.name, p.online)
                alike = p.online.dtype == p.ema.dtype and p.online.device == p.ema.device
                if unselected and p.role == "copy" and alike and self.device is None and not self._given_ema_model:
                    p.ema.data = p.online.detach()
                    p.role, p.aliased = "share", True
                elif p.aliased and p.role in ("lerp", "copy"):
                    p.ema.data = p.ema.detach().clone()
                    p.aliased = False

    def _kernels_for(self, members: list[Pair]) -> list[Kernel]:
        """The kernel(s) of one group: in flat mode, the flattenable tensors get a flat one."""
        if sharding.is_dtensor(members[0].online):
            return [self._kernel(members, flat=False)]
        # TorchScript modules take no state_dict hook (which a flat buffer's views need): theirs stay as they are
        scripted = scripted_owners([unwrap_model(self.model), unwrap_model(self.ema_model)], [p.name for p in members])
        movable = [p for p in members if p.name not in scripted]
        fixed = [p for p in members if p.name in scripted]
        if self.flat:
            flat, rest = flattenable(movable, self._flat_storages) if movable else ([], [])
            rest += fixed
            out = [self._kernel(flat, flat=True)] if flat else []
            return out + ([self._kernel(rest, flat=False)] if rest else [])
        if self._reads_as_is(members[0]) and movable:
            small, rest = gatherable(movable, self._flat_storages)
            if small:
                rest += fixed
                return [self._gathered(small)] + ([self._kernel(rest, flat=False)] if rest else [])
        return [self._kernel(members, flat=False)]

    def _reads_as_is(self, p: Pair) -> bool:
        """Whether the group of ``p`` averages in the EMA model's tensors, reading the online ones as they are."""
        dtype = p.ema.dtype
        return (
            not (self.stochastic_rounding and not dtype.is_complex)
            and self._accumulator_dtype(dtype) == dtype
            and p.online.dtype == dtype
            and p.online.device == p.ema.device
        )

    def _gathered(self, members: list[Pair]) -> Kernel:
        """Many small 1-D tensors: the EMA side becomes one flat buffer, the online side is gathered into it."""
        names = [p.name for p in members]
        ema_t = [p.ema for p in members]
        ema = Buf(ema_t, flatten(ema_t))
        assert ema.flat is not None
        self._flat_storages.add(ema.flat.untyped_storage().data_ptr())
        compact_state_dicts(unwrap_model(self.ema_model), names)
        return Gathered(names, Buf([p.online for p in members]), ema)

    def _kernel(self, members: list[Pair], flat: bool) -> Kernel:
        names = [p.name for p in members]
        sharded = sharding.is_dtensor(members[0].online)
        online_t = [p.online for p in members]
        ema_t = [p.ema for p in members]
        online = Buf(list(map(sharding.local, online_t)))
        ema = Buf(list(map(sharding.local, ema_t)))
        if flat:
            online.flat = flatten(online_t)
            ema.flat = flatten(ema_t)
            self._flat_storages |= {online.flat.untyped_storage().data_ptr(), ema.flat.untyped_storage().data_ptr()}
            compact_state_dicts(unwrap_model(self.model), names)
            compact_state_dicts(unwrap_model(self.ema_model), names)
        shards = (online_t, ema_t) if sharded else None
        ema_dtype = ema.views[0].dtype
        acc = self._accumulator_dtype(ema_dtype)
        if self.stochastic_rounding and not ema_dtype.is_complex:
            assert self._generator is not None
            return Stochastic(names, online, ema, shards, self._generator)
        if self._reads_as_is(members[0]):
            return Lerp(names, online, ema, shards)
        if self.master == "split" and ema_dtype == torch.bfloat16 and acc == torch.float32:
            if sharded:
                raise TypeError(
                    "master='split' does not support sharded (FSDP2) models yet: use the default float32 master"
                )
            return CompiledSplit(names, online, ema) if self.compile and flat else Split(names, online, ema)
        if self.compile and flat and acc != ema_dtype:
            return Compiled(names, online, ema, shards, acc)
        return Staged(names, online, ema, shards, acc)

    def _watch(self) -> None:
        """Snapshot what the next update checks: the models' structure, one tensor per module, masters' EMA."""
        online, ema = unwrap_model(self.model), unwrap_model(self.ema_model)
        names = [n for k in self._kernels if k.sharded is None for n in k.names] + self._copy_names
        # the registered tensors (a flat kernel holds views of their data, not them)
        registered_online = dict(online.named_parameters()) | dict(online.named_buffers())
        registered_ema = dict(ema.named_parameters()) | dict(ema.named_buffers())
        watched = canaries(names, [registered_online[n] for n in names]) + canaries(
            names, [registered_ema[n] for n in names]
        )
        self._structure = Structure([online, ema], watched)
        flats = [b.flat for k in self._kernels for b in (k.online, k.ema) if b.flat is not None]
        self._flat_users = [(t, storage_users(t)) for t in flats]
        self._master_kernels = [k for k in self._kernels if k.has_master]
        self._record_versions()
        self._simple = (
            len(self._kernels) == 1
            and type(self._kernels[0]) is Lerp
            and self._kernels[0].sharded is None
            and self._kernels[0].ema.flat is None
            and not self._copy_names
            and not self.skip_nonfinite
            and not self._fsdp_ema
            and not self._fsdp_online
            and not self._unmaterialised
        )
        if self._simple:
            self._simple_ema, self._simple_online = self._kernels[0].ema.views, self._kernels[0].online.views

    def _record_versions(self) -> None:
        self._versions = self._master_versions()

    def _master_versions(self) -> list[list[int]]:
        """The version counters of the EMA model's tensors that have a master: whoever writes them bumps them."""
        for k in self._master_kernels:
            k.refetch()
        return [versions(k.ema.views) for k in self._master_kernels]

    # -- masters across a change ----------------------------------------------------------------------
    def _masters_by_name(self) -> dict[str, tuple[Tensor, Callable[[Tensor], Tensor]]]:
        """Each master's values by tensor name, with how they were rounded into the EMA model."""
        out = {}
        for k in getattr(self, "_kernels", []):
            if k.has_master and k.ema.views[0].device.type != "meta":  # a meta master holds nothing to keep
                out.update({n: (v, k.round_master) for n, v in zip(k.names, k.master_values(), strict=True)})
        return out

    def _restore_masters(self, previous: dict[str, tuple[Tensor, Callable[[Tensor], Tensor]]]) -> None:
        """After a re-pairing, keep each master whose EMA values are unchanged (a conversion of the EMA model,
        not a load into it): its extra precision is not lost. Where the EMA model is now wide enough to hold
        the average itself, the master's values go into it."""
        if not previous:
            return
        with torch.no_grad():
            for k in self._kernels:
                for i, name in enumerate(k.names):
                    if name not in previous:
                        continue
                    master, rounded = previous[name]
                    ema = k.ema.views[i]
                    if master.shape != ema.shape or not torch.equal(
                        rounded(master).to(device=ema.device, dtype=ema.dtype), ema
                    ):
                        continue  # the EMA model holds other values now: they are the average
                    if k.has_master:
                        k.write_master(i, master)
                    else:
                        ema.copy_(master)

    def _revalidate_masters(self, now: list[list[int]]) -> None:
        """Someone wrote into the EMA model (a load, in-place edits): where a tensor's version counter moved,
        its master takes the EMA model's value (unless it still rounds to it)."""
        with torch.no_grad():
            for k, before, after in zip(self._master_kernels, self._versions, now, strict=True):
                k.revalidate([i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b])

    # -- following the models -------------------------------------------------------------------------
    def _ensure_current(self) -> None:
        """Follow whatever changed in either model since the last update, or raise saying what cannot be."""
        if self._fsdp_ema or self._fsdp_online:
            # FSDP2 registers its gathered parameters in place of the sharded ones while they are in use (a
            # forward outside training keeps the root's so): the shards are what the EMA pairs
            sharding.reshard(self._fsdp_online + self._fsdp_ema)
        if (
            not self._structure.unchanged()
            or any(storage_users(t) < n for t, n in self._flat_users)
            or any(k.stale() for k in self._kernels)
        ):
            self._build()
        elif self._master_kernels and (now := self._master_versions()) != self._versions:
            self._revalidate_masters(now)
            self._record_versions()

    def refresh(self) -> None:
        """Pair with both models' tensors again (re-flattening in flat mode).

        Updates notice on their own when a tensor is registered anew, a module is replaced, or a module is
        moved or converted; call this after assigning a single tensor's ``.data`` by hand (in flat mode, or
        to another dtype or device).
        """
        self._refuse_when_swapped("refresh()")
        self._build()

    # -- the update ---------------------------------------------------------------------------------
    def update(self, steps: int = 1, *, momentum: float | None = None) -> float:
        """Fold the online model's current weights into the EMA; returns the momentum used.

        Call it after ``optimizer.step()``. The momentum is ``schedule(num_updates + 1)``, unless given.
        Everything is checked before anything is written: a refused update changes nothing.

        Args:
            steps: optimizer steps since the last update, with ``per_step=True``: the momentum used is
                then ``1 - (1 - m) ** steps``.
            momentum: the momentum of this update, in [0, 1], instead of the schedule's (a number, a numpy
                scalar or a one-element tensor); the update still counts in :attr:`num_updates`. This is how
                :class:`~polyak.ignite.EMAHandler` uses whatever ``engine.state`` holds.

        Returns:
            The momentum used (0.0 for an update that ``skip_nonfinite`` skipped).
        """
        if self._swap_depth:
            self._refuse_when_swapped("update()")
        if steps != 1:
            if not self.per_step:
                raise ValueError(f"steps={steps!r} needs per_step=True: without it each update is one step")
            steps = _check_int("steps", steps, 1)
        k = self.num_updates + 1
        m = self._scheduled(k) if momentum is None else _check_momentum("momentum", momentum, closed=True)
        if steps != 1:
            m = 1.0 - (1.0 - m) ** steps
        # torch.no_grad() as a decorator costs more than a small model's whole update: switch it directly
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if self._simple and self._structure.unchanged() and not self._kernels[0].stale():
                # the common case, as directly as it goes: it is all of a small model's update
                if m == 1.0:  # a copy, exactly (lerp's weight 1 keeps a NaN or Inf the EMA held: see _fold)
                    torch._foreach_copy_(self._simple_ema, self._simple_online)
                else:
                    torch._foreach_lerp_(self._simple_ema, self._simple_online, m)
            else:
                self._ensure_current()
                if not self._fold(m, k):
                    return 0.0
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        self.num_updates = k
        return m

    def _refetch(self) -> None:
        for kernel in self._kernels:
            kernel.refetch()

    def _fold(self, m: float, k: int) -> bool:
        """The update of every group; False where ``skip_nonfinite`` skipped it."""
        if self._unmaterialised:
            raise RuntimeError(
                f"the model's tensor {self._unmaterialised[0]!r} is on the meta device: it holds no values to "
                "average yet (a model built on 'meta' is materialised with model.to_empty(device=...) and then "
                "initialised or loaded; the EMA follows it then)"
            )
        self._refetch()
        if self.skip_nonfinite and self._skips(k):
            return False
        if m == 1.0:
            self._clear_for_copy()
        for kernel in self._kernels:
            kernel.apply(m)
        self._finish()
        return True

    def _clear_for_copy(self) -> None:
        """Before an update of momentum 1 (a copy: ``copy_first``, a schedule's first update). Its lerp with
        weight 1 computes ``online - (online - acc) * 0``: NaN wherever the average held NaN or Inf (an EMA
        copied from weights not yet loaded); from zero it is the online value, exactly."""
        for kernel in self._kernels:
            kernel.clear_for_copy()

    def _finish(self) -> None:
        """What follows the lerps: copied tensors, the version records of the masters, FSDP2's reshard."""
        if self._copy_ema:
            torch._foreach_copy_(self._copy_ema, self._copy_online)
        if self._master_kernels:
            self._record_versions()
        if self._fsdp_ema:
            sharding.reshard(self._fsdp_ema)

    def _skips(self, k: int) -> bool:
        """``skip_nonfinite``: whether update ``k`` is skipped (counted, and warned about once)."""
        if self._online_is_finite():
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

    def _online_is_finite(self) -> bool:
        """Whether the update reads only values it may: no NaN or Inf among the averaged ones, no NaN among the
        copied ones (buffers). An infinity is a value to copy (an attention mask of ``-inf``): a copy does not
        accumulate it, and the next update copies again.

        A sum (a flat buffer) or a 2-norm (a list) carries any NaN or Inf into its result and runs at memory
        speed; only where it is not finite (a non-finite value, or a finite sum that overflowed) does an exact
        check decide. A max-abs norm would decide alone, but runs ~8x slower than the update on the CPU. For the
        copied values, a 1-norm is NaN exactly where a value is.
        """
        copied = [t for t in self._copy_online if (t.is_floating_point() or t.is_complex()) and t.numel()]

        def probe(source: Buf, exact: bool) -> Tensor:
            if source.flat is not None:
                if exact:
                    return torch.isfinite(source.flat).all()
                wide = _WIDE_SUM.get(source.flat.dtype, torch.float32)
                return torch.isfinite(source.flat.sum(dtype=wide)).all()
            norms = torch._foreach_norm(source.views, ord=float("inf") if exact else 2)
            return torch.isfinite(torch.stack(norms)).all()

        def all_finite(exact: bool) -> Tensor:
            flags = [probe(k.online, exact).to("cpu") for k in self._kernels]
            if copied:
                flags.append(torch.stack(torch._foreach_norm(copied, ord=1)).isnan().any().logical_not().to("cpu"))
            return torch.stack(flags).all() if flags else torch.tensor(True)

        finite = all_finite(exact=False)
        if not finite:
            finite = all_finite(exact=True)
        if any(k.sharded is not None for k in self._kernels):
            finite = sharding.all_ranks_agree(finite)  # each rank sees only its shard: all must agree
        return bool(finite)

    def momentum_at(self, k: int) -> float:
        """The momentum of update ``k`` (1-based) under this EMA's schedule."""
        k = _check_int("k", k, 1)
        return self._scheduled(k)

    def _scheduled(self, k: int) -> float:
        """The schedule's momentum of update ``k``, checked: a real number in [0, 1]."""
        value = self.schedule(k)
        if type(value) is float and 0.0 <= value <= 1.0:  # the common case, at the cost of a comparison
            return value
        try:
            return _check_momentum("momentum", value, closed=True)
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"schedule must return a momentum in [0, 1] (a real number), got {value!r} for update {k} from "
                f"schedule={self.schedule!r}"
            ) from None

    # -- using the average --------------------------------------------------------------------------
    def _refuse_when_swapped(self, what: str) -> None:
        if self._swap_depth:
            raise RuntimeError(
                f"{what} inside ema.swapped(): the model holds the EMA's weights there and the EMA model the "
                "online ones; leave the block first (an optimizer step inside it would train the EMA's weights)"
            )

    def _swap_pairs(self, roles: tuple[str, ...] = ("lerp", "copy", "keep")) -> list[Pair]:
        pairs = pair(unwrap_model(self.model), unwrap_model(self.ema_model), self.handle_buffers, self._selected)
        return [p for p in pairs if p.role in roles]

    @staticmethod
    def _swap_in(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor] | None]:
        """Trade values; where the two sides differ in dtype or device, keep both sides' values aside instead
        (a trade through the other's dtype would round them)."""
        kept: list[tuple[Tensor, Tensor] | None] = []
        for online, ema in pairs:
            if online.dtype == ema.dtype and online.device == ema.device:
                _swap(online, ema)
                kept.append(None)
            else:
                kept.append((online.clone(), ema.clone()))
                online.copy_(ema)
        return kept

    @staticmethod
    def _swap_out(pairs: list[tuple[Tensor, Tensor]], kept: list[tuple[Tensor, Tensor] | None]) -> None:
        for (online, ema), aside in zip(pairs, kept, strict=True):
            if aside is None:
                _swap(online, ema)
            else:
                online.copy_(aside[0])
                ema.copy_(aside[1])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Inside the block, the online model holds the EMA's weights (and buffers); yields the online model.

        The way to evaluate a model too large for a second copy on its device, or one sharded by FSDP: no
        extra model is built. The values trade places, so inside the block :attr:`ema_model` holds the online
        weights; on exit, also when the block raises, the online weights are back bit for bit. Inside, the
        model *is* the EMA: what changes it (a BatchNorm forward in train mode) changes the EMA (where the two
        models hold a tensor in different dtypes, e.g. after ``ema_model.float()``, both are kept aside
        instead, and come back as they were). An update
        (also one from :meth:`hook` on an optimizer step, refused before the step) and :meth:`state_dict`,
        :meth:`load_state_dict` and :meth:`copy_to` are refused inside; a nested ``swapped()`` is part of the
        outer one.

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
        if self._swap_depth:
            self._swap_depth += 1
            try:
                yield self.model
            finally:
                self._swap_depth -= 1
            return
        with torch.no_grad():
            self._ensure_current()
            fsdp = self._fsdp_online + self._fsdp_ema
            sharding.reshard(fsdp)  # the swap is of the shards: no forward may reuse parameters gathered before
            pairs = [(sharding.local(p.online), sharding.local(p.ema)) for p in self._swap_pairs()]
            kept = self._swap_in(pairs)
            inside = self._online_versions()
        self._swap_depth = 1
        try:
            yield self.model
        finally:
            with torch.no_grad():
                sharding.reshard(fsdp)
                written = self._online_versions()
                self._swap_out(pairs, kept)
                self._settle_versions(inside, written)
            self._swap_depth = 0

    def _online_versions(self) -> list[list[int]]:
        for k in self._master_kernels:
            k.refetch()
        return [versions(k.online.views) for k in self._master_kernels]

    def _settle_versions(self, inside: list[list[int]], written: list[list[int]]) -> None:
        """After swapped(): a tensor that nobody wrote inside the block holds its own values again, so its
        master stands (the trade back bumped its version counter, not its value). Those written inside are
        left for the next update to take as the average."""
        now = self._master_versions()
        self._versions = [
            [new if a == b else old for old, new, a, b in zip(*rows, strict=True)]
            for rows in zip(self._versions, now, inside, written, strict=True)
        ]

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
        self._refuse_when_swapped("copy_to()")
        unwrap_model(module).load_state_dict(unwrap_model(self.ema_model).state_dict())

    def hook(self, optimizer: torch.optim.Optimizer) -> _Handles:
        """Update the EMA after every ``optimizer.step()``; returns a handle whose ``remove()`` undoes it.

        A step inside :meth:`swapped` is refused before it changes anything.

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
        if optimizer in self._hooked:
            raise RuntimeError(
                f"ema.hook() was already called with this optimizer ({type(optimizer).__name__}): a second hook would "
                "update the EMA twice per step; remove the first handle (handle.remove()) to hook it again"
            )
        before = optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self._refuse_when_swapped("optimizer.step() with ema.hook(optimizer)")
        )
        after = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.update())
        self._hooked.add(optimizer)
        return _Handles([before, after], lambda: self._hooked.discard(optimizer))

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All that resuming needs: the EMA tensors, the float32 masters if any, and the counts.

        Holds only tensors and plain values, so it loads with ``torch.load(..., weights_only=True)``. The
        tensors are the EMA model's (like ``nn.Module.state_dict``), but for the masters of a sharded EMA,
        which are copies; the schedule is a pure function of the count and is not saved.
        """
        self._refuse_when_swapped("state_dict()")
        with torch.no_grad():
            self._ensure_current()
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
        state["ema_model"] = OrderedDict(
            (k, sharding.whole(v) if isinstance(v, Tensor) else v) for k, v in state["ema_model"].items()
        )
        if "master" in state:
            state["master"] = {k: sharding.whole(v) for k, v in state["master"].items()}
        return state

    def _master_views(self, saving: bool = False) -> dict[str, Tensor]:
        """The float32 masters by tensor name; for sharded models, as DTensors sharded like the model's.

        ``saving``: the DTensors hold copies, not views into the flat master: torch.save cannot pickle a
        DTensor whose local tensor starts inside its storage ("invalid python storage", torch 2.13).
        """
        masters = {}
        for k in self._kernels:
            if not k.has_master:
                continue
            for i, (name, view) in enumerate(zip(k.names, k.master_values(), strict=True)):
                if k.sharded is not None:
                    view = sharding.as_dtensor_like(view.clone() if saving else view, k.sharded[0][i])
                masters[name] = view
        return masters

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Everything is checked before anything is changed.

        A state without masters (saved by an EMA kept in the model's dtype) loads too: the masters are then
        taken from its weights.
        """
        self._refuse_when_swapped("load_state_dict()")
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = {"num_updates", "ema_model"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}; it has {sorted(state_dict)}")
        counts = {key: _plain_count(state_dict, key) for key in ("num_updates", "num_skipped") if key in state_dict}
        with torch.no_grad():
            self._ensure_current()
        module = unwrap_model(self.ema_model)
        own = module.state_dict()
        _check_tensors("state_dict['ema_model']", state_dict["ema_model"], own)
        ema_state = {
            k: sharding.shard_like(t, own[k]) if isinstance(own[k], Tensor) else t
            for k, t in state_dict["ema_model"].items()
        }
        masters = state_dict.get("master")
        if masters is not None:
            if not isinstance(masters, Mapping):
                raise TypeError(f"state_dict['master'] must be a mapping, got {type(masters).__name__}")
            unknown = sorted(set(masters) - set(own))
            lacking = sorted(set(self._master_views()) - set(masters))
            if unknown or lacking:
                raise ValueError(
                    f"state_dict['master'] does not match the EMA model: missing {lacking}, unexpected {unknown}"
                )
            _check_tensors("state_dict['master']", masters, {k: own[k] for k in masters})
            # Whole tensors (full_state_dict()) give this rank's shard; and the masters may be our own (a state
            # dict loaded in place, as torch.distributed.checkpoint does, or ema.load_state_dict(ema.state_dict())):
            # keep their values first.
            masters = {k: sharding.shard_like(t, own[k], copy=True) for k, t in masters.items()}
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
        shared = {p.name for p in self._swap_pairs(roles=("share",))}  # the model's data: not the EMA's to load
        loaded = {k: v for k, v in ema_state.items() if k not in shared}

        with torch.no_grad():
            # atomic: a module's load can still fail late (its set_extra_state, say): then it is put back
            backup = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in own.items() if k in loaded}
            try:
                module.load_state_dict(loaded, strict=False)  # copies into the EMA model's own tensors
            except BaseException:
                module.load_state_dict(backup, strict=False)
                raise
            # the average itself: the saved masters, else the saved values as they were (a float32 EMA model's
            # values are exact for a master; rounding them into a bf16 EMA model first would lose bits)
            for k in self._kernels:
                k.refetch()
                for i, name in enumerate(k.names):
                    value = masters.get(name) if masters is not None else None
                    value = sharding.local(ema_state[name] if value is None else value)
                    if k.has_master:
                        k.write_master(i, value)
                    else:
                        k.ema.views[i].copy_(value)
        if generator is not None and self._generator is not None:
            self._generator.set_state(generator)
        self.num_updates = counts["num_updates"]
        self.num_skipped = counts.get("num_skipped", 0)
        self._record_versions()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the EMA model: ``ema(x)`` is ``ema.ema_model(x)``, as with ema-pytorch's ``EMA``.

        Refused inside :meth:`swapped`, where the EMA model holds the online weights (the model is the average
        there: call it)."""
        if self._swap_depth:
            self._refuse_when_swapped("ema(...)")
        return self.ema_model(*args, **kwargs)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{k.ema.views[0].dtype}@{k.ema.views[0].device}: {sum(t.numel() for t in k.ema.views)} elements"
            + (f" (master {k.master.views[0].dtype})" if k.master is not None else "")
            + (" (split master)" if k.has_master and k.master is None else "")
            for k in self._kernels
        )
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, handle_buffers={self.handle_buffers!r}, "
            f"num_updates={self.num_updates}, groups=[{sizes}])"
        )


class _Handles:
    """Several hook handles removed together (:meth:`EMA.hook`)."""

    def __init__(self, handles: list[Any], forget: Callable[[], None] | None = None) -> None:
        self.handles = handles
        self._forget = forget

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self._forget is not None:
            self._forget()

    def __enter__(self) -> _Handles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# -- helpers ------------------------------------------------------------------------------------------------
def _check_device(device: object) -> torch.device:
    try:
        device = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device, got {device!r}") from e
    if device.type == "meta":
        raise ValueError(f"device must hold data, got {device!r}: an EMA on the meta device would average nothing")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: torch.cuda.is_available() is False")
    return device


def _swap(a: Tensor, b: Tensor) -> None:
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


def _plain_count(state_dict: Mapping[str, Any], key: str) -> int:
    value = state_dict[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {value!r}")
    return value


def _check_tensors(what: str, tensors: object, own: Mapping[str, Any]) -> None:
    """``tensors`` must name exactly ``own``'s entries, each a tensor of its shape (or, for a module's extra
    state, whatever the module saved: its ``set_extra_state`` checks it)."""
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
