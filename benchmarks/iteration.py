"""The share of an ignite training iteration that the EMA takes, on the demo's model and batch.

Three ignite trainers (``create_supervised_trainer``: forward, cross-entropy, backward, SGD step) run the
model of :func:`polyak.demo.make_model` on batches of 32 random 1x8x8 images, like the demo's digits: one
without an EMA, one with polyak's ``EMAHandler`` and one with ignite's, both with the demo's settings
(momentum 0.02, warm-up from 0.5 over 100 updates). Each has its own model and optimizer. A sample is one
``trainer.run`` over ``iterations`` batches, so the per-iteration times include ignite's own work per
iteration (events, the progress of ``engine.state``). The two handlers' update alone (their registered
handler called directly, on models of their own) is timed in the same interleaved rounds.

The EMA's share is then measured two ways: ``(t_with - t_without) / t_with``, the difference of two noisy
medians, and ``t_update / t_with``, the direct update time over the iteration time.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks.timing import measure_interleaved

BATCH_SIZE = 32
ITERATIONS = 20  # per sample (one trainer.run)


def _trainer(model: nn.Module) -> Any:
    from ignite.engine import create_supervised_trainer

    from polyak.demo import DEFAULT_LR, DEFAULT_SGD_MOMENTUM

    optimizer = torch.optim.SGD(model.parameters(), lr=DEFAULT_LR, momentum=DEFAULT_SGD_MOMENTUM)
    return create_supervised_trainer(model, optimizer, nn.CrossEntropyLoss())


def _handler_kwargs() -> dict[str, Any]:
    from polyak.demo import DEFAULT_EMA_MOMENTUM, DEFAULT_MOMENTUM_WARMUP, DEFAULT_WARMUP_ITERS

    return {
        "momentum": DEFAULT_EMA_MOMENTUM,
        "momentum_warmup": DEFAULT_MOMENTUM_WARMUP,
        "warmup_iters": DEFAULT_WARMUP_ITERS,
    }


def _model(seed: int = 0) -> nn.Module:
    from polyak.demo import make_model

    torch.manual_seed(seed)
    return make_model()


def _handler(which: str, model: nn.Module) -> Any:
    if which == "polyak":
        from polyak import EMAHandler
    else:
        from ignite.handlers import EMAHandler
    return EMAHandler(model, **_handler_kwargs())


def measure(timing_kw: dict[str, Any], iterations: int = ITERATIONS) -> dict[str, Any]:
    """Time the trainers and the handlers' updates; returns per-iteration times and the EMA's shares."""
    from ignite.engine import Engine

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH_SIZE, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (BATCH_SIZE,), generator=gen)
    data = [(x, y)] * iterations

    steps = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = _trainer(_model())
        steps["train"] = functools.partial(plain.run, data, max_epochs=1)
        for which in ("polyak", "ignite"):
            model = _model()
            trainer = _trainer(model)
            _handler(which, model).attach(trainer, name="ema_momentum")
            steps[f"train+{which}"] = functools.partial(trainer.run, data, max_epochs=1)

            # the update alone: the registered handler called directly, as the engine event would
            handler, engine = _handler(which, _model()), Engine(lambda engine, batch: None)
            handler.attach(engine, name="ema_momentum")
            call = handler._update_ema_model
            steps[f"update-{which}"] = functools.partial(call, engine, "ema_momentum")

    timings, errors, _ = measure_interleaved(steps, **timing_kw)
    if errors:
        raise next(iter(errors.values()))

    per_call = {k: iterations if k.startswith("train") else 1 for k in steps}
    out: dict[str, Any] = {
        "batch_size": BATCH_SIZE,
        "iterations_per_sample": iterations,
        "parameters": sum(p.numel() for p in _model().parameters()),
        "timing": {
            k: {f: v / per_call[k] for f, v in t.as_dict().items() if f.endswith("_s")} for k, t in timings.items()
        },
        "samples": {k: t.samples for k, t in timings.items()},
    }
    tm = out["timing"]
    for which in ("polyak", "ignite"):
        with_, without, update = tm[f"train+{which}"], tm["train"], tm[f"update-{which}"]
        out[which] = {
            "share_by_difference": (with_["median_s"] - without["median_s"]) / with_["median_s"],
            "share_by_difference_min": (with_["min_s"] - without["min_s"]) / with_["min_s"],
            "share_direct": update["median_s"] / with_["median_s"],
            "share_direct_min": update["min_s"] / with_["min_s"],
        }
    return out
