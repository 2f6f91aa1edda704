"""An adversarial review of ``copy_first``, ``EMA.__call__``, the delayed schedule and :mod:`polyak.convert`: each
test is an input a user gives next that polyak followed wrongly or refused wrongly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ignite.handlers.state_param_scheduler import LambdaStateScheduler
from torch import nn

from polyak import EMA, EMAHandler
from polyak.convert import load_state_dict
from polyak.schedules import constant, delayed


def _make_schedule():
    def schedule(k: int) -> float:  # a fresh function object: what a new process builds from the same code
        return 0.1

    return schedule


def test_calling_the_ema_inside_swapped_is_refused_not_the_online_models_output() -> None:
    # inside swapped() the EMA model holds the online weights: ema(x) silently returned the online model's output
    model = nn.Linear(3, 2)
    ema = EMA(model, momentum=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    x = torch.randn(4, 3)
    average = ema(x)
    with ema.swapped(), pytest.raises(RuntimeError, match=r"ema\(\.\.\.\) inside ema.swapped\(\)"):
        ema(x)
    assert torch.equal(ema(x), average)  # outside it runs the EMA model, as before


def test_a_delayed_function_schedule_resumes_through_ignites_lambda_state_scheduler() -> None:
    # _Delayed.state_dict saved repr(function), with its address: the same code in a new process was refused
    def build() -> LambdaStateScheduler:
        handler = EMAHandler(nn.Linear(2, 2), schedule=_make_schedule(), copy_first=2)
        return LambdaStateScheduler(handler._momentum_lambda_obj, param_name="ema_momentum")

    saved = build()
    saved.event_index = 5
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = build()
    resumed.load_state_dict(state)
    assert resumed.event_index == 5 and resumed.get_param() == 0.1
    # still a check: another delay, or another schedule, is refused
    with pytest.raises(ValueError, match="another schedule"):
        delayed(_make_schedule(), 3).load_state_dict(delayed(_make_schedule(), 2).state_dict())
    with pytest.raises(ValueError, match="another schedule"):
        delayed(constant(0.2), 2).load_state_dict(delayed(_make_schedule(), 2).state_dict())


@pytest.mark.parametrize("count", [np.int64(4), np.int32(4), torch.tensor(4)])
def test_convert_takes_a_numpy_or_tensor_int_count(count: object) -> None:
    # num_updates=np.int64(4) was refused as "must be an int >= 0, got np.int64(4)" (copy_first, steps= take it)
    model = nn.Linear(2, 1)
    timm_like = {f"module.{k}": v + 1 for k, v in model.state_dict().items()}
    ema = EMA(model, momentum=0.1)
    assert load_state_dict(ema, timm_like, num_updates=count) == "timm"
    assert ema.num_updates == 4 and type(ema.num_updates) is int
    state = {"n_averaged": count, **timm_like}
    assert load_state_dict(ema, state) == "averaged_model" and ema.num_updates == 4
    for bad in (np.int64(-1), np.float64(4.5), np.bool_(True)):
        with pytest.raises(ValueError, match="num_updates must be an int >= 0"):
            load_state_dict(ema, timm_like, num_updates=bad)


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("scale", torch.ones(3))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(flat=True),
        dict(handle_buffers="update"),
        dict(dtype_model=torch.bfloat16),
        dict(dtype_model=torch.bfloat16, flat=True),
        dict(dtype_model=torch.bfloat16, master="split"),
        dict(dtype_model=torch.bfloat16, dtype=torch.bfloat16, stochastic_rounding=True),
        dict(device="cpu"),
    ],
    ids=["plain", "flat", "update_buffers", "bf16", "bf16_flat", "bf16_split", "bf16_stochastic", "device"],
)
def test_the_copying_updates_copy_even_over_an_ema_that_holds_nan_or_inf(options: dict) -> None:
    # The EMA built before the weights were loaded (a model from torch.empty / to_empty(), whose garbage may hold
    # NaN or Inf): copy_first=1 is meant to take the loaded weights. lerp with weight 1 computes
    # online - (online - ema) * 0: NaN wherever the EMA held NaN or Inf, for good.
    options = dict(options)
    dtype = options.pop("dtype_model", torch.float32)
    torch.manual_seed(0)
    model = _WithBuffer().to(dtype)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # the garbage the EMA copies at construction
        for i, t in enumerate(model.state_dict().values()):
            t.fill_((float("nan"), float("inf"), -float("inf"))[i % 3])
    ema = EMA(model, momentum=0.1, copy_first=1, **options)
    model.load_state_dict(trained)  # in place: the weights the run starts from
    assert ema.update() == 1.0
    for name, value in ema.ema_model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    for name, value in ema.state_dict().get("master", {}).items():
        assert torch.equal(value, trained[name].float()), name
    ema.update()
    assert all(bool(torch.isfinite(v).all()) for v in ema.ema_model.state_dict().values())


def test_the_fast_path_copies_over_nan_too_and_so_does_an_explicit_momentum_1() -> None:
    model = nn.Linear(3, 2)  # one float32 group, no buffers: the update's fast path
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.fill_(float("nan"))
        model.bias.fill_(float("inf"))
    ema = EMA(model, momentum=0.1, copy_first=1)
    assert ema._simple
    model.load_state_dict(trained)
    ema.update()
    assert all(torch.equal(v, trained[k]) for k, v in ema.ema_model.state_dict().items())
    with torch.no_grad():
        ema.ema_model.weight.fill_(float("nan"))
    ema.update(momentum=1.0)  # as EMAHandler passes the momentum_scheduler's 1.0 of a copying update
    assert all(torch.equal(v, trained[k]) for k, v in ema.ema_model.state_dict().items())


def test_an_averaged_ddp_model_is_refused_with_what_to_do() -> None:
    # AveragedModel(DistributedDataParallel(model)): 'module.module.<name>', which collides with nothing, but
    # the refusal listed only names; it now says where the extra 'module.' comes from
    from torch.optim.swa_utils import AveragedModel

    class Wrapped(nn.Module):  # the names DistributedDataParallel gives
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = nn.Linear(2, 1)
    averaged = AveragedModel(Wrapped(model))
    averaged.update_parameters(Wrapped(model))
    ema = EMA(model, momentum=0.1)
    with pytest.raises(ValueError, match=r"unexpected \['module.module.weight'.*DistributedDataParallel"):
        load_state_dict(ema, averaged.state_dict())
    assert ema.num_updates == 0
    # and a model whose own first submodule is 'module' loads it, with no advice needed
    wrapped_ema = EMA(Wrapped(nn.Linear(2, 1)), momentum=0.1)
    assert load_state_dict(wrapped_ema, averaged.state_dict()) == "averaged_model"
    assert torch.equal(wrapped_ema.ema_model.module.weight, averaged.module.module.weight)


def test_convert_inside_swapped_is_refused_under_its_own_name_and_changes_nothing() -> None:
    # the refusal named "state_dict()", which the user never called
    model = nn.Linear(2, 1)
    ema = EMA(model, momentum=0.1)
    state = {f"module.{k}": v + 1 for k, v in model.state_dict().items()}
    with ema.swapped(), pytest.raises(RuntimeError, match="polyak.convert inside ema.swapped"):
        load_state_dict(ema, state, num_updates=3)
    assert ema.num_updates == 0 and torch.equal(ema.ema_model.weight, model.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_post_hoc_profiles_copy_first_over_nan_too(tmp_path, dtype: torch.dtype) -> None:
    """PostHocEMA's profiles start with a copy (the power function's first momentum is 1); updated together
    (one staging for both, the bf16 path), that copy must not keep a NaN its EMAs were built with either."""
    from polyak.posthoc import PostHocEMA

    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)]).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # as after to_empty(), before the weights are loaded
    posthoc = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=100, directory=tmp_path)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(0.5 + i)
    posthoc.update()
    for ema in posthoc.emas:
        for p, q in zip(ema.ema_model.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("bad", ["integers for a weight", "floats for a counter"])
def test_convert_refuses_values_of_another_kind_and_changes_nothing(bad: str) -> None:
    """A float parameter given integer values (or an integer buffer given floats) is a state of something
    else: refused by name, not cast."""
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, momentum=0.1)
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state["n_averaged"] = torch.tensor(3)
    key = "module.0.weight" if bad == "integers for a weight" else "module.1.num_batches_tracked"
    state[key] = state[key].long() if bad == "integers for a weight" else state[key].double()
    before = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_state_dict(ema, state, source="averaged_model")
    assert all(torch.equal(v, before[k]) for k, v in ema.ema_model.state_dict().items())
    assert ema.num_updates == 0


class _Masked(nn.Module):
    """A causal attention mask of -inf as a buffer, beside a BatchNorm whose statistics are averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.norm(self.linear(x)).unsqueeze(1) + self.mask).softmax(-1).sum(1)


@pytest.mark.parametrize("flat", [False, True])
def test_a_mask_of_minus_inf_stays_a_mask_with_averaged_buffers(flat: bool) -> None:
    """handle_buffers='update' (the Lightning callback's default): -inf averaged with -inf is NaN; the mask
    is copied, the BatchNorm statistics are still averaged."""
    torch.manual_seed(0)
    model = _Masked()
    ema = EMA(model, momentum=0.5, handle_buffers="update", flat=flat)
    start = ema.ema_model.norm.running_mean.clone()
    model.train()
    model(torch.randn(8, 4))
    ema.update()
    assert torch.equal(ema.ema_model.mask, model.mask)
    torch.testing.assert_close(ema.ema_model.norm.running_mean, start.lerp(model.norm.running_mean, 0.5))
    assert torch.isfinite(ema(torch.randn(2, 4))).all()
