"""Resuming through ignite's ``Checkpoint`` + ``DiskSaver`` continues the EMA bit for bit.

Run A trains uninterrupted for ``N_EPOCHS``; run B stops after ``K_EPOCHS`` (a checkpoint at each
``EPOCH_COMPLETED``), then completely new objects load the last checkpoint file with
``torch.load(..., weights_only=True)`` and train to ``N_EPOCHS``. The warm-up spans the interruption, so a
warm-up that restarted on resume would change both the momentum and the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.handlers import EMAHandler as IgniteEMAHandler
from torch import nn

from polyak import EMA, EMAHandler
from polyak.schedules import linear_warmup

EPOCH_LENGTH = 5
N_EPOCHS = 4
K_EPOCHS = 2
MOMENTUM = 0.01
MOMENTUM_WARMUP = 0.5


def _make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(EPOCH_LENGTH)]


DATA = _make_data()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spinning on a shared 2-core machine (5x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Engine
    handler: EMAHandler | IgniteEMAHandler
    momenta: list[float] = field(default_factory=list)


def _build(
    *,
    init_seed: int = 0,
    handler_cls: type = EMAHandler,
    sgd_momentum: float = 0.9,
    model_dtype: torch.dtype = torch.float32,
    **handler_kwargs: object,
) -> Run:
    """Fresh model, optimizer, trainer and handler; ``init_seed`` only changes the (overwritten) init."""
    model = _make_model(init_seed).to(model_dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=sgd_momentum)

    def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        model.train()
        optimizer.zero_grad()
        x, y = (t.to(model_dtype) for t in batch)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    handler = handler_cls(model, **handler_kwargs)
    return Run(model, optimizer, trainer, handler)


def _attach(run: Run, name: str, event: Events) -> None:
    """Attach the handler, then record the momentum of every update (read after the update)."""
    run.handler.attach(run.trainer, name=name, event=event)
    run.trainer.add_event_handler(event, lambda e: run.momenta.append(getattr(e.state, name)))


def _checkpoint(run: Run, to_save: dict, dirname: Path) -> Checkpoint:
    ckpt = Checkpoint(to_save, DiskSaver(str(dirname), require_empty=False), n_saved=None)
    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, ckpt)
    return ckpt


def _stop_after(run: Run, epochs: int) -> None:
    # registered after the checkpoint handler, so the checkpoint of that epoch is written first
    run.trainer.add_event_handler(Events.EPOCH_COMPLETED(once=epochs), lambda e: e.terminate())


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], dict):
            _assert_bitwise_equal(a[k], b[k])
            continue
        if not isinstance(a[k], torch.Tensor):
            assert a[k] == b[k], k
            continue
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| = {(a[k].double() - b[k].double()).abs().max()}"


def _params_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


# name, event, warmup_iters, updates per epoch
CONFIGS = {
    # 20 updates, warm-up over 25: the run ends mid-warm-up, so the final momentum itself tells a restart
    "default": ("ema_momentum", Events.ITERATION_COMPLETED, 25, EPOCH_LENGTH),
    # updates at iterations 3, 6, ..., 18: 3 before the interruption, warm-up over 5 updates
    "every3_custom_name": ("my_ema_m", Events.ITERATION_COMPLETED(every=3), 5, None),
}


def _expected_updates(config: str, epochs: int) -> int:
    _, _, _, per_epoch = CONFIGS[config]
    return epochs * per_epoch if per_epoch is not None else (epochs * EPOCH_LENGTH) // 3


@pytest.mark.parametrize("load", ["before_attach", "after_attach"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_through_checkpoint_is_bitwise_identical(tmp_path: Path, config: str, load: str) -> None:
    name, event, warmup_iters, _ = CONFIGS[config]
    kwargs = dict(momentum=MOMENTUM, momentum_warmup=MOMENTUM_WARMUP, warmup_iters=warmup_iters)
    k_updates = _expected_updates(config, K_EPOCHS)
    n_updates = _expected_updates(config, N_EPOCHS)
    assert 0 < k_updates < warmup_iters  # the warm-up spans the interruption

    # Run A: uninterrupted.
    a = _build(**kwargs)
    _attach(a, name, event)
    a.trainer.run(DATA, max_epochs=N_EPOCHS)
    assert a.trainer.state.iteration == N_EPOCHS * EPOCH_LENGTH
    assert a.handler.ema.num_updates == n_updates

    # Run B, part 1: same start, stopped at the end of epoch K.
    b1 = _build(**kwargs)
    _attach(b1, name, event)
    ckpt = _checkpoint(
        b1, {"model": b1.model, "optimizer": b1.optimizer, "trainer": b1.trainer, "ema": b1.handler}, tmp_path
    )
    _stop_after(b1, K_EPOCHS)
    b1.trainer.run(DATA, max_epochs=N_EPOCHS)
    assert b1.trainer.state.epoch == K_EPOCHS
    assert b1.handler.ema.num_updates == k_updates
    ema_at_k = _snapshot(b1.handler.ema_model)
    path = ckpt.last_checkpoint
    assert Path(path).name == f"checkpoint_{K_EPOCHS * EPOCH_LENGTH}.pt"  # global step: the iteration

    # Run B, part 2: all new objects (a different init, so that loading has to do the work).
    b2 = _build(init_seed=99, **kwargs)
    assert _params_differ(_snapshot(b2.handler.ema_model), ema_at_k)
    to_load = {"model": b2.model, "optimizer": b2.optimizer, "trainer": b2.trainer, "ema": b2.handler}
    checkpoint = torch.load(path, weights_only=True)
    if load == "before_attach":
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        _attach(b2, name, event)
    else:
        _attach(b2, name, event)
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
    # either way, the state holds the momentum of the last update restored, as in the interrupted run
    assert getattr(b2.trainer.state, name) == b2.handler.ema.momentum_at(k_updates) == getattr(b1.trainer.state, name)
    assert b2.handler.ema.num_updates == k_updates
    _assert_bitwise_equal(_snapshot(b2.handler.ema_model), ema_at_k)
    assert b2.trainer.state.epoch == K_EPOCHS
    b2.trainer.run(DATA, max_epochs=N_EPOCHS)

    assert b2.trainer.state.iteration == N_EPOCHS * EPOCH_LENGTH
    _assert_bitwise_equal(_snapshot(b2.handler.ema_model), _snapshot(a.handler.ema_model))
    _assert_bitwise_equal(_snapshot(b2.model), _snapshot(a.model))
    assert getattr(b2.trainer.state, name) == getattr(a.trainer.state, name)
    assert b2.handler.ema.num_updates == a.handler.ema.num_updates == n_updates
    # the whole momentum sequence, across the interruption, is the uninterrupted one ...
    assert b1.momenta + b2.momenta == a.momenta
    # ... which is ignite's warm-up formula
    schedule = linear_warmup(MOMENTUM_WARMUP, MOMENTUM, warmup_iters)
    assert a.momenta == [schedule(k) for k in range(1, n_updates + 1)]
    assert a.momenta[0] == MOMENTUM_WARMUP
    assert len(set(a.momenta[k_updates - 1 : k_updates + 1])) == 2  # still warming up at the interruption


# The core's options that carry state of their own: a float32 master (bf16 model), the generator of
# stochastic rounding, the iteration of the last update (per_step). Each must survive the checkpoint.
OPTIONS = {
    "bf16_model_float32_master": (dict(model_dtype=torch.bfloat16), Events.ITERATION_COMPLETED),
    "bf16_stochastic_rounding": (
        dict(model_dtype=torch.bfloat16, dtype=torch.bfloat16, stochastic_rounding=True, seed=3),
        Events.ITERATION_COMPLETED,
    ),
    "per_step_every3": (dict(per_step=True), Events.ITERATION_COMPLETED(every=3)),
}


@pytest.mark.parametrize("load", ["before_attach", "after_attach"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_resume_with_core_options_is_bitwise_identical(tmp_path: Path, option: str, load: str) -> None:
    extra, event = OPTIONS[option]
    kwargs = dict(momentum=MOMENTUM, momentum_warmup=MOMENTUM_WARMUP, warmup_iters=25, **extra)
    name = "ema_momentum"

    a = _build(**kwargs)
    _attach(a, name, event)
    a.trainer.run(DATA, max_epochs=N_EPOCHS)

    b1 = _build(**kwargs)
    _attach(b1, name, event)
    objects = lambda r: {"model": r.model, "optimizer": r.optimizer, "trainer": r.trainer, "ema": r.handler}  # noqa: E731
    ckpt = _checkpoint(b1, objects(b1), tmp_path)
    _stop_after(b1, K_EPOCHS)
    b1.trainer.run(DATA, max_epochs=N_EPOCHS)
    state_at_k = b1.handler.state_dict()
    if option.startswith("bf16"):
        assert "master" in state_at_k or "generator" in state_at_k

    b2 = _build(init_seed=99, **kwargs)
    checkpoint = torch.load(ckpt.last_checkpoint, weights_only=True)
    if load == "before_attach":
        Checkpoint.load_objects(to_load=objects(b2), checkpoint=checkpoint)
        _attach(b2, name, event)
    else:
        _attach(b2, name, event)
        Checkpoint.load_objects(to_load=objects(b2), checkpoint=checkpoint)
    _assert_bitwise_equal(b2.handler.state_dict(), state_at_k)
    b2.trainer.run(DATA, max_epochs=N_EPOCHS)

    assert b1.momenta + b2.momenta == a.momenta
    assert b2.handler.ema.num_updates == a.handler.ema.num_updates > 0
    _assert_bitwise_equal(b2.handler.state_dict(), a.handler.state_dict())  # weights, master, generator, counts
    _assert_bitwise_equal(_snapshot(b2.handler.ema_model), _snapshot(a.handler.ema_model))
    if option == "per_step_every3":
        # engine.state holds the schedule's per-step momentum of each update, across the interruption too
        # (test_intervals checks that an update every 3 iterations applies it as 1 - (1 - m)**3)
        schedule = linear_warmup(MOMENTUM_WARMUP, MOMENTUM, 25)
        assert a.momenta == [schedule(k) for k in range(1, len(a.momenta) + 1)]


def test_seed_flow_resyncs_float32_master_of_bf16_model(tmp_path: Path) -> None:
    """Weights loaded into ``ema_model`` alone (the seed's flow) must not be overwritten by a stale master."""
    b1 = _build(model_dtype=torch.bfloat16, momentum=0.2)
    _attach(b1, "ema_momentum", Events.ITERATION_COMPLETED)
    ckpt = _checkpoint(b1, {"model": b1.model, "ema_model": b1.handler.ema_model, "trainer": b1.trainer}, tmp_path)
    _stop_after(b1, K_EPOCHS)
    b1.trainer.run(DATA, max_epochs=N_EPOCHS)
    ema_at_k = _snapshot(b1.handler.ema_model)

    b2 = _build(init_seed=99, model_dtype=torch.bfloat16, momentum=0.2)
    assert "master" in b2.handler.state_dict()
    to_load = {"model": b2.model, "ema_model": b2.handler.ema_model, "trainer": b2.trainer}
    Checkpoint.load_objects(to_load=to_load, checkpoint=torch.load(ckpt.last_checkpoint, weights_only=True))
    _assert_bitwise_equal(_snapshot(b2.handler.ema_model), ema_at_k)
    for k, master in b2.handler.state_dict()["master"].items():
        assert master.dtype == torch.float32
        assert torch.equal(master, ema_at_k[k].float()), k
    # one update from there: the bf16 rounding of lerp(loaded weights, online, m) computed in float32
    online = {k: v.detach().float() for k, v in b2.model.state_dict().items()}
    b2.handler.ema.update()
    for k, v in b2.handler.ema_model.named_parameters():
        expected = torch.lerp(ema_at_k[k].float(), online[k], 0.2).to(torch.bfloat16)
        assert torch.equal(v, expected), k


def test_seed_flow_saving_ema_model_restores_the_weights(tmp_path: Path) -> None:
    """The seed's flow: ``{"model", "ema_model", "trainer"}``, loaded before ``attach``.

    Only the weights are restored (the update count is not, so a warm-up would restart: expected); with a
    constant momentum and a stateless optimizer, the resumed run is the uninterrupted one bit for bit.
    """
    kwargs = dict(momentum=0.05, sgd_momentum=0.0)

    a = _build(**kwargs)
    _attach(a, "ema_momentum", Events.ITERATION_COMPLETED)
    a.trainer.run(DATA, max_epochs=N_EPOCHS)

    b1 = _build(**kwargs)
    _attach(b1, "ema_momentum", Events.ITERATION_COMPLETED)
    to_save = {"model": b1.model, "ema_model": b1.handler.ema_model, "trainer": b1.trainer}
    ckpt = _checkpoint(b1, to_save, tmp_path)
    _stop_after(b1, K_EPOCHS)
    b1.trainer.run(DATA, max_epochs=N_EPOCHS)
    ema_at_k = _snapshot(b1.handler.ema_model)

    b2 = _build(init_seed=99, **kwargs)
    to_load = {"model": b2.model, "ema_model": b2.handler.ema_model, "trainer": b2.trainer}
    Checkpoint.load_objects(to_load=to_load, checkpoint=torch.load(ckpt.last_checkpoint, weights_only=True))
    _assert_bitwise_equal(_snapshot(b2.handler.ema_model), ema_at_k)
    assert b2.handler.ema.num_updates == 0  # not in this flow's checkpoint: expected
    # the loaded weights went into the EMA's own storage: updates still reach ema_model
    _attach(b2, "ema_momentum", Events.ITERATION_COMPLETED)
    b2.trainer.run(DATA, max_epochs=N_EPOCHS)

    assert b2.handler.ema.num_updates == (N_EPOCHS - K_EPOCHS) * EPOCH_LENGTH
    _assert_bitwise_equal(_snapshot(b2.handler.ema_model), _snapshot(a.handler.ema_model))
    assert b2.trainer.state.ema_momentum == a.trainer.state.ema_momentum == 0.05


def test_seed_flow_with_warmup_restarts_the_warmup_as_documented(tmp_path: Path) -> None:
    """Without the handler in the checkpoint the count is lost: the warm-up starts again (documented)."""
    kwargs = dict(momentum=MOMENTUM, momentum_warmup=MOMENTUM_WARMUP, warmup_iters=25)
    b1 = _build(**kwargs)
    _attach(b1, "ema_momentum", Events.ITERATION_COMPLETED)
    to_save = {"model": b1.model, "ema_model": b1.handler.ema_model, "trainer": b1.trainer}
    ckpt = _checkpoint(b1, to_save, tmp_path)
    _stop_after(b1, K_EPOCHS)
    b1.trainer.run(DATA, max_epochs=N_EPOCHS)

    b2 = _build(init_seed=99, **kwargs)
    to_load = {"model": b2.model, "ema_model": b2.handler.ema_model, "trainer": b2.trainer}
    Checkpoint.load_objects(to_load=to_load, checkpoint=torch.load(ckpt.last_checkpoint, weights_only=True))
    _attach(b2, "ema_momentum", Events.ITERATION_COMPLETED)
    b2.trainer.run(DATA, max_epochs=N_EPOCHS)
    assert b2.momenta == b1.momenta  # both halves are updates 1..10 of the warm-up


def test_contrast_ignite_reference_restarts_warmup_on_resume_ours_does_not(tmp_path: Path) -> None:
    """ignite 0.5's EMAHandler keeps its warm-up progress in a private counter that is not saved.

    Uninterrupted, ignite's handler and ours agree (same momenta, same weights up to rounding); resumed
    through the seed's checkpoint flow, ignite's warm-up starts over while ours (handler in the
    checkpoint) continues exactly.
    """
    warmup_iters = 12
    kwargs = dict(momentum=MOMENTUM, momentum_warmup=MOMENTUM_WARMUP, warmup_iters=warmup_iters)
    name, event = "ema_momentum", Events.ITERATION_COMPLETED

    def objects(run: Run) -> dict:
        out = {"model": run.model, "optimizer": run.optimizer, "trainer": run.trainer}
        if isinstance(run.handler, EMAHandler):
            out["ema"] = run.handler  # ours: the handler itself (weights and update count)
        else:
            out["ema_model"] = run.handler.ema_model  # ignite's: it has no state_dict
        return out

    def uninterrupted(handler_cls: type) -> Run:
        run = _build(handler_cls=handler_cls, **kwargs)
        _attach(run, name, event)
        run.trainer.run(DATA, max_epochs=N_EPOCHS)
        return run

    def resumed(handler_cls: type, dirname: Path) -> tuple[Run, Run]:
        first = _build(handler_cls=handler_cls, **kwargs)
        _attach(first, name, event)
        ckpt = _checkpoint(first, objects(first), dirname)
        _stop_after(first, K_EPOCHS)
        first.trainer.run(DATA, max_epochs=N_EPOCHS)

        second = _build(init_seed=99, handler_cls=handler_cls, **kwargs)
        Checkpoint.load_objects(to_load=objects(second), checkpoint=torch.load(ckpt.last_checkpoint, weights_only=True))
        _attach(second, name, event)
        second.trainer.run(DATA, max_epochs=N_EPOCHS)
        return first, second

    params = lambda run: {k: v for k, v in _snapshot(run.handler.ema_model).items() if v.is_floating_point()}  # noqa: E731

    ref_a, ours_a = uninterrupted(IgniteEMAHandler), uninterrupted(EMAHandler)
    assert ref_a.momenta == ours_a.momenta  # same warm-up formula, uninterrupted
    for k, v in params(ref_a).items():
        torch.testing.assert_close(params(ours_a)[k], v, rtol=1e-5, atol=1e-6)

    ref_b1, ref_b2 = resumed(IgniteEMAHandler, tmp_path / "ignite")
    ours_b1, ours_b2 = resumed(EMAHandler, tmp_path / "polyak")
    k_updates = K_EPOCHS * EPOCH_LENGTH

    # ignite: the momentum after resume is that of a fresh warm-up, not the uninterrupted one
    assert ref_b1.momenta == ref_a.momenta[:k_updates]
    assert ref_b2.momenta == ref_a.momenta[: len(ref_b2.momenta)]
    assert ref_b1.momenta + ref_b2.momenta != ref_a.momenta
    assert ref_b2.trainer.state.ema_momentum != ref_a.trainer.state.ema_momentum
    assert _params_differ(params(ref_b2), params(ref_a))
    # ours: exactly the uninterrupted run
    assert ours_b1.momenta + ours_b2.momenta == ours_a.momenta
    assert ours_b2.trainer.state.ema_momentum == ours_a.trainer.state.ema_momentum
    _assert_bitwise_equal(_snapshot(ours_b2.handler.ema_model), _snapshot(ours_a.handler.ema_model))


# -- state_dict ---------------------------------------------------------------------------------------


def _trained_handler(init_seed: int = 0, updates: int = 3, **options: object) -> EMAHandler:
    run = _build(init_seed=init_seed, momentum=0.2, **options)
    _attach(run, "ema_momentum", Events.ITERATION_COMPLETED)
    run.trainer.run(DATA[:updates], max_epochs=1)
    assert run.handler.ema.num_updates == updates
    return run.handler


def _clone_state(state: object) -> object:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    return state


BF16_MASTER = dict(model_dtype=torch.bfloat16)
BF16_STOCHASTIC = dict(model_dtype=torch.bfloat16, dtype=torch.bfloat16, stochastic_rounding=True, seed=3)
PER_STEP = dict(per_step=True)


@pytest.mark.parametrize("options", [{}, BF16_MASTER, BF16_STOCHASTIC, PER_STEP], ids=lambda o: "-".join(o) or "plain")
def test_state_dict_round_trips_through_weights_only_load(tmp_path: Path, options: dict) -> None:
    src = _trained_handler(init_seed=0, updates=3, **options)
    torch.save(src.state_dict(), tmp_path / "ema.pt")
    loaded = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert {"num_updates", "ema_model"} <= set(loaded)
    assert ("master" in loaded) is (options is BF16_MASTER)
    assert ("generator" in loaded) is (options is BF16_STOCHASTIC)
    assert ("last_iteration" in loaded) is (options is PER_STEP)

    dst = _trained_handler(init_seed=7, updates=1, **options)
    dst.load_state_dict(loaded)
    assert dst.ema.num_updates == 3
    _assert_bitwise_equal(dst.state_dict(), src.state_dict())
    _assert_bitwise_equal(_snapshot(dst.ema_model), _snapshot(src.ema_model))
    # copied into, not aliased with, the loaded tensors
    for k, v in dst.ema_model.state_dict().items():
        assert v.data_ptr() != loaded["ema_model"][k].data_ptr()
    # and both continue alike from the same online model
    dst.model.load_state_dict(src.model.state_dict())
    src.ema.update()
    dst.ema.update()
    _assert_bitwise_equal(dst.state_dict(), src.state_dict())

    # the core's state_dict loads with weights_only too
    core = EMA(_make_model(3), momentum=0.1)
    core.update()
    torch.save(core.state_dict(), tmp_path / "core.pt")
    core2 = EMA(_make_model(4), momentum=0.1)
    core2.load_state_dict(torch.load(tmp_path / "core.pt", weights_only=True))
    assert core2.num_updates == 1
    _assert_bitwise_equal(_snapshot(core2.ema_model), _snapshot(core.ema_model))


def _corrupt(kind: str, good: dict) -> dict:
    """A state dict wrong in one way, every value of which differs from the target's (to see partial loads)."""
    sd = _clone_state(good)
    bump = lambda t: t + 1 if t.is_floating_point() else t + 5  # noqa: E731
    tensors = sd["ema_model"] = {k: bump(v) for k, v in sd["ema_model"].items()}
    sd["num_updates"] = 17
    sd["num_skipped"] = 2
    if "master" in sd:
        sd["master"] = {k: v + 1 for k, v in sd["master"].items()}
    if "generator" in sd:
        sd["generator"] = torch.Generator().manual_seed(12345).get_state()
    if "last_iteration" in sd:
        sd["last_iteration"] = 40
    last = list(tensors)[-1]  # checked last: a partial load would already have copied the others
    last_float = [k for k, v in tensors.items() if v.is_floating_point()][-1]
    if kind == "missing_key":
        del tensors[last]
    elif kind == "unexpected_key":
        tensors["extra.weight"] = torch.zeros(2)
    elif kind == "renamed_key":
        tensors["renamed"] = tensors.pop(last)
    elif kind == "wrong_shape":
        tensors[last_float] = torch.zeros(tensors[last_float].numel() + 1)
    elif kind == "transposed_shape":
        weight = [k for k, v in tensors.items() if v.dim() == 2 and v.shape[0] != v.shape[1]][-1]
        tensors[weight] = tensors[weight].t().contiguous()
    elif kind == "negative_num_updates":
        sd["num_updates"] = -1
    elif kind == "negative_num_updates_tensor":
        sd["num_updates"] = torch.tensor(-3)
    elif kind == "float_num_updates":
        sd["num_updates"] = 2.5
    elif kind == "bool_num_updates":
        sd["num_updates"] = True
    elif kind == "negative_num_skipped":
        sd["num_skipped"] = -1
    elif kind == "no_num_updates":
        del sd["num_updates"]
    elif kind == "no_ema_model":
        del sd["ema_model"]
    elif kind == "master_wrong_shape":
        name = list(sd["master"])[-1]
        sd["master"][name] = torch.zeros(sd["master"][name].numel() + 1)
    elif kind == "master_missing_key":
        del sd["master"][list(sd["master"])[-1]]
    elif kind == "generator_wrong_size":
        sd["generator"] = sd["generator"][:-8]
    elif kind == "negative_last_iteration":
        sd["last_iteration"] = -1
    else:  # pragma: no cover
        raise AssertionError(kind)
    return sd


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        *[
            (kind, {})
            for kind in [
                "missing_key",
                "unexpected_key",
                "renamed_key",
                "wrong_shape",
                "transposed_shape",
                "negative_num_updates",
                "negative_num_updates_tensor",
                "float_num_updates",
                "bool_num_updates",
                "negative_num_skipped",
                "no_num_updates",
                "no_ema_model",
            ]
        ],
        ("wrong_shape", BF16_MASTER),
        ("master_wrong_shape", BF16_MASTER),
        ("master_missing_key", BF16_MASTER),
        ("negative_last_iteration", PER_STEP),
        ("generator_wrong_size", BF16_STOCHASTIC),
    ],
    ids=lambda v: v if isinstance(v, str) else ("-".join(v) or "plain"),
)
def test_bad_state_dict_raises_value_error_and_leaves_ema_untouched(kind: str, options: dict) -> None:
    handler = _trained_handler(**options)
    before = _clone_state(handler.state_dict())
    bad = _corrupt(kind, handler.state_dict())
    with pytest.raises(ValueError):
        handler.load_state_dict(bad)
    _assert_bitwise_equal(handler.state_dict(), before)  # weights, master, generator, counts
    assert handler.ema.num_updates == 3
    # the handler still works, on the same storage
    m = handler.ema.update()
    assert handler.ema.num_updates == 4 and m == 0.2
    assert _params_differ(_snapshot(handler.ema_model), before["ema_model"])
