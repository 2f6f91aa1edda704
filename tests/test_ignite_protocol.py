"""ignite's handler protocol, as the code that exists uses it: each pattern run on ignite's EMAHandler and on
polyak's with the same data, momenta equal and weights equal to float32 rounding.

The patterns come from public projects built on ignite: subclasses that re-implement ``attach`` with
ignite's internals (``_momentum_lambda_obj``, ``LambdaStateScheduler``, ``_update_ema_model``) and save
``momentum_scheduler`` in their ``Checkpoint``; a subclass that overrides ``_update_ema_model`` to average
LoRA weights only; a ``StateParamScheduler`` driving the momentum through ``engine.state`` (ignite's own
``test_param_scheduler_with_ema_handler``); the frameworks' default ``momentum_warmup=0.0, warmup_iters=0``;
numpy and 0-d tensor momenta.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, PiecewiseLinearStateScheduler
from ignite.handlers import EMAHandler as IgniteEMAHandler
from ignite.handlers.state_param_scheduler import LambdaStateScheduler
from torch import nn

from polyak import EMA, EMAHandler
from polyak.ignite import MomentumScheduler

STEPS = 30


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def batches(n: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 4, generator=g) for _ in range(n)]


def trainer_for(model: nn.Module, lr: float = 0.05) -> Engine:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step(engine, batch):
        model.train()
        optimizer.zero_grad()
        loss = (model(batch) - batch[:, :2]).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(step)


def record(engine: Engine, name: str) -> list[float]:
    seen: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(float(getattr(e.state, name))))
    return seen


def assert_same_ema(ours: nn.Module, theirs: nn.Module) -> None:
    """Equal to float32 rounding: polyak's lerp_ and ignite's mul_/add_ round differently."""
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def side_by_side(make_handler, attach, n: int = STEPS, name: str = "ema_momentum"):
    """Run one training twice, once per handler class; returns (handler, momenta) for polyak's and ignite's."""
    out = []
    for cls in (EMAHandler, IgniteEMAHandler):
        model = make_model()
        handler = make_handler(cls, model)
        trainer = trainer_for(model)
        attach(handler, trainer)
        seen = record(trainer, name)
        trainer.run(batches(n), max_epochs=1)
        out.append((handler, seen))
    return out


EPOCH, EPOCHS, K_EPOCHS = 6, 5, 2  # a checkpoint after 12 of 30 updates


def resumable(setup, directory: Path, *, stop: bool = False, resume_from: Path | None = None):
    """Train EPOCHS epochs, checkpointing after K_EPOCHS; stop there, or resume from a checkpoint first.

    ``setup(model, trainer) -> (handler, to_save, seen)``. Returns (handler, seen, path of the checkpoint).
    """
    model = make_model()
    trainer = trainer_for(model)
    handler, to_save, seen = setup(model, trainer)
    to_save = {"model": model, "trainer": trainer, **to_save}
    saver = Checkpoint(to_save, DiskSaver(directory, require_empty=False))
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=K_EPOCHS), saver)
    if stop:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=K_EPOCHS), lambda e: e.terminate())
    if resume_from is not None:
        Checkpoint.load_objects(to_load=to_save, checkpoint=str(resume_from))  # torch.load(weights_only=True)
    trainer.run(batches(EPOCH), max_epochs=EPOCHS)
    return handler, seen, Path(directory) / saver.last_checkpoint if stop else None


def assert_resumes_exactly(setup, directory: Path):
    full, full_seen, _ = resumable(setup, directory / "full")
    _, first_seen, ckpt = resumable(setup, directory / "first", stop=True)
    resumed, resumed_seen, _ = resumable(setup, directory / "resumed", resume_from=ckpt)
    assert first_seen + resumed_seen == full_seen
    for a, b in zip(resumed.ema_model.state_dict().values(), full.ema_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    return ckpt, full, resumed


# -- subclasses that re-implement attach() with ignite's internals ------------------------------------------
def with_framework_attach(base: type) -> type:
    """A subclass as two frameworks built on ignite write it: attach() re-implemented with ignite's internals."""

    class FrameworkEMAHandler(base):
        def attach(self, engine, name="ema_momentum", warn_if_exists=True, event=Events.ITERATION_COMPLETED):
            if not hasattr(engine.state, name):
                setattr(engine.state, name, self.momentum)
            if self._momentum_lambda_obj is not None:
                self.momentum_scheduler = LambdaStateScheduler(self._momentum_lambda_obj, param_name=name)
                # first update the momentum and then update the EMA model
                self.momentum_scheduler.attach(engine, event)
            engine.add_event_handler(event, self._update_ema_model, name)

        @torch.no_grad()
        def swap_params(self) -> None:
            for ema_v, model_v in zip(
                self.ema_model.state_dict().values(), self.model.state_dict().values(), strict=True
            ):
                tmp = model_v.data.clone()
                model_v.data.copy_(ema_v.data)
                ema_v.data.copy_(tmp)

    return FrameworkEMAHandler


