"""``copy_first``: the delayed start ("copy for the first n updates, then average") as a named option of the
core and of every adapter, checked against the update written out by hand; and ``ema(x)``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from polyak import EMA, EMAHandler
from polyak.lightning import EMACallback
from polyak.schedules import inverse_gamma
from polyak.transformers import EMACallback as TrainerEMACallback


def _walk(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_first_updates_copy_then_the_schedule_starts_at_its_first_update(flat: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 4).to(dtype)
    schedule = inverse_gamma(gamma=1.0, power=0.75, max_decay=0.9)
    ema = EMA(model, schedule=schedule, copy_first=3, flat=flat)
    reference = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for step in range(1, 9):
        _walk(model, step)
        m = ema.update()
        expected = 1.0 if step <= 3 else schedule(step - 3)
        assert m == expected
        for n, p in model.named_parameters():
            reference[n] += expected * (p.detach().double() - reference[n])
        if step <= 3:  # a copy, exactly
            for n, p in ema.ema_model.named_parameters():
                assert torch.equal(p, dict(model.named_parameters())[n]), (step, n)
    master = ema.state_dict().get("master", {}) or {}
    for n, p in ema.ema_model.named_parameters():
        got = master.get(n, p).double()
        torch.testing.assert_close(got, reference[n], rtol=0, atol=1e-6)  # float32 arithmetic, either dtype


def test_copy_first_resumes_where_it_stopped() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    a = EMA(model, momentum=0.1, copy_first=4)
    for step in range(2):
        _walk(model, step)
        a.update()
    b = EMA(model, momentum=0.1, copy_first=4)
    b.load_state_dict(a.state_dict())
    assert [b.momentum_at(k) for k in (3, 4, 5)] == [1.0, 1.0, 0.1]
    for step in range(2, 6):
        _walk(model, step)
        assert a.update() == b.update()
    assert torch.equal(a.ema_model.weight, b.ema_model.weight)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)])
def test_a_bad_copy_first_is_refused_by_name(value: object, error: type[Exception]) -> None:
    model = nn.Linear(2, 2)
    for build in (
        lambda: EMA(model, copy_first=value),
        lambda: EMAHandler(model, copy_first=value),
        lambda: EMACallback(decay=0.9, copy_first=value),
        lambda: TrainerEMACallback(decay=0.9, copy_first=value),
    ):
        with pytest.raises(error, match="copy_first"):
            build()


def test_the_handler_copies_first_and_writes_momentum_1_to_the_engine() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    handler = EMAHandler(model, momentum=0.5, copy_first=2)
    seen = []

    def step(engine, batch):
        _walk(model, engine.state.iteration)

    engine = Engine(step)
    handler.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.ema_momentum))
    engine.run([0] * 4, max_epochs=1)
    assert seen == [1.0, 1.0, 0.5, 0.5]
    assert handler.ema.num_updates == 4


def test_lightning_callback_copies_first_once_by_default_and_as_told() -> None:
    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    assert EMACallback(decay=0.9).schedule(1) == 1.0 and EMACallback(decay=0.9).schedule(2) == pytest.approx(0.1)
    assert EMACallback(decay=0.9, copy_first=0).schedule(1) == pytest.approx(0.1)
    callback = EMACallback(decay=0.9, copy_first=3, weights_at_end="online")
    torch.manual_seed(0)
    net = Net()
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(net, torch.utils.data.DataLoader(torch.randn(12, 4), batch_size=4))
    assert callback.ema.num_updates == 3
    # three updates, three copies: the EMA holds the online weights, which moved
    assert torch.equal(callback.ema.ema_model.layer.weight, net.layer.weight)
    assert not torch.equal(net.layer.weight, Net().layer.weight)


def test_the_trainer_callback_delays_its_schedule() -> None:
    callback = TrainerEMACallback(decay=0.9, copy_first=2)
    assert [callback.schedule(k) for k in (1, 2)] == [1.0, 1.0] and callback.schedule(3) == pytest.approx(0.1)
    assert TrainerEMACallback(decay=0.9).schedule(1) == pytest.approx(0.1)


def test_calling_the_ema_runs_the_ema_model() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, momentum=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    x = torch.randn(4, 3)
    assert torch.equal(ema(x), ema.ema_model(x)) and not torch.equal(ema(x), model(x))
