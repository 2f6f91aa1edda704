"""EMAHandler: every sentence of ignite's documentation page, and right where ignite 0.5 is wrong."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from ignite.handlers import Checkpoint, DiskSaver
from ignite.handlers import EMAHandler as IgniteEMAHandler
from ignite.handlers.state_param_scheduler import LambdaStateScheduler
from torch import nn

import polyak
from polyak import EMAHandler
from polyak.schedules import linear_warmup, power_function


def make_trainer(model: nn.Module, lr: float = 0.1) -> Engine:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step(engine, batch):
        optimizer.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(step)


def data(n: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 2, generator=g) for _ in range(n)]


def record(engine: Engine, name: str) -> list[float]:
    seen: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(getattr(e.state, name)))
    return seen


def test_imports_and_lazy_loading():
    from polyak.ignite import EMAHandler as direct

    assert polyak.EMAHandler is direct is EMAHandler
    code = "import sys, polyak; assert 'ignite' not in sys.modules, 'polyak imported ignite'; polyak.EMAHandler"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_signature_is_ignites_and_extras_are_keyword_only():
    ours = inspect.signature(EMAHandler)
    theirs = inspect.signature(IgniteEMAHandler)
    positional = [p for p in ours.parameters.values() if p.kind is not p.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in theirs.parameters.values()]
    assert all(p.kind is p.KEYWORD_ONLY for p in ours.parameters.values() if p.name not in theirs.parameters)
    attach_ours = inspect.signature(EMAHandler.attach).parameters
    attach_theirs = inspect.signature(IgniteEMAHandler.attach).parameters
    assert [(p.name, p.default) for p in attach_ours.values()] == [(p.name, p.default) for p in attach_theirs.values()]


def test_attributes():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    h = EMAHandler(model, momentum=0.01)
    assert h.model is model
    assert isinstance(h.ema_model, nn.Sequential) and h.ema_model is not model
    assert h.momentum == 0.01 and h.handle_buffers == "copy"
    assert h.ema.momentum_at(1) == h.ema.momentum_at(10**6) == 0.01 and h._momentum_lambda_obj is None
    assert not h.ema_model.training
    w = EMAHandler(model, momentum=0.01, momentum_warmup=0.1, warmup_iters=3, handle_buffers="ema_train")
    assert [w._momentum_lambda_obj(k) for k in (1, 2, 3, 4)] == pytest.approx([0.1, 0.055, 0.01, 0.01])
    assert w.ema_model.training


def test_update_matches_hand_computed_ema_and_state_holds_momentum():
    model = nn.Linear(2, 1).double()
    h = EMAHandler(model, momentum=0.02, momentum_warmup=0.5, warmup_iters=5)
    trainer = make_trainer(model)
    ref = [p.detach().clone() for p in model.parameters()]
    momenta: list[float] = []
    h.attach(trainer)

    @trainer.on(Events.ITERATION_COMPLETED)
    def reference(engine):  # runs after the handler, attached first
        m = h._momentum_lambda_obj(engine.state.iteration)
        momenta.append(m)
        for r, p in zip(ref, model.parameters(), strict=True):
            r.mul_(1 - m).add_(p.detach(), alpha=m)

    trainer.run([b.double() for b in data()], max_epochs=2)
    assert momenta[:5] == pytest.approx([0.5, 0.38, 0.26, 0.14, 0.02]) and momenta[-1] == 0.02
    assert trainer.state.ema_momentum == 0.02
    for r, p in zip(ref, h.ema_model.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


def test_custom_name_gets_its_warmup():
    model = nn.Linear(2, 1)
    h = EMAHandler(model, momentum=0.001, momentum_warmup=0.3, warmup_iters=4)
    trainer = make_trainer(model)
    h.attach(trainer, name="my_momentum")
    seen = record(trainer, "my_momentum")
    trainer.run(data(6), max_epochs=1)
    assert seen == pytest.approx([0.3, 0.3 - 0.299 / 3, 0.3 - 0.299 * 2 / 3, 0.001, 0.001, 0.001])
    assert not hasattr(trainer.state, "ema_momentum")


@pytest.mark.filterwarnings("ignore:Attribute 'ema_momentum' is not defined:UserWarning")
def test_ignite_defect_custom_name_loses_its_warmup():
    model = nn.Linear(2, 1)
    h = IgniteEMAHandler(model, momentum=0.001, momentum_warmup=0.3, warmup_iters=4)
    trainer = make_trainer(model)
    h.attach(trainer, name="my_momentum")
    seen = record(trainer, "my_momentum")
    trainer.run(data(6), max_epochs=1)
    assert seen == [0.001] * 6  # the warm-up wrote engine.state.ema_momentum, which nothing reads


def test_filtered_event_and_events_list():
    model = nn.Linear(2, 1)
    h = EMAHandler(model, momentum=0.1)
    trainer = make_trainer(model)
    h.attach(trainer, event=Events.ITERATION_COMPLETED(every=5))
    trainer.run(data(20), max_epochs=2)
    assert h.ema.num_updates == 8

    h2 = EMAHandler(model, momentum=0.1)
    trainer2 = make_trainer(model)
    h2.attach(trainer2, event=Events.ITERATION_COMPLETED(every=7) | Events.EPOCH_COMPLETED)
    trainer2.run(data(20), max_epochs=2)
    assert h2.ema.num_updates == 5 + 2  # iterations 7, 14, 21, 28, 35 and two epoch ends


def test_attach_returns_removable_handle():
    model = nn.Linear(2, 1)
    h = EMAHandler(model, momentum=0.1)
    trainer = make_trainer(model)
    handle = h.attach(trainer)
    assert isinstance(handle, RemovableEventHandle)
    trainer.run(data(3), max_epochs=1)
    handle.remove()
    trainer.run(data(3), max_epochs=2)
    assert h.ema.num_updates == 3


def test_momentum_is_readable_before_the_first_update():
    h = EMAHandler(nn.Linear(2, 1), momentum=0.002, momentum_warmup=0.2, warmup_iters=100)
    trainer = make_trainer(h.model)
    h.attach(trainer)
    assert trainer.state.ema_momentum == 0.2


def test_warns_when_attribute_exists_with_ignites_wording():
    h = EMAHandler(nn.Linear(2, 1))
    trainer = make_trainer(h.model)
    trainer.state.ema_momentum = 0.5
    with pytest.warns(UserWarning, match=r"^Attribute 'ema_momentum' already exists in Engine.state\."):
        h.attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMAHandler(nn.Linear(2, 1)).attach(trainer, warn_if_exists=False)


@pytest.mark.parametrize("name", ["iteration", "epoch", "output", "batch", "metrics", "max_epochs", "times"])
def test_builtin_state_names_are_refused(name):
    h = EMAHandler(nn.Linear(2, 1))
    trainer = make_trainer(h.model)
    with pytest.raises(ValueError, match=f"name must not be one of ignite's own Engine.state attributes.*{name!r}"):
        h.attach(trainer, name=name)


def test_ignite_defect_name_iteration_is_used_as_momentum():
    model = nn.Linear(2, 1)
    h = IgniteEMAHandler(model, momentum=0.001)
    trainer = make_trainer(model)
    h.attach(trainer, name="iteration", warn_if_exists=False)
    trainer.run(data(3), max_epochs=1)
    # momentum = iteration (1, 2, 3): the "EMA" is garbage, far from both the model and a real EMA
    assert not torch.allclose(h.ema_model.weight, model.weight, atol=1e-2)


@pytest.mark.parametrize("name", ["", 3, None])
def test_bad_names_are_refused(name):
    h = EMAHandler(nn.Linear(2, 1))
    trainer = make_trainer(h.model)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        h.attach(trainer, name=name)
    assert not trainer._event_handlers[Events.ITERATION_COMPLETED]  # nothing registered


def test_any_string_name_works_as_in_ignite():
    h = EMAHandler(nn.Linear(2, 1), momentum=0.1)
    trainer = make_trainer(h.model)
    h.attach(trainer, name="ema-momentum")
    trainer.run(data(3), max_epochs=1)
    assert getattr(trainer.state, "ema-momentum") == 0.1 and h.ema.num_updates == 3


def test_attach_to_a_non_engine_is_refused():
    with pytest.raises(TypeError, match="engine must be an ignite Engine, got str"):
        EMAHandler(nn.Linear(2, 1)).attach("trainer")


def test_copy_never_aliases_storage_unlike_ignite():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ours, theirs = EMAHandler(model, momentum=0.1), IgniteEMAHandler(model, momentum=0.1)
    trainer = Engine(lambda e, b: model.train()(b))
    ours.attach(trainer, name="ours")
    theirs.attach(trainer, name="theirs")
    trainer.run([torch.randn(8, 2) for _ in range(3)], max_epochs=1)
    online = model[1].running_mean
    assert torch.equal(ours.ema_model[1].running_mean, online)
    assert ours.ema_model[1].running_mean.data_ptr() != online.data_ptr()
    assert theirs.ema_model[1].running_mean.data_ptr() == online.data_ptr()  # ignite's defect


def test_ema_train_and_update_modes():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    upd = EMAHandler(model, momentum=0.5, handle_buffers="update")
    train = EMAHandler(model, momentum=0.5, handle_buffers="ema_train")
    start_mean = model[1].running_mean.clone()
    trainer = Engine(lambda e, b: model.train()(b))
    upd.attach(trainer, name="m_update")
    train.attach(trainer, name="m_train")
    trainer.run([torch.randn(8, 2) + 3 for _ in range(1)], max_epochs=1)
    torch.testing.assert_close(upd.ema_model[1].running_mean, 0.5 * start_mean + 0.5 * model[1].running_mean)
    assert int(upd.ema_model[1].num_batches_tracked) == 1
    assert torch.equal(train.ema_model[1].running_mean, start_mean)
    assert train.ema_model.training and not upd.ema_model.training


def test_schedule_keyword_and_state_momentum():
    model = nn.Linear(2, 1)
    h = EMAHandler(model, schedule=power_function(gamma=0))
    trainer = make_trainer(model)
    h.attach(trainer)
    seen = record(trainer, "ema_momentum")
    trainer.run(data(4), max_epochs=1)
    assert seen == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 0.0}, ValueError, "^Invalid momentum: 0.0"),
        ({"momentum": 1.0}, ValueError, "^Invalid momentum: 1.0"),
        ({"momentum": -0.5}, ValueError, "^Invalid momentum: -0.5"),
        ({"momentum": float("nan")}, ValueError, "^Invalid momentum: nan.*finite"),
        ({"momentum": "0.1"}, ValueError, "^Invalid momentum: '0.1'"),
        ({"momentum_warmup": 0.1}, ValueError, "momentum_warmup and warmup_iters go together"),
        ({"warmup_iters": 10}, ValueError, "momentum_warmup and warmup_iters go together"),
        ({"momentum_warmup": 0.1, "warmup_iters": -1}, ValueError, "warmup_iters must be >= 0, got -1"),
        ({"momentum_warmup": 0.1, "warmup_iters": 2.5}, TypeError, "warmup_iters must be an int, got 2.5"),
        ({"momentum_warmup": 1.5, "warmup_iters": 10}, ValueError, r"momentum_warmup must be in \[0, 1\]"),
        ({"momentum_warmup": -0.1, "warmup_iters": 10}, ValueError, "momentum_warmup must be in"),
        ({"model": [nn.Linear(2, 1)]}, ValueError, "^model should be an instance of nn.Module or its subclasses"),
        ({"model": None}, TypeError, "^model should be an instance of nn.Module or its subclasses, but got NoneType"),
        (
            {"handle_buffers": "avg"},
            ValueError,
            "^handle_buffers can only be one of 'copy', 'update', 'ema_train', but got 'avg'",
        ),
        ({"schedule": linear_warmup(0.1, 0.01, 3), "momentum": 0.5}, ValueError, "either schedule or momentum"),
    ],
)
def test_bad_input_is_refused_with_ignites_words_first(kwargs, error, match):
    kwargs.setdefault("model", nn.Linear(2, 1))
    with pytest.raises(error, match=match):
        EMAHandler(**kwargs)


def test_ignite_defect_half_given_warmup_is_silently_dropped():
    h = IgniteEMAHandler(nn.Linear(2, 1), momentum=0.01, momentum_warmup=0.5)
    assert h._momentum_lambda_obj is None  # ignite: no warm-up, no error; ours raises (above)


def test_several_handlers_on_one_engine_under_different_names():
    gen, disc = nn.Linear(2, 2), nn.Linear(2, 1)
    gen_h = EMAHandler(gen, momentum=0.1, momentum_warmup=0.5, warmup_iters=3)
    disc_h = EMAHandler(disc, momentum=0.2)
    engine = Engine(lambda e, b: None)
    gen_h.attach(engine, "gen_ema_momentum", event=Events.ITERATION_COMPLETED)
    disc_h.attach(engine, "disc_ema_momentum", event=Events.ITERATION_COMPLETED(every=2))
    engine.run(data(6), max_epochs=1)
    assert gen_h.ema.num_updates == 6 and disc_h.ema.num_updates == 3
    assert engine.state.gen_ema_momentum == 0.1 and engine.state.disc_ema_momentum == 0.2


def test_a_second_attach_to_the_same_engine_is_refused_ignite_updates_twice():
    """ignite registers the update again: each iteration then updates the EMA twice. A weight going 1, 2, 3 at
    momentum 0.5: one update per iteration gives 2.125; ignite's doubled run gives 2.671875."""

    def run(cls, attaches):
        model = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(model.weight)
        h = cls(model, momentum=0.5)
        trainer = Engine(lambda e, b: model.weight.data.fill_(float(b)))
        attaches(h, trainer)
        trainer.run([1, 2, 3], max_epochs=1)
        return h, trainer

    once, _ = run(IgniteEMAHandler, lambda h, t: h.attach(t))
    assert once.ema_model.weight.item() == 2.125  # ((0 + 1) / 2 + 2) / 2 = 1.25; (1.25 + 3) / 2
    twice, _ = run(IgniteEMAHandler, lambda h, t: [h.attach(t, warn_if_exists=False) for _ in range(2)])
    assert twice.ema_model.weight.item() == 2.671875  # each iteration folded in twice: 0.75, 1.6875, 2.671875

    def attach_twice(h, trainer):
        h.attach(trainer)
        handlers = list(trainer._event_handlers[Events.ITERATION_COMPLETED])
        with pytest.raises(ValueError, match=r"engine already has this EMAHandler attached \(name='ema_momentum'\)"):
            h.attach(trainer, name="other")
        assert trainer._event_handlers[Events.ITERATION_COMPLETED] == handlers  # nothing registered
        assert not hasattr(trainer.state, "other") and len(h._attached) == 1

    ours, _ = run(EMAHandler, attach_twice)
    assert ours.ema_model.weight.item() == 2.125 and ours.ema.num_updates == 3

    # attached anew after remove(), and to another engine as well: both fine
    h = EMAHandler(nn.Linear(1, 1), momentum=0.5)
    first, second = Engine(lambda e, b: None), Engine(lambda e, b: None)
    h.attach(first).remove()
    h.attach(first, warn_if_exists=False)  # its own momentum from the first attach
    h.attach(second)
    first.run(range(2), max_epochs=1)
    second.run(range(3), max_epochs=1)
    assert h.ema.num_updates == 5