@pytest.mark.parametrize(
    "warmup",
    [
        dict(momentum=0.05, momentum_warmup=0.0, warmup_iters=0),  # the frameworks' default config
        dict(momentum=0.05, momentum_warmup=0.5, warmup_iters=10),
        dict(momentum=0.05),
    ],
    ids=["warmup_0", "warmup_10", "no_warmup"],
)
def test_subclass_reimplementing_attach_with_ignites_internals(warmup: dict) -> None:
    (ours, ours_m), (theirs, theirs_m) = side_by_side(
        lambda cls, model: with_framework_attach(cls)(model, **warmup),
        lambda h, trainer: h.attach(trainer, name="ema_momentum"),
    )
    assert ours_m == theirs_m
    if "warmup_iters" in warmup:
        assert ours_m[0] == warmup["momentum_warmup"] and ours_m[-1] == warmup["momentum"]
        assert isinstance(ours.momentum_scheduler, LambdaStateScheduler)
    assert_same_ema(ours.ema_model, theirs.ema_model)
    assert ours.ema.num_updates == STEPS  # the core counted every update

    # the subclass's own helper works on polyak's EMA model too: swap twice, back to the start, bit for bit
    before = {k: v.clone() for k, v in ours.model.state_dict().items()}
    ours.swap_params()
    assert_same_ema(ours.model, theirs.ema_model)
    ours.swap_params()
    for k, v in ours.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_momentum_warmup_zero_with_warmup_iters_zero_as_ignite() -> None:
    """``momentum_warmup=0.0, warmup_iters=0``: the first update keeps the EMA where it was, then ``momentum``."""
    (ours, ours_m), (theirs, theirs_m) = side_by_side(
        lambda cls, model: cls(model, momentum=0.1, momentum_warmup=0.0, warmup_iters=0),
        lambda h, trainer: h.attach(trainer),
    )
    assert ours_m == theirs_m == [0.0] + [0.1] * (STEPS - 1)
    assert ours._momentum_lambda_obj.warmup_iters == theirs._momentum_lambda_obj.warmup_iters == 0
    assert [ours._momentum_lambda_obj(k) for k in range(1, 5)] == [theirs._momentum_lambda_obj(k) for k in range(1, 5)]
    assert_same_ema(ours.ema_model, theirs.ema_model)


