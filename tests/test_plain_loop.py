"""The plain-loop toolkit: swapped(), copy_to(), hook(), skip_nonfinite and device=."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from polyak import EMA, EMAHandler


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def moved(model: nn.Module, by: float = 1.0) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)
    return model


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("handle_buffers", ["copy", "update", "ema_train"])
def test_swapped_puts_ema_weights_in_the_online_model_and_back(handle_buffers):
    model = net()
    ema = EMA(model, momentum=0.5, handle_buffers=handle_buffers)
    moved(model)
    model.train()(torch.randn(8, 3))  # running stats move
    ema.update()
    online, average = snapshot(model), snapshot(ema.ema_model)
    x = torch.randn(5, 3)
    expected = ema.ema_model.eval()(x)
    with ema.swapped() as m:
        assert m is model
        assert_same(snapshot(model), average)
        assert torch.equal(model.eval()(x), expected)
    assert_same(snapshot(model), online)
    assert_same(snapshot(ema.ema_model), average)


def test_swapped_restores_when_the_block_raises():
    model = moved(net())
    ema = EMA(model, momentum=0.3)
    ema.update()
    online, average = snapshot(model), snapshot(ema.ema_model)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped():
        raise RuntimeError("boom")
    assert_same(snapshot(model), online)
    assert_same(snapshot(ema.ema_model), average)


def test_swapped_keeps_low_precision_master_intact():
    model = net().to(torch.bfloat16)
    ema = EMA(model, momentum=0.3)
    moved(model, 0.01)
    ema.update()
    master = {k: v.clone() for k, v in ema.state_dict()["master"].items()}
    with ema.swapped():
        pass
    ema.update()
    reference = EMA(net().to(torch.bfloat16), momentum=0.3)
    moved(reference.model, 0.01)
    reference.update()
    for k, v in reference.state_dict()["master"].items():
        assert torch.equal(v, master[k]), k


def test_handler_swapped():
    model = moved(net())
    handler = EMAHandler(model, momentum=0.5)
    handler.ema.update()
    average = snapshot(handler.ema_model)
    with handler.swapped():
        assert_same(snapshot(model), average)


def test_copy_to():
    model = moved(net())
    ema = EMA(model, momentum=0.25)
    ema.update()
    target = net()
    ema.copy_to(target)
    assert_same(snapshot(target), snapshot(ema.ema_model))
    with pytest.raises(TypeError, match="module must be an nn.Module, got dict"):
        ema.copy_to({})


def test_hook_updates_after_each_step_and_is_removable():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, momentum=0.5)
    handle = ema.hook(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        optimizer.step()
    assert ema.num_updates == 3
    handle.remove()
    optimizer.step()
    assert ema.num_updates == 3
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got Sequential"):
        ema.hook(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_skip_nonfinite_skips_counts_and_warns_once(dtype, bad):
    model = net().to(dtype)
    ema = EMA(model, momentum=0.5, skip_nonfinite=True)
    ema.update()
    before = snapshot(ema.ema_model)
    with torch.no_grad():
        model[2].weight[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="skipped EMA update 2"):
        assert ema.update() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ema.update() == 0.0  # warned once only
    assert ema.num_skipped == 2 and ema.num_updates == 1
    assert_same(snapshot(ema.ema_model), before)
    with torch.no_grad():
        model[2].weight[0, 0] = 0.0
    assert ema.update() == 0.5 and ema.num_updates == 2
    assert all(torch.isfinite(t).all() for t in ema.ema_model.state_dict().values())
    assert ema.state_dict()["num_skipped"] == 2


def test_without_skip_nonfinite_a_nan_poisons_the_ema():
    model = net()
    ema = EMA(model, momentum=0.5)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ema.update()
    assert torch.isnan(ema.ema_model[0].weight[0, 0])


def test_device_option_keeps_the_ema_there():
    model = moved(net())
    ema = EMA(model, momentum=0.5, device="cpu")
    assert all(t.device.type == "cpu" for t in ema.ema_model.state_dict().values())
    start = snapshot(ema.ema_model)
    moved(model)
    ema.update()
    torch.testing.assert_close(ema.ema_model[0].weight, 0.5 * start["0.weight"] + 0.5 * model[0].weight.detach())
    with pytest.raises(ValueError, match="device must name a torch device, got 'gpu:zero'"):
        EMA(model, device="gpu:zero")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_with_ema_on_cpu(dtype):
    model = net().to("cuda", dtype)
    ema = EMA(model, momentum=0.5, device="cpu")
    reference = EMA(net().to(dtype), momentum=0.5)
    for _ in range(3):
        moved(model, 0.125)
        moved(reference.model, 0.125)
        ema.update()
        reference.update()
    assert all(t.device.type == "cpu" for t in ema.ema_model.state_dict().values())
    for (name, a), b in zip(ema.ema_model.state_dict().items(), reference.ema_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with ema.swapped():
        assert model[0].weight.device.type == "cuda"
        assert torch.equal(model[0].weight.cpu(), reference.ema_model[0].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_matches_cpu():
    model = net().cuda()
    ema = EMA(model, momentum=0.25)
    cpu = EMA(net(), momentum=0.25)
    for _ in range(3):
        moved(model, 0.5)
        moved(cpu.model, 0.5)
        ema.update()
        cpu.update()
    for a, b in zip(ema.ema_model.state_dict().values(), cpu.ema_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.parametrize(
    ("dtype", "kwargs", "big"),
    [
        (torch.float16, {"dtype": torch.float16}, 60000.0),  # a list: its fp16 2-norm overflows
        (torch.float32, {"flat": True}, 3e38),  # a flat buffer: its float32 sum overflows
    ],
)
def test_skip_nonfinite_does_not_skip_large_finite_values(dtype, kwargs, big):
    model = nn.Linear(4, 4).to(dtype)
    with torch.no_grad():
        model.weight.fill_(big)
    ema = EMA(model, momentum=0.5, skip_nonfinite=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ema.update() == 0.5
    assert ema.num_skipped == 0
