"""The registry of EMA implementations: ``IMPLS`` maps a key to an :class:`Impl`.

An implementation's ``setup(model, momentum)`` builds whatever it needs around the online ``model`` and
returns a zero-argument callable that performs exactly one EMA update with ``momentum`` (the weight of the
online model; ``decay = 1 - momentum`` for the libraries that speak of decay). To add one, decorate such a
function with :func:`register`; list the modules it imports in ``requires`` so that it is skipped, not
failed, where they are missing.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from benchmarks.shapes import floating_tensors

if TYPE_CHECKING:
    from ignite.engine import Engine

Step = Callable[[], object]
Setup = Callable[[nn.Module, float], Step]

# Keys of the two ignite rows that the others are compared with.
IGNITE_DIRECT = "ignite-direct"
IGNITE_FIRE = "ignite-fire"
FLOOR = "floor"


@dataclass(frozen=True)
class Impl:
    key: str
    label: str
    what: str  # exactly what one timed call does
    setup: Setup
    requires: tuple[str, ...] = ()
    ref: str | None = IGNITE_DIRECT  # the ignite row to compare with

    def missing(self) -> list[str]:
        """The required modules that cannot be imported here."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


IMPLS: dict[str, Impl] = {}


def register(
    key: str, label: str, what: str, *, requires: tuple[str, ...] = (), ref: str | None = IGNITE_DIRECT
) -> Callable[[Setup], Setup]:
    def decorator(setup: Setup) -> Setup:
        if key in IMPLS:
            raise ValueError(f"implementation {key!r} registered twice")
        IMPLS[key] = Impl(key, label, what, setup, requires, ref)
        return setup

    return decorator


# -- the floor -------------------------------------------------------------------------------------------
@register(
    FLOOR,
    "floor: a.lerp_(b, m)",
    "one lerp_ per dtype on two contiguous tensors holding as many elements as the model's floating "
    "tensors (read two, write one)",
    ref=None,
)
def _floor(model: nn.Module, momentum: float) -> Step:
    numel: dict[torch.dtype, int] = {}
    device = torch.device("cpu")
    for t in floating_tensors(model):
        numel[t.dtype] = numel.get(t.dtype, 0) + t.numel()
        device = t.device
    pairs = [
        (torch.rand(n, device=device).to(dtype), torch.rand(n, device=device).to(dtype)) for dtype, n in numel.items()
    ]
    if len(pairs) == 1:
        a, b = pairs[0]
        return functools.partial(a.lerp_, b, momentum)

    def step() -> None:
        for a, b in pairs:
            a.lerp_(b, momentum)

    return step


# -- polyak ----------------------------------------------------------------------------------------------
@register("polyak-ema", "polyak.EMA.update()", "EMA(model, momentum=m).update()")
def _polyak_ema(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA

    return EMA(model, momentum=momentum).update


def _engine() -> Engine:
    from ignite.engine import Engine  # ignite is imported only by the rows that need it

    return Engine(lambda engine, batch: None)


def _fire(engine: Engine) -> Step:
    from ignite.engine import Events

    # what Engine.run does after each iteration: dispatch to every ITERATION_COMPLETED handler
    return functools.partial(engine._fire_event, Events.ITERATION_COMPLETED)


@register(
    "polyak-direct",
    "polyak.EMAHandler (handler call)",
    "the registered handler called directly: handler._update(engine, 'ema_momentum') "
    "= ema.update() + setattr(engine.state, ...)",
    requires=("ignite",),
)
def _polyak_direct(model: nn.Module, momentum: float) -> Step:
    from polyak import EMAHandler

    handler, engine = EMAHandler(model, momentum=momentum), _engine()
    handler.attach(engine, "ema_momentum")
    return functools.partial(handler._update, engine, "ema_momentum")


@register(
    IGNITE_DIRECT,
    "ignite EMAHandler (handler call)",
    "the registered handler called directly: handler._update_ema_model(engine, 'ema_momentum')",
    requires=("ignite",),
)
def _ignite_direct(model: nn.Module, momentum: float) -> Step:
    from ignite.handlers import EMAHandler

    handler, engine = EMAHandler(model, momentum=momentum), _engine()
    handler.attach(engine, "ema_momentum")
    return functools.partial(handler._update_ema_model, engine, "ema_momentum")


@register(
    "polyak-fire",
    "polyak.EMAHandler (engine event)",
    "attached to an ignite Engine; engine._fire_event(Events.ITERATION_COMPLETED)",
    requires=("ignite",),
    ref=IGNITE_FIRE,
)
def _polyak_fire(model: nn.Module, momentum: float) -> Step:
    from polyak import EMAHandler

    handler, engine = EMAHandler(model, momentum=momentum), _engine()
    handler.attach(engine, "ema_momentum")
    return _fire(engine)


@register(
    IGNITE_FIRE,
    "ignite EMAHandler (engine event)",
    "attached to an ignite Engine; engine._fire_event(Events.ITERATION_COMPLETED)",
    requires=("ignite",),
    ref=IGNITE_FIRE,
)
def _ignite_fire(model: nn.Module, momentum: float) -> Step:
    from ignite.handlers import EMAHandler

    handler, engine = EMAHandler(model, momentum=momentum), _engine()
    handler.attach(engine, "ema_momentum")
    return _fire(engine)


# -- other libraries ---------------------------------------------------------------------------------
@register(
    "ema-pytorch",
    "ema-pytorch EMA (foreach)",
    "EMA(model, beta=1-m, update_every=1, update_after_step=0, use_foreach=True).update()",
    requires=("ema_pytorch",),
)
def _ema_pytorch(model: nn.Module, momentum: float) -> Step:
    from ema_pytorch import EMA

    ema = EMA(model, beta=1.0 - momentum, update_every=1, update_after_step=0, use_foreach=True)
    ema.update()  # the first call only copies the weights in; later ones are real updates
    return ema.update


@register(
    "swa-averaged",
    "torch AveragedModel (EMA multi_avg_fn)",
    "AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1-m), use_buffers=False).update_parameters(model)",
)
def _averaged_model(model: nn.Module, momentum: float) -> Step:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1.0 - momentum), use_buffers=False)
    averaged.update_parameters(model)  # the first call only copies the weights in
    return functools.partial(averaged.update_parameters, model)


@register(
    "torch-ema",
    "torch-ema ExponentialMovingAverage",
    "ExponentialMovingAverage(model.parameters(), decay=1-m).update()",
    requires=("torch_ema",),
)
def _torch_ema(model: nn.Module, momentum: float) -> Step:
    from torch_ema import ExponentialMovingAverage

    return ExponentialMovingAverage(model.parameters(), decay=1.0 - momentum).update