def test_lambda_obj_has_ignites_attributes_and_arithmetic() -> None:
    for args in [(0.5, 0.0, 7), (0.002, 0.2, 100), (0.5, 1.0, 5), (0.3, 0.3, 1), (0.01, 0.0, 0)]:
        momentum, momentum_warmup, warmup_iters = args
        ours = EMAHandler(nn.Linear(2, 1), momentum, momentum_warmup, warmup_iters)._momentum_lambda_obj
        theirs = IgniteEMAHandler(nn.Linear(2, 1), momentum, momentum_warmup, warmup_iters)._momentum_lambda_obj
        for attr in ("momentum", "momentum_warmup", "warmup_iters"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        assert [ours(k) for k in range(1, 120)] == [theirs(k) for k in range(1, 120)], args
    assert EMAHandler(nn.Linear(2, 1))._momentum_lambda_obj is IgniteEMAHandler(nn.Linear(2, 1))._momentum_lambda_obj


def test_subclass_momentum_scheduler_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    """The frameworks save ``momentum_scheduler`` (their ``LambdaStateScheduler``) in their Checkpoint.

    ignite's cannot be loaded back under torch >= 2.6 (``weights_only=True`` refuses its pickled EMAWarmUp);
    polyak's ``_momentum_lambda_obj`` saves as plain values, so the same subclass resumes, exactly.
    """

    def setup(cls):
        def build(model, trainer):
            handler = with_framework_attach(cls)(model, momentum=0.02, momentum_warmup=0.4, warmup_iters=20)
            handler.attach(trainer)
            to_save = {"ema_model": handler.ema_model, "ema_scheduler": handler.momentum_scheduler}
            return handler, to_save, record(trainer, "ema_momentum")

        return build

    ckpt, full, resumed = assert_resumes_exactly(setup(EMAHandler), tmp_path / "polyak")
    assert torch.load(ckpt, weights_only=True)["ema_scheduler"]["lambda_obj"]["warmup_iters"] == 20
    assert resumed.momentum_scheduler.event_index == full.momentum_scheduler.event_index == EPOCH * EPOCHS

    _, _, ignite_ckpt = resumable(setup(IgniteEMAHandler), tmp_path / "ignite", stop=True)
    with pytest.raises(pickle.UnpicklingError, match="EMAWarmUp"):
        torch.load(ignite_ckpt, weights_only=True)


def test_own_momentum_scheduler_in_a_checkpoint_restores_the_warmup(tmp_path: Path) -> None:
    """polyak's own ``momentum_scheduler`` saved beside ``ema_model``, ignite's way: the warm-up continues."""

    def build(model, trainer):
        handler = EMAHandler(model, momentum=0.02, momentum_warmup=0.4, warmup_iters=20)
        to_save = {"ema_model": handler.ema_model, "ema_scheduler": handler.momentum_scheduler}  # before attach
        handler.attach(trainer)
        return handler, to_save, record(trainer, "ema_momentum")

    ckpt, full, resumed = assert_resumes_exactly(build, tmp_path)
    assert torch.load(ckpt, weights_only=True)["ema_scheduler"] == {"event_index": 12, "param_name": "ema_momentum"}
    assert isinstance(resumed.momentum_scheduler, MomentumScheduler)
    assert resumed.momentum_scheduler.event_index == full.momentum_scheduler.event_index == EPOCH * EPOCHS


def test_momentum_scheduler_state_is_checked() -> None:
    h = EMAHandler(nn.Linear(2, 1), momentum=0.1, momentum_warmup=0.5, warmup_iters=4)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        h.momentum_scheduler.load_state_dict([1])
    with pytest.raises(ValueError, match="state_dict lacks 'event_index'"):
        h.momentum_scheduler.load_state_dict({"param_name": "ema_momentum"})
    with pytest.raises(ValueError, match=r"state_dict\['event_index'\] must be >= 0, got -1"):
        h.momentum_scheduler.load_state_dict({"event_index": -1})
    assert h.momentum_scheduler.event_index == 0  # refused calls changed nothing
    h.momentum_scheduler.load_state_dict({"event_index": 3, "param_name": "ema_momentum"})
    assert h.momentum_scheduler.event_index == 3 and h.momentum_scheduler.get_param() == 0.1
    # the warm-up object loads what was saved, as ignite's does (checked first: a bad one changes nothing)
    lam = h._momentum_lambda_obj
    with pytest.raises(ValueError, match="momentum_warmup must be in"):
        lam.load_state_dict({"momentum_warmup": 2.0, "warmup_iters": 4, "momentum": 0.1})
    assert lam.state_dict() == {"momentum_warmup": 0.5, "warmup_iters": 4, "momentum": 0.1}
    lam.load_state_dict({"momentum_warmup": 0.9, "warmup_iters": 4, "momentum": 0.1})
    assert lam(1) == 0.9


# -- subclasses that override _update_ema_model --------------------------------------------------------------
class LoRALinear(nn.Module):
    def __init__(self, d: int, r: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(r, d) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(d, r) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def with_lora_update(base: type) -> type:
    """A test-time-adaptation project's subclass: the EMA averages the LoRA weights only."""

    class LoRAEMAHandler(base):
        def _update_ema_model(self, engine, name):
            momentum = getattr(engine.state, name)
            ema_params = OrderedDict(self.ema_model.named_parameters())
            for p_name, model_p in self.model.named_parameters():
                if "lora_" in p_name:
                    ema_params[p_name].mul_(1.0 - momentum).add_(model_p.data, alpha=momentum)

    return LoRAEMAHandler


def test_overridden_update_ema_model_is_what_runs() -> None:
    out = []
    for cls in (EMAHandler, IgniteEMAHandler):
        torch.manual_seed(0)
        model = nn.Sequential(LoRALinear(4), LoRALinear(4))
        handler = with_lora_update(cls)(model, momentum=0.2)
        start = {k: v.clone() for k, v in handler.ema_model.state_dict().items()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with torch.no_grad():  # so that the base weights differ between the model and the EMA model
            model[0].base.weight.add_(1.0)

        def step(engine, batch, model=model, optimizer=optimizer):
            optimizer.zero_grad()
            model(batch).pow(2).mean().backward()
            optimizer.step()

        trainer = Engine(step)
        handler.attach(trainer)
        trainer.run(batches(10, seed=2), max_epochs=1)
        out.append((handler, start))
    (ours, ours_start), (theirs, _) = out
    assert_same_ema(ours.ema_model, theirs.ema_model)
    for name, t in ours.ema_model.state_dict().items():
        if "lora_" in name:
            assert not torch.equal(t, ours_start[name]), name  # averaged
        else:
            assert torch.equal(t, ours_start[name]), name  # left alone: the override is what ran
    assert ours.ema.num_updates == 0  # polyak's own update never ran


# -- whoever writes engine.state.<name> drives the EMA -------------------------------------------------------
def test_state_param_scheduler_drives_the_momentum_as_in_ignite() -> None:
    """ignite's ``test_param_scheduler_with_ema_handler``, on a training model, asserting the numbers."""

    def attach(handler, trainer):
        handler.attach(trainer, name="ema_decay")
        PiecewiseLinearStateScheduler(param_name="ema_decay", milestones_values=[(0, 0.0), (10, 0.9)]).attach(
            trainer, Events.ITERATION_COMPLETED
        )

    (ours, ours_m), (theirs, theirs_m) = side_by_side(lambda cls, model: cls(model), attach, name="ema_decay")
    assert ours_m == theirs_m
    # engine.state after each iteration: the scheduler (attached after the handler) writes the next momentum
    assert ours_m[:3] == [0.09, 0.18, 0.27] and ours_m[-1] == 0.9
    assert ours._momentum == ours_m[-2]  # the last update used what the scheduler wrote an iteration before
    assert_same_ema(ours.ema_model, theirs.ema_model)

    # polyak 0.1 ignored the scheduler and kept its own 0.0002: that EMA is far from this one
    model = make_model()
    fixed = EMAHandler(model)
    trainer = trainer_for(model)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: fixed.ema.update())
    trainer.run(batches(), max_epochs=1)
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(fixed.ema_model.parameters(), ours.ema_model.parameters(), strict=True)
    )
    assert gap > 0.05


def test_own_warmup_wins_over_an_earlier_writer_and_schedule_writes_before_each_update() -> None:
    """With a warm-up, ``momentum_scheduler`` writes before the update: another writer's value is overwritten."""
    model = make_model()
    h = EMAHandler(model, momentum=0.1, momentum_warmup=0.5, warmup_iters=5)
    trainer = trainer_for(model)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(e.state, "ema_momentum", 0.9))
    h.attach(trainer, warn_if_exists=False)
    used: list[float] = []
    original = h.ema.update
    h.ema.update = lambda steps=1, momentum=None: used.append(momentum) or original(steps, momentum=momentum)
    trainer.run(batches(8), max_epochs=1)
    assert used == [h._momentum_lambda_obj(k) for k in range(1, 9)]


