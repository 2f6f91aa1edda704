"""``EMAHandler`` for pytorch-ignite: a drop-in for ``ignite.handlers.EMAHandler``, on the :class:`~polyak.EMA` core."""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from polyak._extras import require

require("ignite", "polyak.EMAHandler")

import torch  # noqa: E402
from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList, State  # noqa: E402
from ignite.engine.events import RemovableEventHandle  # noqa: E402
from torch import nn  # noqa: E402

from polyak._tracking import unwrap_model  # noqa: E402
from polyak._warn import warn  # noqa: E402
from polyak.ema import EMA, HANDLE_BUFFERS  # noqa: E402
from polyak.schedules import (  # noqa: E402
    Schedule,
    _check_int,
    _check_momentum,
    _warmup,
    constant,
    delayed,
    linear_warmup,
)

__all__ = ["EMAHandler", "EMAWarmUp", "MomentumScheduler"]

# Attributes that ignite itself keeps on ``engine.state``: a momentum written there would clobber them.
_RESERVED_STATE_NAMES = frozenset(vars(State())) | {n for n in dir(State) if not n.startswith("__")}
_EVENT = str | Events | CallableEventWithFilter | EventsList


class _ModelError(ValueError, TypeError):
    """A model that is not an ``nn.Module``: a ``TypeError``, and a ``ValueError`` as ignite raises."""


class _WarmUpState(dict):
    """The state of an :class:`EMAWarmUp`: a dict of its three numbers that is also the warm-up itself.

    Callable, because ignite's ``LambdaStateScheduler.load_state_dict`` puts the saved ``lambda_obj`` in the
    place of its own (ignite's ``EMAWarmUp`` has no ``load_state_dict``) and calls it at the next event: a
    checkpoint written on polyak's handler then resumes on ignite's. Its name is part of the checkpoint format
    (``polyak.ignite._WarmUpState``): keep it. Registered for ``torch.load(weights_only=True)`` below.
    """

    def __call__(self, event_index: int) -> float:
        return _warmup(self["momentum_warmup"], self["momentum"], self["warmup_iters"], event_index)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_WarmUpState, (dict(self),))  # a plain dict inside: what weights_only=True reads


torch.serialization.add_safe_globals([_WarmUpState])


