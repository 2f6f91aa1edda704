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

from polyak import EMAHandler
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
    assert resumed.ema.num_updates == full.ema.num_updates == EPOCH * EPOCHS


def test_momentum_scheduler_state_is_checked() -> None:
    h = EMAHandler(nn.Linear(2, 1), momentum=0.1, momentum_warmup=0.5, warmup_iters=4)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        h.momentum_scheduler.load_state_dict([1])
    with pytest.raises(ValueError, match="state_dict lacks 'event_index'"):
        h.momentum_scheduler.load_state_dict({"param_name": "ema_momentum"})
    with pytest.raises(ValueError, match=r"state_dict\['event_index'\] must be >= 0, got -1"):
        h.momentum_scheduler.load_state_dict({"event_index": -1})
    assert h.ema.num_updates == 0  # refused calls changed nothing
    h.momentum_scheduler.load_state_dict({"event_index": 3, "param_name": "ema_momentum"})
    assert h.ema.num_updates == 3 and h.momentum_scheduler.get_param() == 0.1
    # a schedule loads only into the same schedule: a checkpoint of another warm-up is refused, not mixed in
    other = EMAHandler(nn.Linear(2, 1), momentum=0.1, momentum_warmup=0.9, warmup_iters=4)._momentum_lambda_obj
    with pytest.raises(ValueError, match="describes another schedule"):
        h._momentum_lambda_obj.load_state_dict(other.state_dict())
    h._momentum_lambda_obj.load_state_dict(h._momentum_lambda_obj.state_dict())


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