def test_a_subclass_or_handler_writing_engine_state_drives_a_constant_ema() -> None:
    """Without a warm-up, the last value written before the update is the one used (ignite's semantics)."""
    for cls in (EMAHandler, IgniteEMAHandler):
        model = nn.Linear(2, 1, bias=False)
        nn.init.ones_(model.weight)
        h = cls(model, momentum=0.1)
        trainer = Engine(lambda e, b, model=model: model.weight.data.add_(1.0))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(e.state, "ema_momentum", 0.5))
        h.attach(trainer, warn_if_exists=False)
        trainer.run(range(4), max_epochs=1)
        # 1 -> 0.5*1+0.5*2 = 1.5 -> 2.25 -> 3.125 -> 4.0625, as ignite's own tests compute with momentum 0.5
        torch.testing.assert_close(h.ema_model.weight, torch.full((1, 2), 4.0625))


@pytest.mark.parametrize("bad", [None, 1.5, -0.1, float("nan"), "0.1"])
def test_a_bad_momentum_in_engine_state_is_refused_naming_it(bad) -> None:
    h = EMAHandler(nn.Linear(2, 1), momentum=0.1)
    trainer = Engine(lambda e, b: None)
    h.attach(trainer, name="my_ema")
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(e.state, "my_ema", bad))
    before = h.ema_model.weight.clone()
    with pytest.raises((TypeError, ValueError), match="engine.state.my_ema must"):
        trainer.run(range(2), max_epochs=1)
    assert torch.equal(h.ema_model.weight, before) and h.ema.num_updates == 0


