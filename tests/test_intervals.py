"""Updating every few steps: ``per_step=True`` and ``update(steps=n)`` track the every-step EMA.

An update after ``n`` steps with per-step momentum ``m`` uses ``1 - (1 - m) ** n``: the weight the every-step
EMA gives, in total, to those ``n`` steps. On a slowly moving model the two then differ by about
``(n - 1) / 2`` steps of motion, whereas plain momentum every ``n`` steps averages over ``n`` times as long.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from polyak import EMA, EMAHandler

M = 0.01
EVERY = 5
M_EVERY = 1 - (1 - M) ** EVERY  # 0.049009950...
N_STEPS = 1000
DIM = 32


def _trajectory() -> torch.Tensor:
    """theta_t for t = 0..N_STEPS: a slow sine (period 600 steps) plus a ramp plus tiny noise, float64."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(DIM, dtype=torch.float64, generator=g) for _ in range(3))
    t = torch.arange(N_STEPS + 1, dtype=torch.float64)[:, None]
    noise = 1e-4 * torch.randn(N_STEPS + 1, DIM, dtype=torch.float64, generator=g)
    return a + b * torch.sin(2 * math.pi * t / 600) + c * t / N_STEPS + noise


THETA = _trajectory()


def make_model() -> nn.Module:
    model = nn.Linear(DIM, 1, bias=False).double()
    set_weights(model, 0)
    return model


def set_weights(model: nn.Module, t: int) -> None:
    with torch.no_grad():
        model.weight.copy_(THETA[t][None])


def test_per_step_every_5_tracks_the_every_step_ema_and_plain_momentum_does_not():
    model = make_model()
    every_step = EMA(model, momentum=M)
    per_step = EMA(model, momentum=M, per_step=True)
    plain = EMA(model, momentum=M)
    ref = THETA[0].clone()  # the every-step EMA by hand

    err_per_step = err_plain = drift = 0.0
    for t in range(1, N_STEPS + 1):
        set_weights(model, t)
        assert every_step.update() == M
        ref.lerp_(THETA[t], M)
        if t % EVERY == 0:
            assert per_step.update(steps=EVERY) == M_EVERY
            assert plain.update() == M
            target = every_step.ema_model.weight[0]
            err_per_step = max(err_per_step, float((per_step.ema_model.weight[0] - target).abs().max()))
            err_plain = max(err_plain, float((plain.ema_model.weight[0] - target).abs().max()))
            drift = max(drift, float((target - THETA[0]).abs().max()))

    assert torch.allclose(every_step.ema_model.weight[0], ref, rtol=0, atol=1e-12)
    assert per_step.num_updates == plain.num_updates == N_STEPS // EVERY
    # max over time and weights, relative to how far the every-step EMA moved (measured: 1.65% and 63.8%)
    assert err_per_step < 0.03 * drift
    assert err_plain > 0.25 * drift
    assert err_plain > 10 * err_per_step  # measured: 39x


def test_effective_momentum_is_one_minus_the_product_of_decays():
    model = make_model()
    ema = EMA(model, momentum=M, per_step=True)
    assert ema.update() == M
    assert ema.update(steps=1) == M
    got = ema.update(steps=EVERY)
    assert got == pytest.approx(M_EVERY, rel=1e-15, abs=0)
    assert got == pytest.approx(0.04900995010, rel=1e-10)
    assert ema.update(steps=100) == pytest.approx(1 - 0.99**100, rel=1e-15)
    assert ema.num_updates == 4  # an update of several steps is still one update

    # one update of n steps towards a fixed target == n updates of one step, exactly in real arithmetic
    target = THETA[7]
    one, many = EMA(make_model(), momentum=M, per_step=True), EMA(make_model(), momentum=M)
    set_weights(one.model, 7)
    set_weights(many.model, 7)
    one.update(steps=EVERY)
    for _ in range(EVERY):
        many.update()
    assert torch.allclose(one.ema_model.weight, many.ema_model.weight, rtol=0, atol=1e-14)
    assert not torch.allclose(one.ema_model.weight[0], target)


def test_steps_needs_per_step():
    ema = EMA(make_model(), momentum=M)
    with pytest.raises(ValueError, match="per_step"):
        ema.update(steps=5)
    assert ema.num_updates == 0


@pytest.mark.parametrize(("steps", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_steps_must_be_a_positive_int(steps, error):
    model = make_model()
    ema = EMA(model, momentum=M, per_step=True)
    before = ema.ema_model.weight.clone()
    set_weights(model, 50)
    with pytest.raises(error, match="steps"):
        ema.update(steps=steps)
    assert ema.num_updates == 0
    assert torch.equal(ema.ema_model.weight, before)


# -- the ignite handler -------------------------------------------------------------------------------------


def make_trainer(model: nn.Module) -> Engine:
    """A trainer whose step sets the weights to the trajectory at the iteration just done."""

    def step(engine: Engine, batch) -> None:
        set_weights(model, engine.state.iteration)

    return Engine(step)


def record(engine: Engine) -> list[tuple[int, float]]:
    """(iteration, engine.state.ema_momentum) after every iteration (registered after the handler)."""
    seen: list[tuple[int, float]] = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.iteration, e.state.ema_momentum))
    )
    return seen


def reference(updates: list[tuple[int, int]]) -> EMA:
    """A plain per-step EMA updated at the given (iteration, steps)."""
    model = make_model()
    ema = EMA(model, momentum=M, per_step=True)
    for t, steps in updates:
        set_weights(model, t)
        ema.update(steps=steps)
    return ema


