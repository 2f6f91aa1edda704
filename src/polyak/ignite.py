"""``EMAHandler`` for pytorch-ignite: a drop-in for ``ignite.handlers.EMAHandler``, on the :class:`~polyak.EMA` core."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList, State
from ignite.engine.events import RemovableEventHandle
from torch import nn

from polyak.ema import EMA, HANDLE_BUFFERS
from polyak.schedules import Schedule, _check_momentum, constant, linear_warmup

__all__ = ["EMAHandler"]

# Attributes that ignite itself keeps on ``engine.state``: a momentum written there would clobber them.
_RESERVED_STATE_NAMES = frozenset(vars(State())) | {n for n in dir(State) if not n.startswith("__")}


class _ModelError(ValueError, TypeError):
    """A model that is not an ``nn.Module``: a ``TypeError``, and a ``ValueError`` as ignite raises."""


class EMAHandler:
    r"""Exponential moving average (EMA) of a model's weights, updated on an ignite ``Engine``'s events.

    A drop-in replacement for ``ignite.handlers.EMAHandler`` with the same signature and behaviour, and
    right where ignite 0.5's is wrong: the warm-up happens under any ``name`` and resumes where it stopped
    (the handler has a ``state_dict``); ``"copy"`` copies buffer values instead of sharing storage; a
    ``name`` that ignite uses itself (``iteration``, ``epoch``, ...) is refused; arguments are checked. The
    update rule, with ``m`` the momentum (the weight of the online model)::

        ema_{t+1} = (1 - m) * ema_t + m * theta_t

    The momentum in use is written to ``engine.state.<name>`` (``engine.state.ema_momentum`` by default)
    at each update; before the first update it holds the momentum the first update will use, and after
    :meth:`load_state_dict` that of the last update restored.

    Args:
        model: the online model for which an EMA model will be computed. If ``model`` is ``DataParallel``
            or ``DistributedDataParallel``, the EMA smoothing will be applied to ``model.module``.
        momentum: the update momentum after the warm-up, in (0, 1).
        momentum_warmup: the momentum of the first update of the warm-up, in [0, 1].
        warmup_iters: the number of updates over which the momentum goes linearly from
            ``momentum_warmup`` to ``momentum`` (>= 1). Give both or neither.
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
            (``Events.ITERATION_COMPLETED(every=n)``) uses ``1 - (1 - m) ** n``. The handler counts the
            iterations between its updates itself.

    Attributes:
        ema_model: the averaged model, in eval mode unless ``handle_buffers="ema_train"``, on the online
            model's device; a ``DataParallel`` if ``model`` is one.
        model: the online model; ``model.module`` if ``model`` is ``DistributedDataParallel``.
        momentum: the update momentum (after the warm-up).
        handle_buffers: as given.
        momentum_scheduler: the schedule ``k -> momentum`` in use, always present (a constant one when
            there is no warm-up).
        ema: the :class:`~polyak.EMA` underneath; ``ema.num_updates`` counts the updates.

    Note:
        To resume, put the handler itself in ``Checkpoint(to_save=...)``: its :meth:`state_dict` holds the
        EMA weights and the update count, so the warm-up resumes where it stopped, whether the checkpoint
        is loaded before or after :meth:`attach`. ignite's flow of saving ``ema_model`` on its own keeps
        working, but restores only the weights.

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
                "momentum_warmup and warmup_iters go together: give both or neither, got "
                f"momentum_warmup={momentum_warmup!r}, warmup_iters={warmup_iters!r}"
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
        else:
            schedule = constant(momentum)

        self.ema = EMA(
            model,
            schedule=schedule,
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
        # engine.state.iteration at the last update, for per_step; saved, so a resumed run counts on
        self._last_iteration: int | None = None
        self._attached: list[tuple[weakref.ref[Engine], str]] = []
        self.momentum = momentum
        self.momentum_warmup = momentum_warmup
        self.warmup_iters = warmup_iters

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

    @property
    def momentum_scheduler(self) -> Schedule:
        return self.ema.schedule

    def attach(
        self,
        engine: Engine,
        name: str = "ema_momentum",
        warn_if_exists: bool = True,
        event: str | Events | CallableEventWithFilter | EventsList = Events.ITERATION_COMPLETED,
    ) -> RemovableEventHandle:
        """Update the EMA on ``event`` of ``engine``, and keep the momentum in ``engine.state.<name>``.

        Args:
            engine: the trainer to attach to.
            name: the attribute of ``engine.state`` that holds the current momentum. It should be unique,
                since a trainer can have several EMA handlers; ignite's own attributes (``iteration``,
                ``epoch``, ``output``, ...) are refused.
            warn_if_exists: warn if ``engine.state`` already has ``name``: either the engine loaded it from
                a checkpoint (no harm; set ``warn_if_exists=False``) or another handler uses that name
                (choose another).
            event: when to update: any event, a filtered one (``Events.ITERATION_COMPLETED(every=5)``) or
                several combined with ``|``.

        Returns:
            The removable handle of the registered handler: ``handle.remove()`` detaches it.
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
        if self.ema.per_step and not engine.has_event_handler(self._start_counting, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self._start_counting)
        return engine.add_event_handler(event, self._update, name)

    def _current_momentum(self) -> float:
        """The momentum of the latest update, or before any, that of the first."""
        return self.ema.momentum_at(max(1, self.ema.num_updates))

    def _start_counting(self, engine: Engine) -> None:
        # a first run, or a run that starts over (a finished engine restarts from iteration 0)
        if self._last_iteration is None or self._last_iteration > engine.state.iteration:
            self._last_iteration = engine.state.iteration

    def _update(self, engine: Engine, name: str) -> None:
        if self.ema.per_step:
            steps = engine.state.iteration - (self._last_iteration or 0)
            self._last_iteration = engine.state.iteration
            if steps < 1:  # an event that fired again within the same iteration
                return
            setattr(engine.state, name, self.ema.update(steps=steps))
        else:
            setattr(engine.state, name, self.ema.update())

    def swapped(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Evaluate with the EMA weights in the online model itself; see :meth:`polyak.EMA.swapped`."""
        return self.ema.swapped()

    def state_dict(self) -> dict[str, Any]:
        """The EMA weights and the update count, as in :meth:`polyak.EMA.state_dict`."""
        state = self.ema.state_dict()
        if self._last_iteration is not None:
            state["last_iteration"] = self._last_iteration
        return state

    def full_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with whole tensors on the CPU: see :meth:`polyak.EMA.full_state_dict` (FSDP2)."""
        state = self.ema.full_state_dict()
        if self._last_iteration is not None:
            state["last_iteration"] = self._last_iteration
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (or :meth:`full_state_dict`); the warm-up continues where it stopped."""
        state = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        last = state.pop("last_iteration", None) if isinstance(state, dict) else None
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ValueError(f"state_dict['last_iteration'] must be an int >= 0, got {last!r}")
        self.ema.load_state_dict(state)
        if last is not None:
            self._last_iteration = last
        for engine_ref, name in self._attached:
            engine = engine_ref()
            if engine is not None:
                setattr(engine.state, name, self._current_momentum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ema!r})"