def test_externally_driven_momentum_resumes_exactly(tmp_path: Path) -> None:
    """The handler's state holds what ``engine.state`` held: a resumed run's first update uses the scheduler's
    value, as the uninterrupted run did (ignite's would restart from ``momentum``)."""

    def build(model, trainer):
        handler = EMAHandler(model)
        handler.attach(trainer, name="ema_decay")
        scheduler = PiecewiseLinearStateScheduler(param_name="ema_decay", milestones_values=[(0, 0.0), (20, 0.5)])
        scheduler.attach(trainer, Events.ITERATION_COMPLETED)
        used: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: used.append(handler._momentum))
        return handler, {"ema": handler, "scheduler": scheduler}, used

    ckpt, _, _ = assert_resumes_exactly(build, tmp_path)
    assert torch.load(ckpt, weights_only=True)["ema"]["momentum"] == pytest.approx(0.5 * 12 / 20)


# -- values ignite accepts, with ignite's result -------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(momentum=np.float64(0.05)),
        dict(momentum=np.float32(0.05)),
        dict(momentum=torch.tensor(0.05)),
        dict(momentum=torch.tensor(0.05, dtype=torch.float64), momentum_warmup=torch.tensor(0.5), warmup_iters=5),
        dict(momentum=0.05, momentum_warmup=np.float64(0.5), warmup_iters=np.int64(5)),
    ],
    ids=["np_float64", "np_float32", "tensor_0d", "tensor_warmup", "numpy_warmup"],
)
def test_numpy_and_tensor_momenta_as_ignite(kwargs: dict) -> None:
    (ours, ours_m), (theirs, theirs_m) = side_by_side(
        lambda cls, model: cls(model, **kwargs), lambda h, trainer: h.attach(trainer)
    )
    assert ours_m == pytest.approx(theirs_m, rel=1e-7, abs=0)  # ignite keeps a float32 tensor's rounding
    assert isinstance(ours.momentum, float) and all(isinstance(m, float) for m in ours_m)
    assert_same_ema(ours.ema_model, theirs.ema_model)


# -- what "drop-in" means: results up to the last bits, and which are closer to exact ------------------------
def test_lerp_is_closer_to_float64_than_ignites_mul_add() -> None:
    """Same inputs in float32; the reference averages them in float64. polyak's ``lerp_`` computes
    ``ema + m * (theta - ema)``; ignite's ``ema * (1 - m) + m * theta`` rounds ``1 - m`` to float32 once for
    all updates, a bias that grows as ``m`` shrinks (README: "What drop-in means")."""
    g = torch.Generator().manual_seed(0)
    ratios = {}
    for m in (0.5, 0.1, 0.01, 0.002, 0.0002):
        theta = torch.randn(1024, dtype=torch.float64, generator=g)
        ref, lerp, muladd = theta.clone(), theta.float(), theta.float()
        for _ in range(2000):
            theta += 0.01 * torch.randn(1024, dtype=torch.float64, generator=g)
            x = theta.float()
            ref.mul_(1 - m).add_(x.double(), alpha=m)
            lerp.lerp_(x, m)
            muladd.mul_(1.0 - m).add_(x, alpha=m)
        ratios[m] = (muladd.double() - ref).pow(2).mean().sqrt() / (lerp.double() - ref).pow(2).mean().sqrt()
    assert ratios[0.5] == pytest.approx(1.0, abs=0.05)  # at 1/2 both round alike
    assert all(ratios[m] > 2 for m in (0.1, 0.01, 0.002, 0.0002)), ratios
    assert ratios[0.0002] > 20, ratios


