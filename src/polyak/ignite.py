"""``EMAHandler`` for pytorch-ignite: a drop-in for ``ignite.handlers.EMAHandler``, on the :class:`~polyak.EMA` core."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from polyak._extras import require

require("ignite", "polyak.EMAHandler")

import torch  # noqa: E402
from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList, State  # noqa: E402
from ignite.engine.events import RemovableEventHandle  # noqa: E402
from torch import nn  # noqa: E402

from polyak.ema import EMA, HANDLE_BUFFERS  # noqa: E402
from polyak.schedules import Schedule, _check_int, _check_momentum, constant, linear_warmup  # noqa: E402

__all__ = ["EMAHandler", "MomentumScheduler"]

# Attributes that ignite itself keeps on ``engine.state``: a momentum written there would clobber them.
_RESERVED_STATE_NAMES = frozenset(vars(State())) | {n for n in dir(State) if not n.startswith("__")}
_EVENT = str | Events | CallableEventWithFilter | EventsList


class _ModelError(ValueError, TypeError):
    """A model that is not an ``nn.Module``: a ``TypeError``, and a ``ValueError`` as ignite raises."""


class MomentumScheduler:
    """Writes the momentum of the next EMA update into ``engine.state.<param_name>``, before the update.

    The ``momentum_scheduler`` of :class:`EMAHandler`, in the place of ignite's ``LambdaStateScheduler``:
    :meth:`EMAHandler.attach` attaches it on the update's event, ahead of the update, where the handler has
    a warm-up or a ``schedule``. The momentum it writes is the schedule's at the EMA's own update count, so
    it never drifts from the updates; :meth:`state_dict` holds that count (the one of the handler's own
    state dict: loading either restores it) as plain values, so ignite's ``Checkpoint`` saves it and
    ``torch.load(..., weights_only=True)`` reads it back.

    Args:
        ema: the :class:`~polyak.EMA` whose schedule and update count it follows.
        param_name: the attribute of ``engine.state`` it writes.

    Example:
        >>> from torch import nn
        >>> from polyak import EMAHandler
        >>> handler = EMAHandler(nn.Linear(2, 1), momentum=0.01, momentum_warmup=0.1, warmup_iters=10)
        >>> handler.momentum_scheduler.get_param()   # the momentum of the first update
        0.1
        >>> handler.momentum_scheduler.state_dict()
        {'event_index': 0, 'param_name': 'ema_momentum'}
    """

    def __init__(self, ema: EMA, param_name: str = "ema_momentum") -> None:
        if not isinstance(ema, EMA):
            raise TypeError(f"ema must be a polyak.EMA, got {type(ema).__name__}")
        self.ema = ema
        self.param_name = param_name

    @property
    def event_index(self) -> int:
        """How many updates were scheduled (and made): the EMA's ``num_updates``."""
        return self.ema.num_updates

    def get_param(self) -> float:
        """The momentum of the next update."""
        return self.ema.momentum_at(self.ema.num_updates + 1)

    def __call__(self, engine: Engine) -> None:
        setattr(engine.state, self.param_name, self.get_param())

    def attach(self, engine: Engine, event: _EVENT = Events.ITERATION_COMPLETED) -> RemovableEventHandle:
        """Write the momentum on ``event`` of ``engine``; returns the removable handle."""
        return engine.add_event_handler(event, self)

    def state_dict(self) -> dict[str, Any]:
        return {"event_index": self.ema.num_updates, "param_name": self.param_name}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the update count (and so the point in the schedule); checked before it is set."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if "event_index" not in state_dict:
            raise ValueError(f"state_dict lacks 'event_index'; it has {sorted(state_dict)}")
        self.ema.num_updates = _check_int("state_dict['event_index']", state_dict["event_index"], 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(param_name={self.param_name!r}, schedule={self.ema.schedule!r})"


class _AttachHandle(RemovableEventHandle):
    """The handle :meth:`EMAHandler.attach` returns: ``remove()`` detaches the update and its scheduler."""

    def __init__(self, update: RemovableEventHandle, others: list[RemovableEventHandle]) -> None:
        # the update's own handle, taken over (its weak references included), with the scheduler's beside it
        self.event_name, self.handler, self.engine = update.event_name, update.handler, update.engine
        self._others = others

    def remove(self) -> None:
        super().remove()
        for handle in self._others:
            handle.remove()


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
        dtype, stochastic_rounding, seed, skip_nonfinite, device, flat, compile: keyword-only; passed to
            :class:`~polyak.EMA` (float32 masters for low-precision models by default, and so on).
        ema_model: keyword-only; the module to hold the average where the model cannot be deep-copied
            (FSDP2: build and shard it like the model); see :class:`~polyak.EMA`.
        per_step: keyword-only; the momentum is meant per iteration: an update after ``n`` iterations
            (``Events.ITERATION_COMPLETED(every=n)``) uses ``1 - (1 - m) ** n``, with ``m`` read from
            ``engine.state``. The handler counts the iterations between its updates itself.

    Attributes:
        ema_model: the averaged model, in eval mode unless ``handle_buffers="ema_train"``, on the online
            model's device; a ``DataParallel`` if ``model`` is one.
        model: the online model; ``model.module`` if ``model`` is ``DistributedDataParallel``.
        momentum: the update momentum (after the warm-up).
        momentum_warmup, warmup_iters: as given.
        handle_buffers: as given.
        momentum_scheduler: the :class:`MomentumScheduler` that writes the scheduled momentum to
            ``engine.state``; always present, attached only where there is a warm-up or a schedule.
            Assignable: a subclass may put ignite's ``LambdaStateScheduler`` here, as ignite's does.
        ema: the :class:`~polyak.EMA` underneath; ``ema.num_updates`` counts the updates.

    Note:
        To resume, put the handler itself in ``Checkpoint(to_save=...)``: its :meth:`state_dict` holds the
        EMA weights, the update count (so the warm-up resumes where it stopped) and the momentum that
        ``engine.state.<name>`` held, whether the checkpoint is loaded before or after :meth:`attach`.
        ignite's flow of saving ``ema_model`` on its own keeps working, but restores only the weights
        (saving ``momentum_scheduler`` beside it restores the update count too).

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
        if schedule is not None:
            if momentum_warmup is not None or momentum != 0.0002:
                raise ValueError(
                    "give either schedule or momentum/momentum_warmup/warmup_iters, not both: got "
                    f"schedule={schedule!r}, momentum={momentum!r}, momentum_warmup={momentum_warmup!r}"
                )
        elif momentum_warmup is not None:
            schedule = linear_warmup(momentum_warmup, momentum, warmup_iters)  # type: ignore[arg-type]
            momentum_warmup, warmup_iters = schedule.momentum_warmup, schedule.warmup_iters  # type: ignore[attr-defined]

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
        )
        self.momentum = momentum
        self.momentum_warmup = momentum_warmup
        self.warmup_iters = warmup_iters
        # ignite's protocol: the callable event_index -> momentum of the warm-up (or schedule), None without one
        self._momentum_lambda_obj: Schedule | None = schedule
        self.momentum_scheduler: Any = MomentumScheduler(self.ema)
        # engine.state.iteration at the last update, for per_step; saved, so a resumed run counts on
        self._last_iteration: int | None = None
        # the momentum of the last update (or the one loaded), for attach to put into engine.state
        self._momentum: float | None = None
        self._attached: list[tuple[weakref.ref[Engine], str]] = []

    # The core holds the state; these are views of it, under ignite's names.
    @property
    def model(self) -> nn.Module:
        return self.ema.model

    @property
    def ema_model(self) -> nn.Module:
        return self.ema.ema_model

    @property
    def handle_buffers(self) -> str:
        return self.ema.handle_buffers

    def attach(
        self,
        engine: Engine,
        name: str = "ema_momentum",
        warn_if_exists: bool = True,
        event: _EVENT = Events.ITERATION_COMPLETED,
    ) -> RemovableEventHandle:
        """Update the EMA on ``event`` of ``engine``, with the momentum held in ``engine.state.<name>``.

        Registers, in this order: :attr:`momentum_scheduler` (where there is a warm-up or a schedule), then
        :meth:`_update_ema_model`, both on ``event``.

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
            A removable handle: ``handle.remove()`` detaches the update and the scheduler.
        """
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an ignite Engine, got {type(engine).__name__}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be a Python identifier, got {name!r}")
        if name in _RESERVED_STATE_NAMES:
            raise ValueError(
                f"name must not be one of ignite's own Engine.state attributes "
                f"({', '.join(sorted(n for n in _RESERVED_STATE_NAMES if not n.startswith('_')))}), "
                f"got {name!r}"
            )
        if hasattr(engine.state, name):
            if warn_if_exists:
                warnings.warn(
                    f"Attribute '{name}' already exists in Engine.state. It might because 1. the engine has "
                    f"loaded its state dict or 2. {name} is already created by other handlers. Turn off this "
                    "warning by setting warn_if_exists to False.",
                    category=UserWarning,
                    stacklevel=2,
                )
        else:
            setattr(engine.state, name, self._current_momentum())
        self._attached.append((weakref.ref(engine), name))
        others = []
        if self.ema.per_step and not engine.has_event_handler(self._start_counting, Events.STARTED):
            others.append(engine.add_event_handler(Events.STARTED, self._start_counting))
        if self._momentum_lambda_obj is not None:
            # first the momentum, then the update that reads it
            self.momentum_scheduler = MomentumScheduler(self.ema, name)
            others.append(self.momentum_scheduler.attach(engine, event))
        return _AttachHandle(engine.add_event_handler(event, self._update_ema_model, name), others)

    def _current_momentum(self) -> float:
        """What ``engine.state.<name>`` starts with: the last one used (or loaded), else the schedule's."""
        if self._momentum is not None:
            return self._momentum
        return self.ema.momentum_at(max(1, self.ema.num_updates))

    def _start_counting(self, engine: Engine) -> None:
        # a first run, or a run that starts over (a finished engine restarts from iteration 0)
        if self._last_iteration is None or self._last_iteration > engine.state.iteration:
            self._last_iteration = engine.state.iteration

    def _update_ema_model(self, engine: Engine, name: str) -> None:
        """Update the EMA model with the momentum in ``engine.state.<name>``: the one place updates happen.

        :meth:`attach` registers this method, as ignite's does; a subclass that overrides it decides what an
        update is (e.g. averaging only some tensors, with ``self.model`` and ``self.ema_model``).
        """
        # the momentum of this update, in [0, 1]: whoever wrote it (ignite's schedulers write 0.0 too)
        momentum = _check_momentum(f"engine.state.{name}", getattr(engine.state, name, None), closed=True)
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
        return state

    def state_dict(self) -> dict[str, Any]:
        """The EMA weights and the update count, as in :meth:`polyak.EMA.state_dict`, and the momentum.

        ``"momentum"`` is what ``engine.state.<name>`` holds when saved (whoever wrote it): a resumed run puts
        it back, so the next update uses what it would have used without the interruption.
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
        self.ema.load_state_dict(state)
        if last is not None:
            self._last_iteration = last
        self._momentum = momentum
        for engine_ref, name in self._attached:
            engine = engine_ref()
            if engine is not None:
                setattr(engine.state, name, self._current_momentum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ema!r})"
