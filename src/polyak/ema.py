"""The EMA core: the public facade. The pairing of the two models, its kernels and whether it still holds are
the plan's (:mod:`polyak._plan`, over :mod:`polyak._tracking` and :mod:`polyak._kernels`); checkpoints are
:mod:`polyak._checkpoint`'s; sharding helpers live in :mod:`polyak._sharding`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polyak import _checkpoint as checkpoint
from polyak import _sharding as sharding
from polyak._kernels import Kernel
from polyak._plan import Lasting, Options, Plan, start_from_model, swap_in, swap_out
from polyak._tracking import UNAVERAGEABLE, Selector, copy_model, parameter_selector, unwrap_model
from polyak._warn import warn
from polyak.schedules import Schedule, _check_int, _check_momentum, constant, delayed

__all__ = ["EMA"]

HANDLE_BUFFERS = ("copy", "update", "ema_train")
_DEFAULT_MOMENTUM = 0.0002


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
        skip_nonfinite: skip (and count in :attr:`num_skipped`) an update whose averaged online values hold
            NaN or Inf, or whose copied ones hold NaN (an Inf there is a value: a mask of ``-inf``), warning
            once, so that one diverged step cannot poison the EMA. Costs a reduction over the online tensors
            and a host synchronisation per update.
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
        chosen = parameter_selector(include, exclude, predicate, trainable_only)
        selector: Selector | None = None
        if chosen is not None:  # decided once, here: freezing a parameter later does not change what is averaged
            averaged = {n for n, p in unwrap_model(model).named_parameters() if chosen(n, p)}
            selector = lambda name, p: name in averaged  # noqa: E731

        if isinstance(model, nn.parallel.DistributedDataParallel) or sharding.is_deepspeed_engine(model):
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
        self._lasting = Lasting(seed)
        self._given_ema_model = ema_model is not None
        self._options = self._make_options(selector)

        online = unwrap_model(model)
        if ema_model is None:
            if any(sharding.is_dtensor(p) for p in online.parameters()):
                raise TypeError(
                    "model holds sharded DTensor parameters (FSDP2), and FSDP modules cannot be deep-copied: build "
                    "the EMA module like the model (same architecture, fully_shard with the same mesh and "
                    "arguments) and pass it as EMA(model, ..., ema_model=ema_module)"
                )
            shared = set()
            if device is None and selector is not None:
                shared = {id(p) for n, p in online.named_parameters() if not selector(n, p)}
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
            start_from_model(self._options, model, ema_model)
        self.ema_model.train(handle_buffers == "ema_train")
        self._plan = Plan(self._options, self._lasting, self.model, self.ema_model)

    def _make_options(self, selector: Selector | None) -> Options:
        return Options(
            handle_buffers=self._handle_buffers,
            dtype=self.dtype,
            master=self.master,
            flat=self.flat,
            compile=self.compile,
            stochastic_rounding=self.stochastic_rounding,
            skip_nonfinite=self.skip_nonfinite,
            device=self.device,
            selected=selector,
            given_ema_model=self._given_ema_model,
        )

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
            self._build(keep_masters=False)  # checks it first: a part of the model in it is refused
        except BaseException:
            self._ema_model = old
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
            self._build(options=dataclasses.replace(self._options, handle_buffers=value))
        except BaseException:
            self._handle_buffers = old
            raise
        self.ema_model.train(value == "ema_train")

    # -- the plan (polyak._plan): built once, built anew where it no longer holds -------------------------------
    def _build(self, keep_masters: bool = True, options: Options | None = None, by_value: bool = False) -> None:
        """A new plan of both models; masters kept where still valid. Nothing changes where it raises, but for
        the masters following what was written into the EMA model since its last call (as that call would)."""
        previous = {}
        if keep_masters:
            self._plan.follow_writes()  # first: the masters taken over are those of the values now in the EMA model
            previous = self._plan.masters_by_name()
        plan = Plan(options or self._options, self._lasting, self.model, self.ema_model)
        plan.restore_masters(previous, by_value)
        self._plan, self._options = plan, plan.options

    def _ensure_current(self) -> None:
        """Follow whatever changed in either model since the last update, or raise saying what cannot be."""
        if not self._plan.holds():
            self._build()
        else:
            self._plan.follow_writes()

    # what the adapters and post-hoc EMA read of the plan
    @property
    def _kernels(self) -> list[Kernel]:
        return self._plan.kernels

    @property
    def _simple(self) -> bool:
        return self._plan.simple

    @property
    def _selected(self) -> Selector | None:
        return self._options.selected

    @_selected.setter
    def _selected(self, selector: Selector | None) -> None:
        """A new selection (the diffusers drop-in re-decides it at each step); it applies at the next build."""
        self._options = dataclasses.replace(self._options, selected=selector)

    def _clear_for_copy(self) -> None:
        self._plan.clear_for_copy()

    def _finish(self) -> None:
        self._plan.finish()

    def refresh(self) -> None:
        """Pair with both models' tensors again (re-flattening in flat mode).

        Updates notice on their own when a tensor is registered anew, a module is replaced, or a module is
        moved or converted, and when a tensor's ``.data`` is assigned by hand (to another dtype or shape, or
        another layout of a flat buffer); call this where a ``.data`` moves to another device.
        """
        self._refuse_when_swapped("refresh()")
        self._build(by_value=True)  # a write through .data counts no version: the values decide

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
            plan = self._plan
            if plan.simple and plan.structure.unchanged():
                # the common case, as directly as it goes: it is all of a small model's update
                if m == 1.0:  # a copy, exactly (lerp's weight 1 keeps a NaN or Inf the EMA held)
                    torch._foreach_copy_(plan.simple_ema, plan.simple_online)
                else:
                    torch._foreach_lerp_(plan.simple_ema, plan.simple_online, m)
            else:
                self._ensure_current()
                plan = self._plan
                plan.refuse_unmaterialised()
                plan.refetch()
                if self.skip_nonfinite and self._skips(k):
                    return 0.0
                plan.apply(m)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        self.num_updates = k
        return m

    def _skips(self, k: int) -> bool:
        """``skip_nonfinite``: whether update ``k`` is skipped (counted, and warned about once)."""
        if self._plan.online_is_finite():
            return False
        self.num_skipped += 1
        if self.num_skipped == 1:
            warn(
                f"skipped EMA update {k}: the online model holds NaN or Inf (counted in EMA.num_skipped; "
                "this warning is shown once)",
                RuntimeWarning,
            )
        return True

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
            plan = self._plan
            fsdp = plan.fsdp_online + plan.fsdp_ema
            sharding.reshard(fsdp)  # the swap is of the shards: no forward may reuse parameters gathered before
            pairs = [(sharding.local(p.online), sharding.local(p.ema)) for p in plan.swap_pairs()]
            sharding.zero_release(plan.zero.values())  # the swap is of the partitions: none may stay gathered
            kept = swap_in(pairs)
            inside = plan.online_versions()
        self._swap_depth = 1
        try:
            yield self.model
        finally:
            with torch.no_grad():
                sharding.reshard(fsdp)
                written = plan.online_versions()
                sharding.zero_release(plan.zero.values())
                swap_out(pairs, kept)
                plan.settle_versions(inside, written)
            self._swap_depth = 0

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
        target = unwrap_model(module)
        if any(sharding.is_zero3(p) for p in target.parameters()):  # a ZeRO-3 module: partition for partition
            sharding.zero_copy_into(target, unwrap_model(self.ema_model), self._plan.zero)
            return
        if self._plan.zero:  # the EMA model holds this rank's partitions: gathered whole (a collective)
            target.load_state_dict(self.full_state_dict()["ema_model"])
            return
        target.load_state_dict(unwrap_model(self.ema_model).state_dict())

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
        hooks = getattr(optimizer, "_optimizer_step_post_hooks", {}).values()
        if any(isinstance(h, _UpdateAfterStep) and h.ema is self for h in hooks):
            raise RuntimeError(
                f"ema.hook() was already called with this optimizer ({type(optimizer).__name__}): a second hook would "
                "update the EMA twice per step; remove the first handle (handle.remove()) to hook it again"
            )
        before = optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self._refuse_when_swapped("optimizer.step() with ema.hook(optimizer)")
        )
        after = optimizer.register_step_post_hook(_UpdateAfterStep(self))
        return _Handles([before, after])

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All that resuming needs: the EMA tensors, the float32 masters if any, and the counts.

        Holds only tensors and plain values, so it loads with ``torch.load(..., weights_only=True)``. The
        tensors are the EMA model's (like ``nn.Module.state_dict``), but for the masters of a sharded EMA,
        which are copies, and for the parameters that are not averaged and the EMA model shares with the model
        (``trainable_only=True`` and the like: the frozen base of an adapter), which are not saved; the
        schedule is a pure function of the count and is not saved. Under ZeRO-3 they are this rank's
        partitions (:meth:`full_state_dict` gathers them).
        """
        self._refuse_when_swapped("state_dict()")
        with torch.no_grad():
            self._ensure_current()
        return checkpoint.collect(self)

    def full_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with every tensor whole and on the CPU, for ``torch.save`` on one rank.

        For a sharded (FSDP2) EMA this gathers the shards: a collective, so call it on every rank (each gets
        the whole state), and save it on one. :meth:`load_state_dict` takes it back on any rank of a run
        sharded the same way, each rank keeping its shard, masters included (so a bf16 model resumes
        exactly, which ``set_model_state_dict`` on :attr:`ema_model` alone cannot do).
        """
        state = self.state_dict()
        zero = self._plan.zero

        def whole(name: str, v: Any) -> Any:
            if not isinstance(v, Tensor):
                return v
            if name in zero:
                return sharding.zero_whole(v, zero[name]).to("cpu", copy=True)
            return sharding.whole(v)

        state["ema_model"] = OrderedDict((k, whole(k, v)) for k, v in state["ema_model"].items())
        if "master" in state:
            state["master"] = {k: whole(k, v) for k, v in state["master"].items()}
        state.pop("zero", None)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Everything is checked before anything is changed.

        A state without masters (saved by an EMA kept in the model's dtype) loads too: the masters are then
        taken from its weights.
        """
        self._refuse_when_swapped("load_state_dict()")
        with torch.no_grad():
            self._ensure_current()
        checkpoint.load(self, state_dict)

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
            for k in self._plan.kernels
        )
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, handle_buffers={self.handle_buffers!r}, "
            f"num_updates={self.num_updates}, groups=[{sizes}])"
        )


class _UpdateAfterStep:
    """The step post-hook of :meth:`EMA.hook` (an object, so that a second hook of the same EMA is seen)."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.ema.update()


class _Handles:
    """Several hook handles removed together (:meth:`EMA.hook`)."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self) -> _Handles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# -- helpers ------------------------------------------------------------------------------------------------
_SELECTION = ("include", "exclude", "predicate", "trainable_only")


def _check_options(**options: Any) -> None:
    """The keyword options of :class:`EMA` checked as it checks them, before there is a model (the adapters'
    constructors: their EMA is built when training starts): on a probe of one layer; ``device`` and the
    selection without allocating or reading a model."""
    selection = {k: options.pop(k) for k in _SELECTION if k in options}
    device = options.pop("device", None)
    EMA(nn.Linear(1, 1), **options)
    if device is not None:
        _check_device(device)
    parameter_selector(
        selection.get("include"),
        selection.get("exclude"),
        selection.get("predicate"),
        selection.get("trainable_only", False),
    )


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