# -- what subclasses and users do next (each found by trying it, side by side with ignite) ---------------------
def test_overridden_update_with_a_warmup_still_warms_up_as_ignite() -> None:
    """The warm-up counts events, not polyak's updates: an override that never calls super() still sees it."""

    def lora(base):
        class Own(base):
            def _update_ema_model(self, engine, name):
                m = getattr(engine.state, name)
                for e, p in zip(self.ema_model.parameters(), self.model.parameters(), strict=True):
                    e.mul_(1 - m).add_(p.data, alpha=m)

        return Own

    (ours, ours_m), (theirs, theirs_m) = side_by_side(
        lambda cls, model: lora(cls)(model, 0.01, 0.5, 10), lambda h, trainer: h.attach(trainer)
    )
    assert ours_m == theirs_m and ours_m[0] == 0.5 and ours_m[-1] == 0.01
    assert_same_ema(ours.ema_model, theirs.ema_model)


def test_subclass_init_may_assign_ignites_attributes() -> None:
    def assigning(base):
        class Assigning(base):
            def __init__(self, model, *args, **kwargs):
                super().__init__(model, *args, **kwargs)
                self.model = model
                self.ema_model = self.ema_model
                self.handle_buffers = "update"

        return Assigning

    (ours, ours_m), (theirs, theirs_m) = side_by_side(
        lambda cls, model: assigning(cls)(model, momentum=0.1), lambda h, trainer: h.attach(trainer)
    )
    assert ours.handle_buffers == "update" and ours_m == theirs_m
    assert_same_ema(ours.ema_model, theirs.ema_model)  # BatchNorm's running statistics averaged in both
    with pytest.raises(ValueError, match="build a new EMAHandler"):
        ours.model = nn.Linear(2, 2)


@pytest.mark.parametrize(
    "change",
    [
        lambda h: setattr(h, "momentum", 0.2),
        lambda h: setattr(h, "_momentum_lambda_obj", lambda i: 0.5 / i),
        lambda h: setattr(h, "_momentum_lambda_obj", None),
    ],
    ids=["momentum", "own_lambda", "no_lambda"],
)
def test_attributes_changed_before_attach_are_what_attach_uses(change) -> None:
    def build(cls, model):
        h = cls(model, 0.05, 0.5, 5)
        change(h)
        return h

    (ours, ours_m), (theirs, theirs_m) = side_by_side(build, lambda h, trainer: h.attach(trainer))
    assert ours_m == pytest.approx(theirs_m, rel=1e-15, abs=0)
    assert_same_ema(ours.ema_model, theirs.ema_model)


@pytest.mark.parametrize(
    "rebuild",
    [
        lambda h, model: h.ema_model.load_state_dict(h.ema_model.state_dict(), assign=True),
        lambda h, model: setattr(
            h.ema_model[0], "weight", nn.Parameter(h.ema_model[0].weight.detach().clone(), requires_grad=False)
        ),
    ],
    ids=["assign", "new_parameter"],
)
def test_ema_model_rebuilt_by_hand_keeps_being_updated_as_ignite(rebuild) -> None:
    def attach(h, trainer):
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: rebuild(h, h.model))
        h.attach(trainer)

    (ours, _), (theirs, _) = side_by_side(lambda cls, model: cls(model, momentum=0.2), attach)
    assert_same_ema(ours.ema_model, theirs.ema_model)


def test_bf16_ema_model_converted_to_float32_keeps_being_updated_exactly() -> None:
    model = make_model().to(torch.bfloat16)
    h = EMAHandler(model, momentum=0.1)

    def step() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        h.ema.update(momentum=0.1)
        return {k: v.detach().float() for k, v in model.named_parameters()}

    for _ in range(3):
        step()
    master = {k: v.clone() for k, v in h.ema.state_dict()["master"].items()}
    h.ema_model.float()  # to evaluate in float32: the EMA follows, its master's precision intact
    seen = [step(), step()]
    for name, t in h.ema_model.named_parameters():
        assert t.dtype == torch.float32
        assert torch.equal(t, master[name].lerp(seen[0][name], 0.1).lerp(seen[1][name], 0.1)), name


@torch.no_grad()
def reset(ema_model: nn.Module, model: nn.Module) -> None:
    for q, p in zip(ema_model.parameters(), model.parameters(), strict=True):
        q.copy_(p)


