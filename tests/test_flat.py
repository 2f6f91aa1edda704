"""Flat mode, and the promise of the update path: no allocation in steady state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from polyak import EMA, EMAHandler


def net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(16, 6, generator=g).to(next(model.parameters()).dtype)
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        ema.update()


@pytest.mark.parametrize("optimizer_first", [True, False])
@pytest.mark.parametrize("handle_buffers", ["copy", "update"])
def test_flat_equals_default_bit_for_bit(optimizer_first, handle_buffers):
    results = []
    for flat in (False, True):
        model = net()
        if optimizer_first:
            optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
            ema = EMA(model, momentum=0.1, flat=flat, handle_buffers=handle_buffers)
        else:
            ema = EMA(model, momentum=0.1, flat=flat, handle_buffers=handle_buffers)
            optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        train(model, optimizer, ema, 10)
        results.append((model.state_dict(), ema.ema_model.state_dict()))
    (online_a, ema_a), (online_b, ema_b) = results
    for k in online_a:
        assert torch.equal(online_a[k], online_b[k]), k  # training itself is unaffected by flattening
        assert torch.equal(ema_a[k], ema_b[k]), k


def test_flat_params_are_views_of_one_buffer_and_stay_the_same_objects():
    model = net()
    params_before = list(model.parameters())
    EMA(model, flat=True)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_state_dict_round_trip(dtype):
    model = net(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, momentum=0.2, flat=True)
    train(model, optimizer, ema, 3)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other = EMA(net(dtype), momentum=0.2, flat=True)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for (k, a), b in zip(ema.ema_model.state_dict().items(), other.ema_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    model.load_state_dict(other.model.state_dict())  # loading into a flat online model keeps it flat
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def test_flat_notices_load_state_dict_assign_and_reflattens():
    model = net()
    ema = EMA(model, momentum=0.5, flat=True)
    new = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    start = ema.ema_model[0].weight.clone()
    ema.update()
    torch.testing.assert_close(ema.ema_model[0].weight, 0.5 * start + 0.5 * new["0.weight"])
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


@pytest.mark.parametrize("flat", [True, False])
def test_assign_without_flat_is_followed_too(flat):
    model = net()
    ema = EMA(model, momentum=0.5, flat=flat)
    new = {k: v * 0 + 3 for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    ema.update()
    ema.update()
    ema.update()
    torch.testing.assert_close(ema.ema_model[3].bias, torch.full((3,), 3.0), atol=0.5, rtol=0)
    torch.testing.assert_close(ema.ema_model[1].running_mean, torch.full((8,), 3.0))


def test_flat_notices_data_reassignment_and_reflattens():
    model = net()
    ema = EMA(model, momentum=0.5, flat=True)
    with torch.no_grad():
        model[0].weight.data = torch.full_like(model[0].weight, 2.0)
    start = ema.ema_model[0].weight.clone()
    ema.update()
    torch.testing.assert_close(ema.ema_model[0].weight, 0.5 * start + 1.0)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the parameter is back in the flat buffer: later steps are seen
    ema.update()
    assert model[0].weight.untyped_storage().data_ptr() == model[3].bias.untyped_storage().data_ptr()


def test_flat_notices_a_submodule_moved_and_back():
    model = net()
    ema = EMA(model, momentum=0.5, flat=True)
    model[3].to(torch.float64).to(torch.float32)  # same dtype in the end, new storage
    with torch.no_grad():
        model[3].bias.fill_(4.0)
    start = ema.ema_model[3].bias.clone()
    ema.update()
    torch.testing.assert_close(ema.ema_model[3].bias, 0.5 * start + 2.0)
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def test_refresh_after_assigning_one_tensor_by_hand():
    model = net()
    ema = EMA(model, momentum=0.5, flat=True)
    with torch.no_grad():
        model[0].bias.data = torch.full_like(model[0].bias, 6.0)  # not the module's first tensor
    ema.refresh()
    start = ema.ema_model[0].bias.clone()
    ema.update()
    torch.testing.assert_close(ema.ema_model[0].bias, 0.5 * start + 3.0)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.double(), lambda m: m.to(torch.bfloat16)])
def test_online_dtype_conversion_after_construction_is_followed(flat, convert):
    """The EMA keeps its own dtype and reads the converted online values through a staging copy."""
    model = net()
    ema = EMA(model, momentum=0.5, flat=flat)
    start = {k: v.clone() for k, v in ema.ema_model.named_parameters()}
    convert(model)
    ema.update()
    online = dict(model.named_parameters())
    for name, t in ema.ema_model.named_parameters():
        assert t.dtype == torch.float32
        assert torch.equal(t, start[name].lerp(online[name].float(), 0.5)), name


def test_handler_flat_option():
    model = net()
    handler = EMAHandler(model, momentum=0.1, flat=True)
    assert handler.ema.flat
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def allocations(fn) -> list[tuple[str, int]]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"flat": True},
        {"handle_buffers": "update"},
        {"dtype": torch.bfloat16, "stochastic_rounding": True},
        {"schedule": lambda k: 1 / k},
        {"master": "split"},
        {"master": "split", "flat": True},
    ],
    ids=["default", "flat", "update", "stochastic", "schedule", "split", "split-flat"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_allocation_per_update(kwargs, dtype):
    model = net(dtype)
    ema = EMA(model, **kwargs)
    ema.update()
    assert allocations(ema.update) == []
    assert allocations(lambda: torch.ones(64) + 1) != []  # the probe does see allocations


class Tied(nn.Module):
    """An embedding and a head that share their weight (GPT-2's wte and lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mid, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("flat", [False, True])
def test_a_tied_weight_stays_tied_and_compact_in_the_state_dict(tmp_path, flat: bool) -> None:
    """With flat=True the EMA model's tensors are views of one buffer: its state dict holds a copy of each, with
    its own storage, and one copy for the names of a tied weight, so that safetensors' ``save_model`` accepts it
    (it refused the alias's view of the whole buffer) and ``torch.save`` writes the model once."""
    from safetensors.torch import load_model, save_model

    model = Tied()
    ema = EMA(model, momentum=0.5, flat=flat)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    state = ema.ema_model.state_dict()
    assert state["head.weight"].data_ptr() == state["emb.weight"].data_ptr()  # one tensor for both names
    for k, v in state.items():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
    save_model(ema.ema_model, str(tmp_path / "ema.safetensors"))
    loaded = Tied()
    load_model(loaded, str(tmp_path / "ema.safetensors"))
    assert loaded.head.weight is loaded.emb.weight
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    ours, plain = io.BytesIO(), io.BytesIO()
    torch.save(state, ours)
    torch.save(Tied().state_dict(), plain)
    assert abs(len(ours.getvalue()) - len(plain.getvalue())) <= 16  # the size of the plain model's: tied once
    # a state dict of a submodule alone: its own tensors, compact too
    head = ema.ema_model.head.state_dict()
    assert head["weight"].untyped_storage().nbytes() == 40 * 4
