"""polyak's warnings are reported at the user's line (``warning.filename`` is this file), whether the user called
polyak or torch or a trainer did (an optimizer's step hook, ignite's events): a warning shown inside polyak, torch
or ignite tells the user nothing about which of their lines caused it, and ``-W error::UserWarning:polyak.*`` (our
pytest configuration) would wrongly catch it."""

from __future__ import annotations

import warnings

import torch
from ignite.engine import Engine, Events
from torch import nn

from polyak import EMA
from polyak.ignite import EMAHandler


def caught(run) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run()
    return [w for w in record if "polyak" in str(w.message) or "EMA" in str(w.message)]


def poisoned() -> nn.Linear:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    return model


def test_a_skipped_update_warns_at_the_update_call() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, skip_nonfinite=True)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    (w,) = caught(ema.update)
    assert ema.num_skipped == 1 and w.category is RuntimeWarning
    # the warning is attributed to the frame that called update: caught() here, in this file
    assert w.filename == __file__, w.filename


def test_a_skipped_update_in_an_optimizer_hook_warns_at_the_step_call() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, skip_nonfinite=True)
    ema.hook(optimizer)
    model(torch.full((1, 3), float("nan"))).sum().backward()  # NaN gradients: NaN weights after the step
    (w,) = caught(optimizer.step)  # polyak's frames and torch.optim's between: neither is the user's line
    assert ema.num_skipped == 1
    assert w.filename == __file__, w.filename


def test_ignites_resume_without_the_ema_warns_at_the_run_call() -> None:
    model = nn.Linear(3, 2)
    engine = Engine(lambda e, b: None)
    EMAHandler(model).attach(engine, event=Events.ITERATION_COMPLETED)
    engine.state.iteration, engine.state.epoch = 4, 1  # as Checkpoint.load_objects leaves a resumed engine
    engine.state.epoch_length, engine.state.max_epochs = 4, 2
    record = caught(lambda: engine.run([0] * 4, max_epochs=2))
    (w,) = [w for w in record if "EMA was not loaded" in str(w.message)]
    assert w.filename == __file__, w.filename  # not ignite's engine, which called the handler
