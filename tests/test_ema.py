"""The EMA core: numbers against hand-computed EMAs, buffers, storage, state, and bad input."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import EMA
from polyak.schedules import linear_warmup, power_function


def small_net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).to(dtype)


def perturb(model: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.randn_like(b) * scale)
            else:
                b.add_(1)


def reference_update(ref: dict[str, torch.Tensor], model: nn.Module, m: float, average_buffers: bool) -> None:
    for name, t in model.state_dict().items():
        if name in dict(model.named_parameters()) or (average_buffers and t.is_floating_point()):
            ref[name] = (1 - m) * ref[name] + m * t
        else:
            ref[name] = t.clone()


@pytest.mark.parametrize("handle_buffers", ["copy", "update"])
def test_matches_hand_computed_ema(handle_buffers):
    model = small_net()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    schedule = linear_warmup(0.5, 0.05, 10)
    ema = EMA(model, schedule=schedule, handle_buffers=handle_buffers)
    for k in range(1, 31):
        perturb(model)
        m = ema.update()
        assert m == schedule(k)
        reference_update(ref, model, m, average_buffers=handle_buffers == "update")
    assert ema.num_updates == 30
    got = ema.ema_model.state_dict()
    for name, expected in ref.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-12, atol=1e-12, msg=name)


def test_ema_train_leaves_buffers_alone_and_trains():
    model = small_net()
    ema = EMA(model, momentum=0.5, handle_buffers="ema_train")
    before = {k: v.clone() for k, v in ema.ema_model.named_buffers()}
    assert ema.ema_model.training
    perturb(model)
    ema.update()
    for name, b in ema.ema_model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert not torch.equal(ema.ema_model[0].weight, model[0].weight)


@pytest.mark.parametrize("handle_buffers", ["copy", "update"])
def test_ema_model_in_eval_mode(handle_buffers):
    model = small_net().train()
    assert not EMA(model, handle_buffers=handle_buffers).ema_model.training


def test_copy_never_aliases_online_storage():
    model = small_net()
    ema = EMA(model, momentum=0.5, handle_buffers="copy")
    online_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    ema_ptrs = {t.untyped_storage().data_ptr() for t in ema.ema_model.state_dict().values()}
    assert not online_ptrs & ema_ptrs
    ema.update()
    mean_before = ema.ema_model[1].running_mean.clone()
    model[1].running_mean.add_(100.0)  # the online buffer changes; the EMA's only at the next update
    assert torch.equal(ema.ema_model[1].running_mean, mean_before)
    ema.update()
    assert torch.equal(ema.ema_model[1].running_mean, model[1].running_mean)
    assert ema.ema_model[1].num_batches_tracked.dtype == torch.int64


def test_integer_buffers_copied_not_averaged_in_update_mode():
    model = small_net()
    ema = EMA(model, momentum=0.5, handle_buffers="update")
    model[1].num_batches_tracked.fill_(7)
    ema.update()
    assert int(ema.ema_model[1].num_batches_tracked) == 7


def test_ema_tensors_are_separate_tensors_like_a_deep_copy():
    """The EMA model is an ordinary module: each tensor its own storage, as a deep copy has it."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).double(), nn.BatchNorm1d(4))
    ema = EMA(model)
    tensors = list(ema.ema_model.state_dict().values())
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    assert all(not p.requires_grad for p in ema.ema_model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    ema = EMA(model, momentum=0.5)
    assert ema.ema_model.head.weight is ema.ema_model.embed.weight
    with torch.no_grad():
        model.embed.weight.add_(2.0)
    ema.update()
    torch.testing.assert_close(ema.ema_model.head.weight, model.embed.weight - 1.0)


def test_ema_model_is_usable_and_detached():
    model = small_net(torch.float32)
    ema = EMA(model)
    x = torch.randn(4, 3)
    out = ema.ema_model(x)
    assert out.shape == (4, 2) and not out.requires_grad
    torch.testing.assert_close(out, model.eval()(x))


@settings(max_examples=25, deadline=None)
@given(
    value=st.floats(-1e6, 1e6, allow_nan=False),
    momenta=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20),
)
def test_ema_of_a_constant_is_the_constant(value, momenta):
    model = nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    it = iter(momenta)
    ema = EMA(model, schedule=lambda k: next(it))
    for _ in momenta:
        ema.update()
    for p in ema.ema_model.parameters():
        assert torch.all(p == torch.tensor(value, dtype=p.dtype))


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-6, 1e6))
def test_momentum_one_is_an_exact_copy(scale):
    model = nn.Linear(3, 2)
    ema = EMA(model, schedule=lambda k: 1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    assert ema.update() == 1.0
    for p, q in zip(ema.ema_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def _trajectory(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"weight": torch.randn(2, 3, generator=g), "bias": torch.randn(2, generator=g)} for _ in range(n)]


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 25), data=st.data())
def test_resume_equals_uninterrupted(n, data):
    k = data.draw(st.integers(0, n))
    trajectory = _trajectory(n)
    schedule = power_function(gamma=3.0)

    def run(model, ema, steps):
        for weights in steps:
            model.load_state_dict(weights)
            ema.update()

    model = nn.Linear(3, 2)
    full = EMA(model, schedule=schedule)
    run(model, full, trajectory)

    model = nn.Linear(3, 2)
    first = EMA(model, schedule=schedule)
    run(model, first, trajectory[:k])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    model2 = nn.Linear(3, 2)
    second = EMA(model2, schedule=schedule)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    run(model2, second, trajectory[k:])

    assert second.num_updates == full.num_updates == n
    for a, b in zip(full.ema_model.parameters(), second.ema_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_is_plain_and_loads_weights_only(tmp_path):
    ema = EMA(small_net(), momentum=0.1)
    ema.update()
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["num_updates"] == 1
    assert set(loaded["ema_model"]) == set(ema.ema_model.state_dict())


def test_load_state_dict_copies_into_the_same_tensors():
    ema = EMA(small_net(), momentum=0.1)
    ptr = ema.ema_model[0].weight.untyped_storage().data_ptr()
    sd = {"num_updates": 5, "ema_model": {k: v + 1 for k, v in ema.ema_model.state_dict().items()}}
    ema.load_state_dict(sd)
    assert ema.ema_model[0].weight.untyped_storage().data_ptr() == ptr
    assert ema.num_updates == 5
    torch.testing.assert_close(ema.ema_model[0].weight, sd["ema_model"]["0.weight"])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda sd: sd.pop("num_updates"), "state_dict lacks"),
        (lambda sd: sd.update(num_updates=-1), "num_updates'] must be an int >= 0, got -1"),
        (lambda sd: sd.update(num_updates=1.5), "must be an int >= 0, got 1.5"),
        (lambda sd: sd["ema_model"].pop("0.bias"), r"missing \['0.bias'\]"),
        (lambda sd: sd["ema_model"].update({"extra": torch.zeros(1)}), r"unexpected \['extra'\]"),
        (lambda sd: sd["ema_model"].update({"0.bias": torch.zeros(7)}), r"shape \(5,\), got \(7,\)"),
    ],
)
def test_bad_state_dict_is_refused_and_changes_nothing(mutate, match):
    ema = EMA(small_net(), momentum=0.1)
    ema.update()
    before = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    sd = {"num_updates": 3, "ema_model": {k: v + 1 for k, v in ema.ema_model.state_dict().items()}}
    mutate(sd)
    with pytest.raises(ValueError, match=match):
        ema.load_state_dict(sd)
    assert ema.num_updates == 1
    for k, v in ema.ema_model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a model"}, TypeError, "model must be an nn.Module, got str"),
        ({"momentum": 0.0}, ValueError, r"momentum must be in \(0, 1\), got 0.0"),
        ({"momentum": 1.0}, ValueError, r"momentum must be in \(0, 1\), got 1.0"),
        ({"momentum": float("inf")}, ValueError, "momentum must be finite, got inf"),
        ({"momentum": "0.1"}, TypeError, "momentum must be a real number, got '0.1'"),
        ({"schedule": 0.1}, TypeError, "schedule must be a callable"),
        ({"schedule": lambda k: 0.1, "momentum": 0.5}, ValueError, "either momentum or schedule"),
        ({"handle_buffers": "average"}, ValueError, "handle_buffers must be one of 'copy', 'update'"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    kwargs.setdefault("model", nn.Linear(2, 1))
    with pytest.raises(error, match=match):
        EMA(**kwargs)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_schedule_out_of_range_is_refused_before_touching_the_ema(bad):
    model = nn.Linear(2, 1)
    ema = EMA(model, schedule=lambda k: bad)
    before = [p.clone() for p in ema.ema_model.parameters()]
    with pytest.raises(ValueError, match="schedule must return a momentum in"):
        ema.update()
    assert ema.num_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, ema.ema_model.parameters(), strict=True))


def test_dataparallel_ema_is_dataparallel_and_tracks_the_module():
    model = small_net()
    dp = nn.DataParallel(model)
    ema = EMA(dp, momentum=0.5)
    assert ema.model is dp
    assert isinstance(ema.ema_model, nn.DataParallel)
    start = model[0].weight.detach().clone()
    perturb(model)
    ema.update()
    torch.testing.assert_close(ema.ema_model.module[0].weight, 0.5 * start + 0.5 * model[0].weight.detach())