def test_writing_the_ema_weights_in_place_is_followed_with_a_master() -> None:
    """A reset of the EMA to the model (in place, mid-run) is what the next update starts from, in fp16 too."""
    for cls in (EMAHandler, IgniteEMAHandler):
        model = nn.Linear(4, 4).half()
        h = cls(model, momentum=0.1)
        trainer = Engine(lambda e, b, model=model: [p.data.add_(0.5) for p in model.parameters()])
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(once=10),
            lambda e, h=h, model=model: reset(h.ema_model, model),
        )
        h.attach(trainer)
        trainer.run(range(11), max_epochs=1)
        gap = (model.weight.float() - h.ema_model.weight.float()).abs().max().item()
        # after the reset at 10, one update with the model 0.5 further: the EMA is 0.45 behind
        assert gap == pytest.approx(0.45, abs=5e-3), cls  # float16 rounding, in ignite's arithmetic


def test_a_second_engine_starts_from_momentum_not_from_the_last_scheduled_value() -> None:
    h = EMAHandler(nn.Linear(2, 1), momentum=0.01)
    first = Engine(lambda e, b: None)
    h.attach(first, name="m")
    PiecewiseLinearStateScheduler(param_name="m", milestones_values=[(0, 0.0), (10, 0.5)]).attach(first)
    first.run(range(5), max_epochs=1)
    second = Engine(lambda e, b: None)
    h.attach(second, name="m")
    assert second.state.m == 0.01


def test_removed_attachment_is_forgotten() -> None:
    h = EMAHandler(nn.Linear(2, 1), momentum=0.1)
    trainer = Engine(lambda e, b: None)
    handle = h.attach(trainer)
    trainer.run(range(2), max_epochs=1)
    handle.remove()
    trainer.state.ema_momentum = 0.77  # another handler's now
    assert h.state_dict()["momentum"] == 0.1  # the last update's, not the detached engine's
    h.load_state_dict(h.state_dict())
    assert trainer.state.ema_momentum == 0.77


def test_refused_attach_changes_nothing_and_a_missing_attribute_says_so() -> None:
    h = EMAHandler(nn.Linear(2, 1), momentum=0.1, momentum_warmup=0.5, warmup_iters=3)
    trainer = Engine(lambda e, b: None)
    scheduler = h.momentum_scheduler
    with pytest.raises(ValueError):
        h.attach(trainer, event="no_such_event")
    assert not hasattr(trainer.state, "ema_momentum") and not h._attached and h.momentum_scheduler is scheduler
    plain = Engine(lambda e, b: None)
    plain.add_event_handler(Events.ITERATION_COMPLETED, h._update_ema_model, "never_set")
    with pytest.raises(AttributeError, match="engine.state has no attribute 'never_set'"):
        plain.run(range(1), max_epochs=1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(momentum=np.array(0.05)), dict(momentum=0.05, momentum_warmup=0.5, warmup_iters=10.0)],
    ids=["ndarray_0d", "float_warmup_iters"],
)
def test_config_values_ignite_accepts(kwargs: dict) -> None:
    """A float ``warmup_iters`` as ignite computes it; a 0-d numpy momentum as its value (ignite passes the
    array to ``add_(alpha=...)``, which refuses it at the first update)."""
    as_ignite = {k: float(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    (ours, ours_m), (theirs, theirs_m) = side_by_side(
        lambda cls, model: cls(model, **(kwargs if cls is EMAHandler else as_ignite)),
        lambda h, trainer: h.attach(trainer),
    )
    assert ours_m == theirs_m
    assert_same_ema(ours.ema_model, theirs.ema_model)


def test_a_write_through_data_is_taken_after_refresh() -> None:
    """``.data`` writes bypass autograd's version counters, so the EMA cannot see them: ``refresh()`` takes
    the EMA model's values into the float32 master (a plain in-place write or a load is seen by itself)."""
    model = nn.Linear(4, 4).half()
    ema = EMA(model, momentum=0.1)
    ema.ema_model.weight.data.fill_(3.0)
    ema.refresh()
    ema.update()
    expected = torch.full((4, 4), 3.0).lerp(model.weight.float(), 0.1).half()
    assert torch.equal(ema.ema_model.weight, expected)
