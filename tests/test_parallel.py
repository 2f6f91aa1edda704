"""EMAHandler with DataParallel (CPU), DistributedDataParallel (2 gloo ranks), devices and modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from polyak import EMAHandler

TOL = dict(rtol=1e-13, atol=1e-14)  # float64: lerp and (1 - m) * e + m * t differ by a few ulps at most


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()


def _warmup_momentum(k: int, momentum_warmup: float, momentum: float, warmup_iters: int) -> float:
    """The seed's warm-up, written out independently of polyak.schedules."""
    m = momentum_warmup + (momentum - momentum_warmup) * (k - 1) / max(1, warmup_iters - 1)
    return max(momentum, m) if momentum < momentum_warmup else min(momentum, m)


def _hand_ema(
    initial: dict[str, torch.Tensor], online: list[dict[str, torch.Tensor]], momenta: list[float], names
) -> dict[str, torch.Tensor]:
    """ema_k = (1 - m_k) * ema_{k-1} + m_k * theta_k over ``names``, from the initial (copied) weights."""
    ema = {k: initial[k].clone() for k in names}
    for theta, m in zip(online, momenta, strict=True):
        for k in names:
            ema[k] = (1 - m) * ema[k] + m * theta[k]
    return ema


def _train_recording(model: nn.Module, handler: EMAHandler, steps: int, seed: int = 5):
    """SGD steps in an ignite Engine; the online weights after each step and the momentum of each update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64))
        for _ in range(steps)
    ]
    online: list[dict[str, torch.Tensor]] = []
    momenta: list[float] = []
    inner = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model

    def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        model.train()
        optimizer.zero_grad()
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        online.append({k: v.detach().clone() for k, v in inner.state_dict().items()})
        return loss.item()

    trainer = Engine(step)
    handler.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: momenta.append(e.state.ema_momentum))
    trainer.run(data, max_epochs=1)
    return online, momenta


# -- DataParallel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("handle_buffers", ["copy", "update"])
def test_dataparallel_ema_is_dataparallel_and_tracks_inner_module(handle_buffers: str) -> None:
    model = _bn_model()
    dp = nn.DataParallel(model)  # no GPU: a plain wrapper that calls model.module
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    handler = EMAHandler(dp, momentum=0.1, momentum_warmup=0.6, warmup_iters=4, handle_buffers=handle_buffers)

    assert isinstance(handler.ema_model, nn.DataParallel)
    assert handler.model is dp  # only DDP is unwrapped for `model`
    assert handler.ema_model.module is not model
    assert not handler.ema_model.training and not handler.ema_model.module.training
    # the EMA has its own tensors
    online_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert not online_ptrs & {t.data_ptr() for t in handler.ema_model.state_dict().values()}
    # its state dict is keyed like the inner module's (unwrapped), as ignite's Checkpoint expects
    assert set(handler.state_dict()["ema_model"]) == set(model.state_dict())

    steps = 7
    online, momenta = _train_recording(dp, handler, steps)
    assert handler.ema.num_updates == steps
    assert momenta == pytest.approx([_warmup_momentum(k, 0.6, 0.1, 4) for k in range(1, steps + 1)], rel=1e-15)

    ema = handler.ema_model.module.state_dict()
    params = [k for k, _ in model.named_parameters()]
    float_buffers = [k for k, b in model.named_buffers() if b.is_floating_point()]
    averaged = params + float_buffers if handle_buffers == "update" else params
    expected = _hand_ema(initial, online, momenta, averaged)
    for k in averaged:
        torch.testing.assert_close(ema[k], expected[k], **TOL)
        if not torch.allclose(online[-1][k], initial[k]):  # (the first Linear's bias: BN zeroes its grad)
            assert not torch.allclose(ema[k], online[-1][k]), k  # a real average, not a copy
    for k in set(ema) - set(averaged):  # copied: the last online values, exactly
        assert torch.equal(ema[k], online[-1][k]), k
    assert int(ema["1.num_batches_tracked"]) == steps

    x = torch.randn(5, 3, dtype=torch.float64)
    out = handler.ema_model(x)
    assert out.shape == (5, 1)
    assert torch.equal(out, handler.ema_model.module(x))
    assert not torch.allclose(out, dp.eval()(x))


# -- DistributedDataParallel ----------------------------------------------------------------------------


def _require_gloo() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat"])
def test_ddp_two_gloo_ranks_average_model_module_identically(tmp_path: Path, flat: bool) -> None:
    _require_gloo()
    from _dist import (
        DDP_MOMENTUM,
        DDP_MOMENTUM_WARMUP,
        DDP_STEPS,
        DDP_WARMUP_ITERS,
        ddp_worker,
        free_port,
        run_ranks,
    )

    run_ranks(ddp_worker, nprocs=2, args=(2, free_port(), str(tmp_path), flat), timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for r in (r0, r1):  # flat mode: the DDP model's parameters are views of one buffer, and DDP trains on
        assert r["online_storages"] == (1 if flat else 4)

    for r in (r0, r1):
        assert r["model_is_module"] is True  # the handler averages ddp.module
        assert r["ema_model_type"] == "Sequential"  # not a DDP: a copy of model.module
        assert r["ema_model_training"] is False
        assert r["ema_shares_storage"] is False
        assert r["num_updates"] == DDP_STEPS
        assert len(r["online"]) == DDP_STEPS

    # DDP kept the online models in sync, and both ranks' EMAs are the same, bit for bit
    for k in r0["initial"]:
        assert torch.equal(r0["initial"][k], r1["initial"][k])
        for t0, t1 in zip(r0["online"], r1["online"], strict=True):
            assert torch.equal(t0[k], t1[k])
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    assert r0["momenta"] == r1["momenta"]

    # the momenta are the seed's warm-up, and the EMA is the hand-computed one over the recorded weights
    expected_m = [
        _warmup_momentum(k, DDP_MOMENTUM_WARMUP, DDP_MOMENTUM, DDP_WARMUP_ITERS) for k in range(1, DDP_STEPS + 1)
    ]
    assert r0["momenta"] == pytest.approx(expected_m, rel=1e-15)
    expected = _hand_ema(r0["initial"], r0["online"], expected_m, list(r0["initial"]))
    for k, v in expected.items():
        assert r0["ema"][k].dtype == torch.float64
        torch.testing.assert_close(r0["ema"][k], v, **TOL)
        assert not torch.allclose(r0["ema"][k], r0["online"][-1][k])
        assert not torch.allclose(r0["ema"][k], r0["initial"][k])


# -- device and mode ------------------------------------------------------------------------------------

# "meta": a device other than the CPU that every machine has; CUDA where there is one
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("wrap", ["plain", "dataparallel"])
@pytest.mark.parametrize("handle_buffers", ["copy", "update", "ema_train"])
@pytest.mark.parametrize("device", DEVICES)
def test_ema_model_on_online_device_and_in_expected_mode(device: str, handle_buffers: str, wrap: str) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).to(device)
    model.train()
    if handle_buffers == "ema_train":
        model.eval()  # the EMA's mode must not be copied from the online model's
    online: nn.Module = nn.DataParallel(model) if wrap == "dataparallel" else model
    handler = EMAHandler(online, momentum=0.1, handle_buffers=handle_buffers)

    expected_device = torch.device(device)
    for name, t in handler.ema_model.state_dict().items():
        assert t.device.type == expected_device.type, name
    assert all(not p.requires_grad for p in handler.ema_model.parameters())

    def check_mode() -> None:
        want_train = handle_buffers == "ema_train"
        assert [m.training for m in handler.ema_model.modules()] == [want_train] * len(
            list(handler.ema_model.modules())
        )
        # the online model's mode is left alone
        assert model.training is (handle_buffers != "ema_train")

    check_mode()
    if device == "meta":  # a model without values yet: its updates are refused (tests/test_review_contract.py)
        with pytest.raises(RuntimeError, match="is on the meta device"):
            handler.ema.update()
        check_mode()
        return
    handler.ema.update()
    handler.ema.update()
    check_mode()
    assert handler.ema.num_updates == 2