# -- going back: a checkpoint written on polyak's handler resumes on ignite's ---------------------------------
def framework(base: type) -> type:
    """A subclass as frameworks built on ignite write it: attach() re-implemented with ignite's internals, its
    ``momentum_scheduler`` (a ``LambdaStateScheduler`` over ``_momentum_lambda_obj``) saved in the Checkpoint."""

    class FrameworkEMAHandler(base):
        def attach(self, engine, name="ema_momentum", warn_if_exists=True, event=Events.ITERATION_COMPLETED):
            if not hasattr(engine.state, name):
                setattr(engine.state, name, self.momentum)
            if self._momentum_lambda_obj is not None:
                self.momentum_scheduler = LambdaStateScheduler(self._momentum_lambda_obj, param_name=name)
                self.momentum_scheduler.attach(engine, event)
            engine.add_event_handler(event, self._update_ema_model, name)

    return FrameworkEMAHandler


def framework_run(cls: type, directory, *, stop_after: int | None = None, resume_from=None, weights_only=True):
    """5 epochs of 6 iterations, a warm-up over 20; a Checkpoint at each epoch end, as the frameworks write it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(engine, batch):
        model.train()
        optimizer.zero_grad()
        model(batch).pow(2).mean().backward()
        optimizer.step()

    trainer = Engine(step)
    handler = framework(cls)(model, momentum=0.02, momentum_warmup=0.4, warmup_iters=20)
    handler.attach(trainer)
    seen = record(trainer, "ema_momentum")
    to_save = {
        "model": model,
        "optimizer": optimizer,
        "trainer": trainer,
        "ema_model": handler.ema_model,
        "ema_scheduler": handler.momentum_scheduler,
    }
    saver = Checkpoint(to_save, DiskSaver(directory, require_empty=False))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, saver)
    if stop_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    if resume_from is not None:
        checkpoint = resume_from if weights_only else torch.load(resume_from, weights_only=False)
        Checkpoint.load_objects(to_load=to_save, checkpoint=checkpoint)
    trainer.run(data(6), max_epochs=5)
    return handler, seen, directory / saver.last_checkpoint


@pytest.mark.parametrize("weights_only", [True, False], ids=["load_objects_path", "torch_load_weights_only_false"])
def test_a_checkpoint_written_on_polyak_resumes_on_ignites_handler(tmp_path, weights_only):
    """Trained on polyak's handler for 2 epochs, resumed on ignite's for 3: the same run as 5 epochs on ignite's.

    ignite's ``LambdaStateScheduler.load_state_dict`` puts the saved ``lambda_obj`` in place of its own (ignite's
    ``EMAWarmUp`` has no ``load_state_dict``), and calls it at the next event: polyak's saved warm-up is a mapping
    of its three numbers that is also callable, with ignite's arithmetic."""
    full, full_seen, _ = framework_run(IgniteEMAHandler, tmp_path / "ignite")
    _, first_seen, ckpt = framework_run(EMAHandler, tmp_path / "polyak", stop_after=2)
    resumed, resumed_seen, _ = framework_run(
        IgniteEMAHandler, tmp_path / "resumed", resume_from=ckpt, weights_only=weights_only
    )
    assert first_seen + resumed_seen == full_seen  # the warm-up continued where it stopped, at update 13
    assert resumed_seen[0] == pytest.approx(0.4 - 0.38 * 12 / 19) and full_seen[-1] == 0.02
    assert resumed.momentum_scheduler.event_index == full.momentum_scheduler.event_index == 30
    for a, b in zip(resumed.ema_model.state_dict().values(), full.ema_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # polyak's lerp_ in the first 12 updates
