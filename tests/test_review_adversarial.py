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
