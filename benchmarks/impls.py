"""The registry of EMA implementations: ``IMPLS`` maps a key to an :class:`Impl`.

An implementation's ``setup(model, momentum)`` builds whatever it needs around the online ``model`` and
returns a zero-argument callable that performs exactly one EMA update with ``momentum`` (the weight of the
online model; ``decay = 1 - momentum`` for the libraries that speak of decay). To add one, decorate such a
function with :func:`register`; list the modules it imports in ``requires`` so that it is skipped, not
failed, where they are missing.

Flags of an implementation:

* ``own_model``: it changes the model it is given (polyak's ``flat=True`` makes the parameters views into
  one buffer), so it gets a freshly built model of its own instead of the one the others share;
* ``applies``: a predicate on the model; the row is left out of shapes where it is false (the bfloat16
  modes on a float32 model);
* ``alternative``: another library's update, a candidate for the "best alternative" of a shape;
* ``part``: not an EMA update but one step of one (rows labelled "part: ..."), timed in the same rounds so
  that the targets section can say where the time of a mode goes.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from benchmarks.shapes import floating_tensors, is_low_precision

if TYPE_CHECKING:
    from ignite.engine import Engine

Step = Callable[[], object]
Setup = Callable[[nn.Module, float], Step]

# Keys of the rows that others are compared with, or that the targets name.
FLOOR = "floor"
FLOOR_NATIVE = "floor-native"
POLYAK = "polyak-ema"
POLYAK_FLAT = "polyak-flat"
POLYAK_BF16 = "polyak-bf16"
POLYAK_BF16_SR = "polyak-bf16-sr"
IGNITE_DIRECT = "ignite-direct"
IGNITE_FIRE = "ignite-fire"
PART_TO_F32 = "part-to-float32"
PART_TO_BF16 = "part-to-bf16"


@dataclass(frozen=True)
class Impl:
    key: str
    label: str
    what: str  # exactly what one timed call does
    setup: Setup
    requires: tuple[str, ...] = ()
    ref: str | None = IGNITE_DIRECT  # the ignite row to compare with
    own_model: bool = False
    applies: Callable[[nn.Module], bool] | None = None
    alternative: bool = False
    part: bool = False

    def missing(self) -> list[str]:
        """The required modules that cannot be imported here."""
        return [m for m in self.requires if not _importable(m)]

    def applies_to(self, model: nn.Module) -> bool:
        return self.applies is None or self.applies(model)


def _importable(module: str) -> bool:
    if module == "timm":  # its EMA classes also come from its wheel where timm cannot be installed
        from benchmarks.timm_ema import available

        return available()
    return importlib.util.find_spec(module) is not None


IMPLS: dict[str, Impl] = {}


def register(
    key: str,
    label: str,
    what: str,
    *,
    requires: tuple[str, ...] = (),
    ref: str | None = IGNITE_DIRECT,
    own_model: bool = False,
    applies: Callable[[nn.Module], bool] | None = None,
    alternative: bool = False,
    part: bool = False,
) -> Callable[[Setup], Setup]:
    def decorator(setup: Setup) -> Setup:
        if key in IMPLS:
            raise ValueError(f"implementation {key!r} registered twice")
        IMPLS[key] = Impl(key, label, what, setup, requires, ref, own_model, applies, alternative, part)
        return setup

    return decorator


def _not_float32_only(model: nn.Module) -> bool:
    return any(t.dtype != torch.float32 for t in floating_tensors(model))


def _lerp_pairs(sizes: dict[torch.dtype, int], device: torch.device, momentum: float) -> Step:
    pairs = [
        (torch.rand(n, device=device).to(dtype), torch.rand(n, device=device).to(dtype)) for dtype, n in sizes.items()
    ]
    if len(pairs) == 1:
        a, b = pairs[0]
        return functools.partial(a.lerp_, b, momentum)

    def step() -> None:
        for a, b in pairs:
            a.lerp_(b, momentum)

    return step


# -- the floor -------------------------------------------------------------------------------------------
@register(
    FLOOR,
    "floor: a.lerp_(b, m), float32",
    "one lerp_ on two contiguous float32 tensors holding as many elements as the model's floating tensors "
    "(read two, write one), whatever the model's dtypes: the reference of the **vs floor** column",
    ref=None,
)
def _floor(model: nn.Module, momentum: float) -> Step:
    tensors = floating_tensors(model)
    device = tensors[0].device if tensors else torch.device("cpu")
    return _lerp_pairs({torch.float32: sum(t.numel() for t in tensors)}, device, momentum)


@register(
    FLOOR_NATIVE,
    "floor: a.lerp_(b, m), model's dtypes",
    "as the float32 floor, but one lerp_ per dtype in the model's own dtypes (shapes that are not all "
    "float32 only): what an EMA kept in the model's dtype, without a master, cannot beat",
    ref=None,
    applies=_not_float32_only,
)
def _floor_native(model: nn.Module, momentum: float) -> Step:
    sizes: dict[torch.dtype, int] = {}
    device = torch.device("cpu")
    for t in floating_tensors(model):
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        device = t.device
    return _lerp_pairs(sizes, device, momentum)


# -- parts of an update ---------------------------------------------------------------------------------
@register(
    PART_TO_F32,
    "part: online bf16 -> float32 staging",
    "torch._foreach_copy_(float32 views of one buffer, the model's bf16 tensors): the first step of an "
    "update with a float32 master (low-precision shapes only)",
    ref=None,
    applies=is_low_precision,
    part=True,
)
def _part_to_f32(model: nn.Module, momentum: float) -> Step:
    tensors = [t for t in floating_tensors(model) if t.dtype in (torch.bfloat16, torch.float16)]
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=tensors[0].device)
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return functools.partial(torch._foreach_copy_, views, tensors)


@register(
    PART_TO_BF16,
    "part: float32 master -> bf16 EMA",
    "b.copy_(a), a float32 and b bfloat16, contiguous, as many elements as the model's low-precision "
    "tensors: the last step of an update with a float32 master (low-precision shapes only)",
    ref=None,
    applies=is_low_precision,
    part=True,
)
def _part_to_bf16(model: nn.Module, momentum: float) -> Step:
    tensors = [t for t in floating_tensors(model) if t.dtype in (torch.bfloat16, torch.float16)]
    n = sum(t.numel() for t in tensors)
    master = torch.rand(n, device=tensors[0].device)
    return functools.partial(torch.empty(n, dtype=tensors[0].dtype, device=master.device).copy_, master)


# -- polyak ----------------------------------------------------------------------------------------------
@register(
    POLYAK,
    "polyak EMA (default)",
    "EMA(model, momentum=m).update(); handle_buffers='copy' (buffers copied); a bfloat16 model is averaged "
    "in a float32 master",
)
def _polyak_ema(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA

    return EMA(model, momentum=momentum).update


@register(
    POLYAK_FLAT,
    "polyak EMA (flat=True)",
    "EMA(model, momentum=m, flat=True).update(), on a model of its own (flat mode makes the online "
    "parameters views into one buffer); float32 master for a bfloat16 model",
    own_model=True,
)
def _polyak_flat(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA

    return EMA(model, momentum=momentum, flat=True).update


@register(
    "polyak-skip-nonfinite",
    "polyak EMA (skip_nonfinite=True)",
    "EMA(model, momentum=m, skip_nonfinite=True).update(): a max-abs reduction over the online values and a "
    "host synchronisation before the update, to skip updates with NaN or Inf",
)
def _polyak_skip_nonfinite(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA

    return EMA(model, momentum=momentum, skip_nonfinite=True).update


@register(
    "polyak-flat-compile",
    "polyak EMA (flat=True, compile=True)",
    "EMA(model, momentum=m, flat=True, compile=True).update(), on a model of its own: one torch.compile'd "
    "kernel reads the online values and the master and writes the master and the EMA",
    own_model=True,
    applies=is_low_precision,
)
def _polyak_flat_compile(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA

    ema = EMA(model, momentum=momentum, flat=True, compile=True)
    ema.update()
    return ema.update


@register(
    POLYAK_BF16,
    "polyak EMA (dtype=bf16)",
    "EMA(model, momentum=m, dtype=torch.bfloat16).update(): the average kept in bfloat16, no master",
    applies=is_low_precision,
)
def _polyak_bf16(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA

    return EMA(model, momentum=momentum, dtype=torch.bfloat16).update


@register(
    POLYAK_BF16_SR,
    "polyak EMA (dtype=bf16, stochastic rounding)",
    "EMA(model, momentum=m, dtype=torch.bfloat16, stochastic_rounding=True).update()",
    applies=is_low_precision,
)
def _polyak_bf16_sr(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA

    return EMA(model, momentum=momentum, dtype=torch.bfloat16, stochastic_rounding=True).update


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
    "the registered handler called directly: handler._update_ema_model(engine, 'ema_momentum') "
    "= read engine.state's momentum + ema.update(momentum=...)",
    requires=("ignite",),
)
def _polyak_direct(model: nn.Module, momentum: float) -> Step:
    from polyak import EMAHandler

    handler, engine = EMAHandler(model, momentum=momentum), _engine()
    handler.attach(engine, "ema_momentum")
    return functools.partial(handler._update_ema_model, engine, "ema_momentum")


@register(
    IGNITE_DIRECT,
    "ignite EMAHandler (handler call)",
    "the registered handler called directly: handler._update_ema_model(engine, 'ema_momentum'); "
    "handle_buffers='copy' (buffers copied), a mul_ and an add_ per tensor",
    requires=("ignite",),
    alternative=True,
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


# -- Lightning callbacks: their hook after each optimizer step --------------------------------------------
class _StepTrainer:
    """What the callbacks read of a Trainer in ``on_train_batch_end``: the optimizer steps so far."""

    global_step = 0


def _lightning_module(model: nn.Module) -> nn.Module:
    import lightning as L

    class Wrapped(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

    return Wrapped()


def _hook_per_step(callback: object, module: nn.Module) -> Step:
    trainer = _StepTrainer()

    def step() -> None:
        trainer.global_step += 1  # an optimizer step happened in this batch
        callback.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[attr-defined]

    step()  # Lightning's first update only copies the weights in
    return step


@register(
    "polyak-lightning",
    "polyak.lightning.EMACallback (hook per step)",
    "EMACallback(momentum=m).on_train_batch_end(...) after an optimizer step: what the callback adds to "
    "each Lightning training step (handle_buffers='update', as Lightning's)",
    requires=("lightning",),
    ref=None,
)
def _polyak_lightning(model: nn.Module, momentum: float) -> Step:
    from polyak.lightning import EMACallback

    module = _lightning_module(model)
    callback = EMACallback(momentum=momentum)
    callback.on_fit_start(_StepTrainer(), module)  # type: ignore[arg-type]
    return _hook_per_step(callback, module)


@register(
    "lightning-ema",
    "Lightning EMAWeightAveraging (hook per step)",
    "EMAWeightAveraging(decay=1-m).on_train_batch_end(...) after an optimizer step (AveragedModel with "
    "use_buffers=True: buffers averaged too)",
    requires=("lightning",),
    ref=None,
    alternative=True,
)
def _lightning_ema(model: nn.Module, momentum: float) -> Step:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    module = _lightning_module(model)
    callback = EMAWeightAveraging(decay=1.0 - momentum)
    callback.setup(_StepTrainer(), module, "fit")  # type: ignore[arg-type]
    return _hook_per_step(callback, module)


# -- other libraries ---------------------------------------------------------------------------------
@register(
    "ema-pytorch",
    "ema-pytorch EMA (foreach)",
    "EMA(model, beta=1-m, update_every=1, update_after_step=0, use_foreach=True).update(); it averages "
    "floating buffers too",
    requires=("ema_pytorch",),
    alternative=True,
)
def _ema_pytorch(model: nn.Module, momentum: float) -> Step:
    from ema_pytorch import EMA

    ema = EMA(model, beta=1.0 - momentum, update_every=1, update_after_step=0, use_foreach=True)
    ema.update()  # the first call only copies the weights in; later ones are real updates
    return ema.update


@register(
    "swa-averaged",
    "torch AveragedModel (EMA multi_avg_fn)",
    "AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1-m), use_buffers=False).update_parameters(model); "
    "buffers left alone",
    alternative=True,
)
def _averaged_model(model: nn.Module, momentum: float) -> Step:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1.0 - momentum), use_buffers=False)
    averaged.update_parameters(model)  # the first call only copies the weights in
    return functools.partial(averaged.update_parameters, model)


@register(
    "torch-ema",
    "torch-ema ExponentialMovingAverage",
    "ExponentialMovingAverage(model.parameters(), decay=1-m).update(); parameters only",
    requires=("torch_ema",),
    alternative=True,
)
def _torch_ema(model: nn.Module, momentum: float) -> Step:
    from torch_ema import ExponentialMovingAverage

    return ExponentialMovingAverage(model.parameters(), decay=1.0 - momentum).update


@register(
    "polyak-split",
    "polyak EMA (master='split')",
    "EMA(model, momentum=m, master='split').update(): the float32 master of bf16 tensors kept as the bf16 EMA "
    "model (high half) and an int16 low half, 4 bytes per parameter",
    applies=is_low_precision,
)
def _polyak_split(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA

    return EMA(model, momentum=momentum, master="split").update


@register(
    "polyak-posthoc",
    "polyak PostHocEMA (2 profiles)",
    "PostHocEMA(model, sigma_rels=(0.05, 0.28)).update(), snapshots never due: two EMAs of power-function "
    "profiles updated in one pass (compare with the next row)",
)
def _polyak_posthoc(model: nn.Module, momentum: float) -> Step:
    import tempfile

    from polyak.posthoc import PostHocEMA

    folder = tempfile.mkdtemp(prefix="polyak-bench-")
    return PostHocEMA(model, sigma_rels=(0.05, 0.28), snapshot_every=10**9, directory=folder).update


@register(
    "polyak-two-emas",
    "two polyak EMAs (the same 2 profiles)",
    "EMA(model, schedule=power_function(sigma_rel=s)).update() for s in (0.05, 0.28): what PostHocEMA's "
    "update must not exceed",
)
def _polyak_two_emas(model: nn.Module, momentum: float) -> Step:
    from polyak import EMA
    from polyak.schedules import power_function

    emas = [EMA(model, schedule=power_function(sigma_rel=s)) for s in (0.05, 0.28)]

    def step() -> None:
        for e in emas:
            e.update()

    return step


@register(
    "diffusers-ema",
    "diffusers EMAModel",
    "EMAModel(model.parameters(), decay=1-m, use_ema_warmup=False, foreach=True).step(model.parameters()); "
    "parameters only, kept in the parameters' dtype",
    requires=("diffusers",),
    alternative=True,
)
def _diffusers_ema(model: nn.Module, momentum: float) -> Step:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers.training_utils import EMAModel

    ema = EMAModel(
        model.parameters(), decay=1.0 - momentum, min_decay=1.0 - momentum, use_ema_warmup=False, foreach=True
    )
    return lambda: ema.step(model.parameters())


@register(
    "timm-ema-v3",
    "timm ModelEmaV3",
    "ModelEmaV3(model, decay=1-m, use_warmup=False).update(model); foreach lerp of parameters and buffers",
    requires=("timm",),
    alternative=True,
)
def _timm_ema(model: nn.Module, momentum: float) -> Step:
    from benchmarks.timm_ema import load

    ema = load().ModelEmaV3(model, decay=1.0 - momentum, use_warmup=False)
    return functools.partial(ema.update, model)
