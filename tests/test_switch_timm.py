"""docs/switching/timm.md: its before (timm's ModelEmaV3) and after (polyak) programs give the same EMA, each row of
its table is checked against timm's real code, the bfloat16 numbers it quotes are measured, and polyak.convert
loads timm's and AveragedModel's states so that training continues as with the other library."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import _timm
import polyak.convert
from _docs import DOCS, named, run_block
from _switching import small_model as _model
from _switching import train_on_random as _train
from polyak import EMA, schedules

ModelEmaV2, ModelEmaV3 = _timm.load().ModelEmaV2, _timm.load().ModelEmaV3  # timm's code, from its wheel

PAGE = DOCS / "switching" / "timm.md"


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k].double() - b[k].double()).abs().max().item())


def test_before_and_after_blocks_agree_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with _timm.installed():
        before = run_block(named(PAGE, "before"))["averaged"]
    after = run_block(named(PAGE, "after"))["averaged"]
    assert isinstance(before, nn.Sequential) and isinstance(after, nn.Sequential)
    _assert_equal(before.state_dict(), after.state_dict())
    assert not before.training and not after.training


def _warmup(**kw: Any) -> schedules.Schedule:
    return schedules.inverse_gamma(**kw)


_CLAMPED = _warmup(max_decay=0.99, min_decay=0.5)


# (timm's arguments, whether the loop passes step=, polyak's arguments): the rows of the page's table
CASES = {
    "constant, no step": (dict(decay=0.99), False, dict(momentum=1 - 0.99, handle_buffers="update")),
    "constant, step": (dict(decay=0.99), True, dict(momentum=1 - 0.99, copy_first=1, handle_buffers="update")),
    "update_after_step": (
        dict(decay=0.99, update_after_step=5),
        True,
        dict(momentum=1 - 0.99, copy_first=6, handle_buffers="update"),
    ),
    "exclude_buffers": (
        dict(decay=0.99, exclude_buffers=True),
        True,
        dict(momentum=1 - 0.99, copy_first=1, handle_buffers="copy"),
    ),
    "warm-up": (
        dict(decay=0.99, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75),
        True,
        dict(schedule=_warmup(gamma=2.0, power=0.75, max_decay=0.99), handle_buffers="update"),
    ),
    "warm-up after step": (
        dict(decay=0.99, use_warmup=True, update_after_step=4),
        True,
        dict(schedule=_warmup(max_decay=0.99), copy_first=4, handle_buffers="update"),
    ),
    # the first warm-up update copies, min_decay or not, in timm as in polyak
    "warm-up, min_decay": (
        dict(decay=0.99, use_warmup=True, update_after_step=2, min_decay=0.5),
        True,
        dict(schedule=_CLAMPED, copy_first=2, handle_buffers="update"),
    ),
    # without step=, timm's warm-up and update_after_step are silently off: a constant decay from the first update
    "warm-up without step": (
        dict(decay=0.99, use_warmup=True, update_after_step=3),
        False,
        dict(momentum=1 - 0.99, handle_buffers="update"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_table_rows_match_timm_bit_for_bit(case):
    timm_kwargs, with_step, polyak_kwargs = CASES[case]
    model = _model()
    timm_ema = ModelEmaV3(model, **timm_kwargs)
    _train(model, 40, lambda step: timm_ema.update(model, step=step) if with_step else timm_ema.update(model))
    model = _model()
    ema = EMA(model, **polyak_kwargs)
    _train(model, 40, lambda step: ema.update())
    _assert_equal(timm_ema.module.state_dict(), ema.ema_model.state_dict())


def test_call_and_set():
    model = _model()
    timm_ema, ema = ModelEmaV3(model, decay=0.9), EMA(model, momentum=0.1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    timm_ema.set(model)
    ema.update(momentum=1.0)
    x = torch.randn(4, 8)
    assert torch.equal(timm_ema(x), ema(x))
    assert timm_ema.get_decay(7) == 1 - EMA(model, momentum=0.1, copy_first=1).momentum_at(7)


# -- bfloat16: where timm's EMA is not right -----------------------------------------------------------------
def _bf16_run(n: int = 2000, decay: float = 0.9999) -> tuple[dict[str, tuple[float, float]], float]:
    """A bf16 layer drifting by 1/n per update; each EMA against a float64 EMA of the same weights.

    Returns each EMA's (largest, mean) absolute error over the layer's weights and bias, and how far the float64
    EMA moved from its first value (a copy of the model at update 1).
    """
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    emas: dict[str, Any] = {
        "timm V3 (stochastic rounding)": ModelEmaV3(model, decay=decay),
        "timm V3 stochastic_rounding=False": ModelEmaV3(model, decay=decay, stochastic_rounding=False),
        "timm V2": ModelEmaV2(model, decay=decay),
        "polyak": EMA(model, momentum=1 - decay, copy_first=1),
    }
    start = {k: p.detach().float().clone() for k, p in model.named_parameters()}
    reference: dict[str, torch.Tensor] = {}
    for k in range(1, n + 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(start[name] + 0.5 + k / n)
                if k == 1:
                    reference[name] = p.double().clone()
                reference[name].lerp_(p.double(), 1 - decay)
        emas["timm V3 (stochastic rounding)"].update(model, step=k)
        emas["timm V3 stochastic_rounding=False"].update(model, step=k)
        if k == 1:
            emas["timm V2"].set(model)
        else:
            emas["timm V2"].update(model)
        emas["polyak"].update()
    averaged = {name: e.module.state_dict() for name, e in emas.items() if name != "polyak"}
    averaged["polyak"] = emas["polyak"].ema_model.state_dict()
    averaged["polyak float32 master"] = emas["polyak"].state_dict()["master"]
    first = {name: (start[name] + 0.5 + 1 / n).to(torch.bfloat16).double() for name in reference}

    def error(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        diffs = torch.cat([(state[name].double() - reference[name]).abs().flatten() for name in reference])
        return diffs.max().item(), diffs.mean().item()

    return {name: error(state) for name, state in averaged.items()}, error(first)[0]


def test_bfloat16_decay_0_9999():
    errors, moved = _bf16_run()
    shown = "\n".join(f"{name:36s} largest {e[0]:.3g}  mean {e[1]:.3g}" for name, e in errors.items())
    shown += f"\nthe float64 EMA moved by up to {moved:.3g}"
    assert 0.09 < moved < 0.1, shown
    # polyak: its master is the float64 EMA to float32 precision; its bf16 model is the master rounded to bf16
    assert errors["polyak float32 master"][0] < 1e-5, shown
    assert errors["polyak"][0] <= 2**-8, shown  # half a bf16 unit at values in [1, 2)
    # timm keeps the EMA in bf16: rounded to nearest, it never moves; rounded stochastically, it is noisy
    for name in ("timm V3 stochastic_rounding=False", "timm V2"):
        assert errors[name][0] == pytest.approx(moved, rel=1e-3), shown
    assert errors["timm V3 (stochastic rounding)"][0] > 0.03, shown
    assert errors["timm V3 (stochastic rounding)"][1] > 10 * errors["polyak"][1], shown
    print(shown)


# -- polyak.convert: timm's and AveragedModel's states --------------------------------------------------------
@pytest.mark.parametrize("form", ["ModelEmaV3.state_dict()", "state_dict_ema"])
def test_convert_timm_state_then_continue(form, tmp_path):
    model = _model()
    timm_ema = ModelEmaV3(model, decay=0.95, update_after_step=2)
    _train(model, 30, lambda step: timm_ema.update(model, step=step))
    state = timm_ema.state_dict() if form == "ModelEmaV3.state_dict()" else timm_ema.module.state_dict()
    torch.save(state, tmp_path / "ema.pt")

    ema = EMA(copy.deepcopy(model), momentum=1 - 0.95, copy_first=3, handle_buffers="update")
    source = polyak.convert.load_state_dict(ema, torch.load(tmp_path / "ema.pt", weights_only=True), num_updates=30)
    assert source == ("timm" if form == "ModelEmaV3.state_dict()" else "model")
    assert ema.num_updates == 30
    _assert_equal(timm_ema.module.state_dict(), ema.ema_model.state_dict())

    _train(model, 20, lambda step: timm_ema.update(model, step=30 + step), seed=2)
    _train(ema.model, 20, lambda step: ema.update(), seed=2)
    _assert_equal(timm_ema.module.state_dict(), ema.ema_model.state_dict())


def test_convert_float32_timm_ema_of_a_bf16_model_keeps_every_bit():
    model = _model().to(torch.bfloat16)
    timm_ema = ModelEmaV3(model, decay=0.9, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.001)
    timm_ema.update(model, step=2)
    ema = EMA(copy.deepcopy(model), momentum=0.1, handle_buffers="update")
    polyak.convert.load_state_dict(ema, timm_ema.state_dict(), num_updates=2)
    masters = ema.state_dict()["master"]
    timm_state = timm_ema.module.state_dict()
    assert masters and all(torch.equal(m, timm_state[k]) for k, m in masters.items())
    for k, v in ema.ema_model.state_dict().items():  # the bf16 EMA model: the float32 average, rounded
        assert v.dtype == model.state_dict()[k].dtype
        assert torch.equal(v, timm_state[k].to(v.dtype))


def test_convert_averaged_model_then_continue():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _model()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=True)
    _train(model, 30, lambda step: averaged.update_parameters(model))
    ema = EMA(copy.deepcopy(model), momentum=1 - 0.95, copy_first=1, handle_buffers="update")
    assert polyak.convert.load_state_dict(ema, averaged.state_dict()) == "averaged_model"
    assert ema.num_updates == 30

    _train(model, 20, lambda step: averaged.update_parameters(model), seed=2)
    _train(ema.model, 20, lambda step: ema.update(), seed=2)
    theirs = {k[len("module.") :]: v for k, v in averaged.state_dict().items() if k.startswith("module.")}
    ours = ema.ema_model.state_dict()
    assert list(theirs) == list(ours)
    for k in ours:
        if ours[k].is_floating_point():  # equal to float32 rounding
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    # AveragedModel averages integer buffers too and truncates the result: its count stays where it was loaded
    assert int(theirs["1.num_batches_tracked"]) == 30 and int(ours["1.num_batches_tracked"]) == 50


def _snapshot(ema: EMA) -> dict[str, Any]:
    return copy.deepcopy(ema.state_dict())


@pytest.mark.parametrize(
    ("mutate", "kwargs", "message"),
    [
        (lambda s: s.pop("module.3.bias"), dict(num_updates=1), r"missing \['module.3.bias'\]"),
        (lambda s: s.update({"module.4.weight": torch.zeros(1)}), dict(num_updates=1), r"unexpected \['module.4"),
        (lambda s: s.update({"module.0.weight": torch.zeros(8, 16)}), dict(num_updates=1), r"'module.0.weight'.*16"),
        (lambda s: None, {}, "pass num_updates="),
        (lambda s: None, dict(num_updates=-1), "num_updates must be an int >= 0"),
        (lambda s: None, dict(source="keras"), "source must be"),
        (lambda s: None, dict(num_updates=1, names=["0.weight"]), "names is for torch-ema"),
    ],
)
def test_convert_refuses_what_does_not_fit_and_changes_nothing(mutate, kwargs, message):
    model = _model()
    state = ModelEmaV3(model).state_dict()
    mutate(state)
    ema = EMA(model, momentum=0.1)
    ema.update()
    before = _snapshot(ema)
    with pytest.raises(ValueError, match=message):
        polyak.convert.load_state_dict(ema, state, **kwargs)
    after = ema.state_dict()
    assert after["num_updates"] == before["num_updates"] == 1
    _assert_equal(before["ema_model"], after["ema_model"])