def test_handler_every_5_iterations_equals_the_per_step_ema():
    model = make_model()
    handler = EMAHandler(model, momentum=M, per_step=True)
    trainer = make_trainer(model)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
    seen = record(trainer)
    trainer.run(range(10), max_epochs=10)  # 100 iterations, 20 updates

    assert handler.ema.num_updates == 20
    # engine.state holds the per-step momentum (whoever drives it writes that); the update applies it n times
    assert trainer.state.ema_momentum == M
    assert [m for t, m in seen] == [M] * 100
    expected = reference([(t, EVERY) for t in range(EVERY, 101, EVERY)])
    assert torch.equal(handler.ema_model.weight, expected.ema_model.weight)

    # and by hand, in float64
    ref = THETA[0].clone()
    for t in range(EVERY, 101, EVERY):
        ref.lerp_(THETA[t], M_EVERY)
    assert torch.allclose(handler.ema_model.weight[0], ref, rtol=0, atol=1e-12)


def test_handler_counts_iterations_between_irregular_events():
    # every 5 iterations, and once more at the end: 23 iterations, so the last update covers 3 steps
    model = make_model()
    handler = EMAHandler(model, momentum=M, per_step=True)
    trainer = make_trainer(model)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY) | Events.COMPLETED)
    trainer.run(range(23), max_epochs=1)
    assert handler.ema.num_updates == 5
    assert trainer.state.ema_momentum == M
    expected = reference([(5, 5), (10, 5), (15, 5), (20, 5), (23, 3)])
    assert torch.equal(handler.ema_model.weight, expected.ema_model.weight)

    # with 25 iterations, COMPLETED fires in the iteration just updated: no second update
    model = make_model()
    handler = EMAHandler(model, momentum=M, per_step=True)
    trainer = make_trainer(model)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY) | Events.COMPLETED)
    trainer.run(range(25), max_epochs=1)
    assert handler.ema.num_updates == 5
    assert torch.equal(handler.ema_model.weight, reference([(t, 5) for t in range(5, 26, 5)]).ema_model.weight)


def test_handler_without_per_step_uses_the_plain_momentum():
    model = make_model()
    handler = EMAHandler(model, momentum=M)
    trainer = make_trainer(model)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
    trainer.run(range(20), max_epochs=1)
    assert handler.ema.num_updates == 4
    assert trainer.state.ema_momentum == M
    assert "last_iteration" not in handler.state_dict()


def test_handler_resume_continues_the_step_count():
    # 7 iterations per epoch, stop after epoch 3: iteration 21, last update at 20. The first update after
    # resuming (iteration 25) must cover 5 steps, not 4 (counted from 21) nor 25 (counted from 0).
    epoch_length, n_epochs, k_epochs = 7, 6, 3
    data = list(range(epoch_length))

    model = make_model()
    uninterrupted = EMAHandler(model, momentum=M, per_step=True)
    trainer = make_trainer(model)
    uninterrupted.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
    trainer.run(data, max_epochs=n_epochs)
    assert trainer.state.iteration == 42

    model = make_model()
    first = EMAHandler(model, momentum=M, per_step=True)
    trainer = make_trainer(model)
    first.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
    trainer.run(data, max_epochs=k_epochs)
    assert trainer.state.iteration == 21
    buf = io.BytesIO()
    torch.save({"ema": first.state_dict(), "trainer": trainer.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    assert checkpoint["ema"]["last_iteration"] == 20

    model = make_model()
    set_weights(model, 21)
    resumed = EMAHandler(model, momentum=M, per_step=True)
    trainer = make_trainer(model)
    resumed.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
    seen = record(trainer)
    resumed.load_state_dict(checkpoint["ema"])
    trainer.load_state_dict(checkpoint["trainer"])
    trainer.run(data, max_epochs=n_epochs)

    assert trainer.state.iteration == 42
    assert seen[0][0] == 22
    assert dict(seen)[25] == M
    assert resumed.ema.num_updates == uninterrupted.ema.num_updates == 8
    assert torch.equal(resumed.ema_model.weight, uninterrupted.ema_model.weight)
    expected = reference([(t, EVERY) for t in range(EVERY, 41, EVERY)])
    assert torch.equal(resumed.ema_model.weight, expected.ema_model.weight)


def test_handler_resume_loaded_after_attach_or_before_gives_the_same():
    data = list(range(7))
    model = make_model()
    first = EMAHandler(model, momentum=M, per_step=True)
    trainer = make_trainer(model)
    first.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
    trainer.run(data, max_epochs=3)
    state, trainer_state = first.state_dict(), trainer.state_dict()

    results = []
    for load_first in (True, False):
        model = make_model()
        set_weights(model, 21)
        handler = EMAHandler(model, momentum=M, per_step=True)
        trainer = make_trainer(model)
        if load_first:
            handler.load_state_dict(state)
        handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
        if not load_first:
            handler.load_state_dict(state)
        trainer.load_state_dict(trainer_state)
        trainer.run(data, max_epochs=6)
        results.append(handler.ema_model.weight.clone())
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], reference([(t, EVERY) for t in range(EVERY, 41, EVERY)]).ema_model.weight)


def test_handler_rerun_of_a_finished_engine_counts_from_the_restart():
    model = make_model()
    handler = EMAHandler(model, momentum=M, per_step=True)
    trainer = make_trainer(model)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
    trainer.run(range(20), max_epochs=1)
    assert handler.ema.num_updates == 4
    trainer.run(range(20), max_epochs=1)  # a finished engine starts again from iteration 0
    assert trainer.state.iteration == 20
    assert handler.ema.num_updates == 8