class EMAWarmUp:
    """ignite's warm-up object, kept by :class:`EMAHandler` as ``_momentum_lambda_obj``: the momentum of the
    1-based ``event_index``, linear from ``momentum_warmup`` to ``momentum`` over ``warmup_iters`` events, with
    ignite's arithmetic to the last bit (:func:`polyak.schedules.linear_warmup`). Its attributes can be set, as
    ignite's; ``state_dict()`` holds them as plain values (a dict), so a ``LambdaStateScheduler`` holding it saves
    and loads (``weights_only=True``) where ignite's cannot; that dict is callable as the warm-up, so ignite's
    handler resumes from the same checkpoint (its ``LambdaStateScheduler`` takes the saved value as its
    ``lambda_obj``).

    Example:
        >>> from polyak.ignite import EMAWarmUp
        >>> warmup = EMAWarmUp(momentum_warmup=0.5, warmup_iters=5, momentum=0.1)
        >>> [round(warmup(k), 6) for k in (1, 2, 5, 6)]
        [0.5, 0.4, 0.1, 0.1]
    """

    def __init__(self, momentum_warmup: float, warmup_iters: int, momentum: float) -> None:
        checked = linear_warmup(momentum_warmup, momentum, warmup_iters)
        self.momentum_warmup = checked.momentum_warmup  # type: ignore[attr-defined]
        self.warmup_iters = checked.warmup_iters  # type: ignore[attr-defined]
        self.momentum = checked.momentum  # type: ignore[attr-defined]

    def __call__(self, event_index: int) -> float:
        return _warmup(self.momentum_warmup, self.momentum, self.warmup_iters, event_index)

    def state_dict(self) -> dict[str, Any]:
        """The warm-up's three numbers, as plain values, in a dict that is callable as the warm-up."""
        return _WarmUpState(
            momentum_warmup=self.momentum_warmup, warmup_iters=self.warmup_iters, momentum=self.momentum
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take the warm-up saved (as ignite's ``LambdaStateScheduler`` does); checked before it is set."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = {"momentum_warmup", "warmup_iters", "momentum"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}; it has {sorted(state_dict)}")
        checked = EMAWarmUp(state_dict["momentum_warmup"], state_dict["warmup_iters"], state_dict["momentum"])
        self.__dict__.update(vars(checked))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(momentum_warmup={self.momentum_warmup!r}, warmup_iters={self.warmup_iters!r}, "
            f"momentum={self.momentum!r})"
        )


class MomentumScheduler:
    """Writes the momentum of the next EMA update into ``engine.state.<param_name>``, before the update.

    The ``momentum_scheduler`` of :class:`EMAHandler`, in the place of ignite's ``LambdaStateScheduler``: like
    it, it counts its events (``event_index``) and writes ``lambda_obj(event_index)``; :meth:`EMAHandler.attach`
    attaches it on the update's event, ahead of the update, where the handler has a warm-up or a ``schedule``.
    Unlike ignite's, ``state_dict()`` holds plain values only (the count and the name), so ignite's
    ``Checkpoint`` saves it and ``torch.load(..., weights_only=True)`` reads it back.

    Args:
        lambda_obj: the momentum of each 1-based event index (the handler's ``_momentum_lambda_obj``).
        param_name: the attribute of ``engine.state`` it writes.
        event_index: how many events came before (to continue a count).

    Example:
        >>> from torch import nn
        >>> from polyak import EMAHandler
        >>> handler = EMAHandler(nn.Linear(2, 1), momentum=0.01, momentum_warmup=0.1, warmup_iters=10)
        >>> handler.momentum_scheduler.get_param()   # the momentum of the next event
        0.1
        >>> handler.momentum_scheduler.state_dict()
        {'event_index': 0, 'param_name': 'ema_momentum'}
    """

    def __init__(self, lambda_obj: Schedule, param_name: str = "ema_momentum", event_index: int = 0) -> None:
        if not callable(lambda_obj):
            raise TypeError(f"lambda_obj must be a callable event_index -> momentum, got {lambda_obj!r}")
        self.lambda_obj = lambda_obj
        self.param_name = param_name
        self.event_index = _check_int("event_index", event_index, 0)

    def get_param(self) -> float:
        """The momentum of the next event."""
        return float(self.lambda_obj(self.event_index + 1))

    def __call__(self, engine: Engine) -> None:
        self.event_index += 1
        setattr(engine.state, self.param_name, float(self.lambda_obj(self.event_index)))

    def attach(self, engine: Engine, event: _EVENT = Events.ITERATION_COMPLETED) -> RemovableEventHandle:
        """Write the momentum on ``event`` of ``engine``; returns the removable handle."""
        return engine.add_event_handler(event, self)

    def state_dict(self) -> dict[str, Any]:
        """The count of events and the name of the attribute written, as plain values."""
        return {"event_index": self.event_index, "param_name": self.param_name}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the count of events (and so the point in the warm-up); checked before it is set."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if "event_index" not in state_dict:
            raise ValueError(f"state_dict lacks 'event_index'; it has {sorted(state_dict)}")
        self.event_index = _check_int("state_dict['event_index']", state_dict["event_index"], 0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lambda_obj={self.lambda_obj!r}, param_name={self.param_name!r}, "
            f"event_index={self.event_index})"
        )


class _AttachHandle(RemovableEventHandle):
    """The handle :meth:`EMAHandler.attach` returns: ``remove()`` detaches the update and its scheduler."""

    def __init__(self, update: RemovableEventHandle, others: list[RemovableEventHandle], forget: Any) -> None:
        # the update's own handle, taken over (its weak references included), with the scheduler's beside it
        self.event_name, self.handler, self.engine = update.event_name, update.handler, update.engine
        self._others = others
        self._forget = forget

    def remove(self) -> None:
        super().remove()
        for handle in self._others:
            handle.remove()
        self._forget()


class EMAHandler:
    r"""Exponential moving average (EMA) of a model's weights, updated on an ignite ``Engine``'s events.

    A drop-in replacement for ``ignite.handlers.EMAHandler``: the same signature, attributes, events and
    results, and the same protocol for subclasses (``_momentum_lambda_obj``, ``momentum_scheduler``,
    ``_update_ema_model(engine, name)``). It is right where ignite 0.5's is wrong: the warm-up happens under
    any ``name`` and resumes where it stopped (the handler has a ``state_dict``); ``"copy"`` copies buffer
    values instead of sharing storage; low-precision models are averaged in a float32 master; a ``name``
    that ignite uses itself (``iteration``, ``epoch``, ...) and half a warm-up are refused. The rule: an
    argument ignite handles sensibly behaves exactly as in ignite; one it mishandles silently is refused with
    an error that says why. The update rule, with ``m`` the momentum (the weight of the online model)::

        ema_{t+1} = (1 - m) * ema_t + m * theta_t

    **Where the momentum comes from.** As in ignite, each update uses the momentum that
    ``engine.state.<name>`` holds at that moment (``engine.state.ema_momentum`` by default), so a
    ``StateParamScheduler``, another handler or a subclass can drive it. :meth:`attach` sets it once, to the
    momentum of the next update, if the engine has no such attribute yet. With a warm-up or a ``schedule``,
    :attr:`momentum_scheduler` is attached on the same event ahead of the update and writes the schedule's
    momentum before every update: the schedule wins over anything written earlier. Without one, nothing of
    polyak's writes it again: the last value written before an update is the one used.

    Args:
        model: the online model for which an EMA model will be computed. If ``model`` is ``DataParallel``
            or ``DistributedDataParallel``, the EMA smoothing will be applied to ``model.module``.
        momentum: the update momentum after the warm-up, in (0, 1): a number, a numpy scalar or a
            one-element tensor.
        momentum_warmup: the momentum of the first update of the warm-up, in [0, 1].
        warmup_iters: the number of updates over which the momentum goes linearly from
            ``momentum_warmup`` to ``momentum`` (>= 0; 0, 1 and 2 all mean: ``momentum_warmup`` for the
            first update, ``momentum`` from the second on, as in ignite). Give both or neither.
        handle_buffers: how to handle model buffers: ``"copy"`` copies the online model's buffer values;
            ``"update"`` averages floating buffers (integer ones are copied); ``"ema_train"`` puts the EMA
            model in train mode and leaves its buffers alone.
        schedule: keyword-only; any callable ``k -> momentum`` of the 1-based update index (see
            :mod:`polyak.schedules`), instead of ``momentum``/``momentum_warmup``/``warmup_iters``.
        copy_first: keyword-only; how many updates copy the online model before the averaging (and the
            warm-up) starts: a delayed start (see :class:`~polyak.EMA`). Not in ignite. With it the handler
            has a schedule, as with a warm-up: ``momentum_scheduler`` writes the momentum of every update (1
            for those), and ``_momentum_lambda_obj`` is the delayed schedule, not ignite's warm-up object.
        dtype, stochastic_rounding, seed, skip_nonfinite, device, flat, compile: keyword-only; passed to
            :class:`~polyak.EMA` (float32 masters for low-precision models by default, and so on).
        ema_model: keyword-only; the module to hold the average where the model cannot be deep-copied
            (FSDP2: build and shard it like the model); see :class:`~polyak.EMA`.
        include, exclude, predicate, trainable_only: keyword-only; which parameters are averaged (the others
            are shared with the model); see :class:`~polyak.EMA`. ``trainable_only=True`` is the EMA of a
            LoRA adapter at the adapter's cost.
        per_step: keyword-only; the momentum is meant per iteration: an update after ``n`` iterations
            (``Events.ITERATION_COMPLETED(every=n)``) uses ``1 - (1 - m) ** n``, with ``m`` read from
            ``engine.state``. The handler counts the iterations between its updates itself.

    Attributes:
        momentum: the update momentum (after the warm-up).
        momentum_warmup: as given.
        warmup_iters: as given.
        momentum_scheduler: the :class:`MomentumScheduler` that writes the scheduled momentum to
            ``engine.state``; always present, attached only where there is a warm-up or a schedule.
            Assignable: a subclass may put ignite's ``LambdaStateScheduler`` here, as ignite's does.
        ema: the :class:`~polyak.EMA` underneath; ``ema.num_updates`` counts the updates.

    Note:
        To resume, put the handler itself in ``Checkpoint(to_save=...)``: its :meth:`state_dict` holds the
        EMA weights, the update count (so the warm-up resumes where it stopped) and the momentum that
        ``engine.state.<name>`` held, whether the checkpoint is loaded before or after :meth:`attach`.
        ignite's flow of saving ``ema_model`` on its own keeps working, but restores only the weights
        (saving ``momentum_scheduler`` beside it restores the update count too). A run resumed from a
        checkpoint without the EMA (the engine starts past iteration 0, the EMA neither loaded nor updated)
        restarts the EMA from the loaded model, with a warning. :meth:`attach` to an engine it is attached to
        already is refused.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ignite.engine import Engine, Events
        >>> from polyak import EMAHandler
        >>> model = nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def train_step(engine, batch):
        ...     optimizer.zero_grad()
        ...     loss = model(batch).pow(2).mean()
        ...     loss.backward()
        ...     optimizer.step()
        ...     return loss.item()
        >>> trainer = Engine(train_step)
        >>> ema_handler = EMAHandler(model, momentum=0.002, momentum_warmup=0.2, warmup_iters=100)
        >>> handle = ema_handler.attach(trainer, name="ema_momentum")
        >>> state = trainer.run([torch.randn(8, 2) for _ in range(50)], max_epochs=1)
        >>> round(trainer.state.ema_momentum, 6), ema_handler.ema.num_updates
        (0.102, 50)
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        momentum_warmup: float | None = None,
        warmup_iters: int | None = None,
        handle_buffers: str = "copy",
        *,
        schedule: Schedule | None = None,
        copy_first: int = 0,
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
        predicate: Callable[[str, torch.Tensor], bool] | None = None,
        trainable_only: bool = False,
    ) -> None:
        try:
            momentum = _check_momentum("momentum", momentum)
        except (TypeError, ValueError) as e:
            raise ValueError(f"Invalid momentum: {momentum!r}; {e}") from e
        if (momentum_warmup is None) != (warmup_iters is None):
            raise ValueError(
                "momentum_warmup and warmup_iters go together: give both or neither (ignite silently drops a "
                f"half-given warm-up), got momentum_warmup={momentum_warmup!r}, warmup_iters={warmup_iters!r}"
            )
        if not isinstance(model, nn.Module):
            raise _ModelError(
                f"model should be an instance of nn.Module or its subclasses, but got {type(model).__name__}: {model!r}"
            )
        if handle_buffers not in HANDLE_BUFFERS:
            raise ValueError(
                f"handle_buffers can only be one of 'copy', 'update', 'ema_train', but got {handle_buffers!r}"
            )
        if schedule is not None and (momentum_warmup is not None or momentum != 0.0002):
            raise ValueError(
                "give either schedule or momentum/momentum_warmup/warmup_iters, not both: got "
                f"schedule={schedule!r}, momentum={momentum!r}, momentum_warmup={momentum_warmup!r}"
            )
        lambda_obj: Schedule | None = schedule
        if momentum_warmup is not None:
            lambda_obj = EMAWarmUp(momentum_warmup, warmup_iters, momentum)  # type: ignore[arg-type]
            momentum_warmup, warmup_iters = lambda_obj.momentum_warmup, lambda_obj.warmup_iters
            schedule = linear_warmup(momentum_warmup, momentum, warmup_iters)
        copy_first = _check_int("copy_first", copy_first, 0)
        if copy_first:
            schedule = delayed(schedule if schedule is not None else constant(momentum), copy_first)
            lambda_obj = schedule

        self.ema = EMA(
            model,
            schedule=schedule if schedule is not None else constant(momentum),
            handle_buffers=handle_buffers,
            dtype=dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            per_step=per_step,
            skip_nonfinite=skip_nonfinite,
            device=device,
            flat=flat,
            ema_model=ema_model,
            compile=compile,
            include=include,
            exclude=exclude,
            predicate=predicate,
            trainable_only=trainable_only,
        )
        self.momentum = momentum
        self.copy_first = copy_first
        self.momentum_warmup = momentum_warmup
        self.warmup_iters = warmup_iters
        # ignite's protocol: the callable event_index -> momentum of the warm-up (or schedule), None without one
        self._momentum_lambda_obj: Schedule | None = lambda_obj
        self.momentum_scheduler: Any = MomentumScheduler(lambda_obj or constant(momentum))
        # engine.state.iteration at the last update, for per_step; saved, so a resumed run counts on
        self._last_iteration: int | None = None
        self._momentum: float | None = None  # the momentum of the last update
        self._loaded_momentum: float | None = None  # the one engine.state held when saved, for attach to restore
        self._attached: list[tuple[weakref.ref[Engine], str]] = []
        # the EMA model's tensors as built: a run resumed with them unwritten and no update made did not load the
        # EMA (a checkpoint without it), and the EMA would average the loaded model into the weights it was built from
        self._built_versions = self._ema_versions()

    # The core holds the state; these are views of it, under ignite's names. Assigning what they already are
    # (subclasses built like ignite's do) is fine; another EMA model is followed (see polyak.EMA.ema_model).
    @property
    def model(self) -> nn.Module:
        """The online model (``model.module`` for ``DistributedDataParallel``)."""
        return self.ema.model

    @model.setter
    def model(self, value: nn.Module) -> None:
        if value is not self.ema.model and unwrap_model(value) is not unwrap_model(self.ema.model):
            raise ValueError(
                "EMAHandler.model is the model given at construction; to average another model, build a new "
                f"EMAHandler for it (got {type(value).__name__})"
            )

    @property
    def ema_model(self) -> nn.Module:
        """The averaged model, in eval mode unless ``handle_buffers="ema_train"``, on the online model's device (a
        ``DataParallel`` if the model is one); assigning another module (built like the model) makes it the EMA
        model."""
        return self.ema.ema_model

    @ema_model.setter
    def ema_model(self, value: nn.Module) -> None:
        self.ema.ema_model = value

    @property
    def handle_buffers(self) -> str:
        """What happens to buffers at each update (``"copy"``, ``"update"`` or ``"ema_train"``); assignable."""
        return self.ema.handle_buffers

    @handle_buffers.setter
    def handle_buffers(self, value: str) -> None:
        self.ema.handle_buffers = value

    def attach(
        self,
        engine: Engine,
        name: str = "ema_momentum",
        warn_if_exists: bool = True,
        event: _EVENT = Events.ITERATION_COMPLETED,
    ) -> RemovableEventHandle:
        """Update the EMA on ``event`` of ``engine``, with the momentum held in ``engine.state.<name>``.

        Registers, in this order: a :class:`MomentumScheduler` of ``_momentum_lambda_obj`` as
        :attr:`momentum_scheduler` (where there is a warm-up or a schedule), then ``_update_ema_model``, both
        on ``event``. ``momentum`` and ``_momentum_lambda_obj`` are read now, as ignite does.

        Args:
            engine: the trainer to attach to.
            name: the attribute of ``engine.state`` that holds the momentum. It should be unique, since a
                trainer can have several EMA handlers; ignite's own attributes (``iteration``, ``epoch``,
                ``output``, ...) are refused.
            warn_if_exists: warn if ``engine.state`` already has ``name`` (then it is left as it is): either
                the engine loaded it from a checkpoint (no harm; set ``warn_if_exists=False``) or another
                handler uses that name (choose another).
            event: when to update: any event, a filtered one (``Events.ITERATION_COMPLETED(every=5)``) or
                several combined with ``|``.

        Returns:
            A removable handle; ``handle.remove()`` detaches the update and the scheduler.

        Raises:
            ValueError: where this handler is attached to ``engine`` already (ignite would update twice per
                event). Attaching it to another engine as well (a second training phase) is fine.
        """
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an ignite Engine, got {type(engine).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in _RESERVED_STATE_NAMES:
            raise ValueError(
                f"name must not be one of ignite's own Engine.state attributes "
                f"({', '.join(sorted(n for n in _RESERVED_STATE_NAMES if not n.startswith('_')))}), "
                f"got {name!r}"
            )
        for engine_ref, attached_name in self._attached:
            if engine_ref() is engine:
                # ignite registers the update again: every event would then update the EMA twice
                raise ValueError(
                    f"engine already has this EMAHandler attached (name={attached_name!r}), got engine={engine!r} "
                    "again: a second attach would update the EMA twice per event. To update on several events, "
                    "attach once with them combined (event=Events.ITERATION_COMPLETED | Events.EPOCH_COMPLETED); "
                    "to attach it anew, call remove() on the handle the first attach returned"
                )
        lambda_obj = self._momentum_lambda_obj
        scheduler = None
        if lambda_obj is not None:
            current = self.momentum_scheduler
            if isinstance(current, MomentumScheduler) and not self._attached:
                # the object a checkpoint's to_save may already hold: it goes on being the one that counts
                scheduler, current.lambda_obj, current.param_name = current, lambda_obj, name
            else:
                before = getattr(current, "event_index", 0)
                scheduler = MomentumScheduler(lambda_obj, name, event_index=before if isinstance(before, int) else 0)
        # registered first (a bad event is refused here, before anything changed): the momentum, then the update
        handles = [scheduler.attach(engine, event)] if scheduler is not None else []
        try:
            update = engine.add_event_handler(event, self._update_ema_model, name)
            if self.ema.per_step and not engine.has_event_handler(self._start_counting, Events.STARTED):
                handles.append(engine.add_event_handler(Events.STARTED, self._start_counting))
            handles.append(engine.add_event_handler(Events.STARTED, self._restart_if_not_loaded))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        if hasattr(engine.state, name):
            if warn_if_exists:
                warnings.warn(
                    f"Attribute '{name}' already exists in Engine.state. It might because 1. the engine has "
                    f"loaded its state dict or 2. {name} is already created by other handlers. Turn off this "
                    "warning by setting warn_if_exists to False.",
                    category=UserWarning,
                    stacklevel=2,
                )
        elif self._loaded_momentum is not None:
            setattr(engine.state, name, self._loaded_momentum)
        elif scheduler is not None:
            setattr(engine.state, name, scheduler.get_param())
        else:
            setattr(engine.state, name, self.momentum)
        self._loaded_momentum = None  # restored once, into the engine of the resumed run
        if scheduler is not None:
            self.momentum_scheduler = scheduler
        entry = (weakref.ref(engine), name)
        self._attached.append(entry)
        return _AttachHandle(update, handles, lambda: entry in self._attached and self._attached.remove(entry))

    def _ema_versions(self) -> tuple[int, ...]:
        ema_model = unwrap_model(self.ema.ema_model)
        return tuple(t._version for t in itertools.chain(ema_model.parameters(), ema_model.buffers()))

    def _restart_if_not_loaded(self, engine: Engine) -> None:
        """A run resumed (the engine starts past iteration 0) from a checkpoint without the EMA: the EMA model
        still holds the weights it was built from, before the model was loaded. It restarts from the model's
        loaded weights (with a warning), instead of averaging them into a state of the model that is gone."""
        if engine.state.iteration == 0 or self.ema.num_updates or self._ema_versions() != self._built_versions:
            return
        warn(
            f"EMAHandler: the engine resumes at iteration {engine.state.iteration} but the EMA was not loaded (it "
            "holds the weights it was built from): it restarts from the model's current weights. To resume it, put "
            "the handler (or ema_model) in the Checkpoint's to_save and to_load.",
            UserWarning,
        )
        online = unwrap_model(self.ema.model).state_dict()
        self.ema.load_state_dict({"num_updates": 0, "ema_model": online})
        self._built_versions = ()

    def _start_counting(self, engine: Engine) -> None:
        # a first run, or a run that starts over (a finished engine restarts from iteration 0)
        if self._last_iteration is None or self._last_iteration > engine.state.iteration:
            self._last_iteration = engine.state.iteration

    def _update_ema_model(self, engine: Engine, name: str) -> None:
        """Update the EMA model with the momentum in ``engine.state.<name>``: the one place updates happen.

        :meth:`attach` registers this method, as ignite's does; a subclass that overrides it decides what an
        update is (e.g. averaging only some tensors, with ``self.model`` and ``self.ema_model``).
        """
        if not hasattr(engine.state, name):
            raise AttributeError(
                f"engine.state has no attribute {name!r}: EMAHandler.attach(engine, name={name!r}) sets it"
            )
        # the momentum of this update, in [0, 1]: whoever wrote it (ignite's schedulers write 0.0 too)
        momentum = _check_momentum(f"engine.state.{name}", getattr(engine.state, name), closed=True)
        steps = 1
        if self.ema.per_step:
            steps = engine.state.iteration - (self._last_iteration or 0)
            self._last_iteration = engine.state.iteration
            if steps < 1:  # an event that fired again within the same iteration
                return
        self.ema.update(steps=steps, momentum=momentum)
        self._momentum = momentum

    def swapped(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Evaluate with the EMA weights in the online model itself; see :meth:`polyak.EMA.swapped`."""
        return self.ema.swapped()

    def _engine_momentum(self) -> float | None:
        """What the next update would read: ``engine.state`` of the engine attached last, while it lives and
        holds a valid momentum (a scheduler may have written the next one after the last update), else the
        momentum of the last update."""
        for engine_ref, name in reversed(self._attached):
            engine = engine_ref()
            if engine is not None:
                with contextlib.suppress(TypeError, ValueError):
                    return _check_momentum(name, getattr(engine.state, name, None), closed=True)
                break
        return self._momentum

    def _own_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._last_iteration is not None:
            state["last_iteration"] = self._last_iteration
        momentum = self._engine_momentum()
        if momentum is not None:
            state["momentum"] = momentum
        events = getattr(self.momentum_scheduler, "event_index", None)
        if self._momentum_lambda_obj is not None and isinstance(events, int):
            state["scheduler_events"] = events
        return state

    def state_dict(self) -> dict[str, Any]:
        """The EMA weights and the update count, as in :meth:`polyak.EMA.state_dict`, and the momentum.

        ``"momentum"`` is what ``engine.state.<name>`` holds when saved (whoever wrote it): a resumed run puts
        it back, so the next update uses what it would have used without the interruption.
        ``"scheduler_events"`` is where the warm-up is (``momentum_scheduler.event_index``).
        """
        return {**self.ema.state_dict(), **self._own_state()}

    def full_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with whole tensors on the CPU: see :meth:`polyak.EMA.full_state_dict` (FSDP2)."""
        return {**self.ema.full_state_dict(), **self._own_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (or :meth:`full_state_dict`); the warm-up continues where it stopped.

        Everything is checked before anything changes. The momentum saved is put back into
        ``engine.state`` of the engines this handler is attached to, or by :meth:`attach` later.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        state = dict(state_dict)
        last = state.pop("last_iteration", None)
        if last is not None:
            last = _check_int("state_dict['last_iteration']", last, 0)
        momentum = state.pop("momentum", None)
        if momentum is not None:
            momentum = _check_momentum("state_dict['momentum']", momentum, closed=True)
        events = state.pop("scheduler_events", None)
        if events is not None:
            events = _check_int("state_dict['scheduler_events']", events, 0)
        self.ema.load_state_dict(state)
        if last is not None:
            self._last_iteration = last
        if events is not None and hasattr(self.momentum_scheduler, "event_index"):
            self.momentum_scheduler.event_index = events
        self._momentum = momentum
        live = [(e(), name) for e, name in self._attached if e() is not None]
        if momentum is not None:
            for engine, name in live:
                setattr(engine.state, name, momentum)
        self._loaded_momentum = momentum if not live else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ema!r})"
