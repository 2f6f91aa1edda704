"""docs/switching/ema-pytorch.md: its before (ema-pytorch's EMA) and after (polyak) programs give the same EMA, each
row of its table is checked against ema-pytorch's real code, the numbers it quotes where ema-pytorch is not right
are measured, and polyak.convert loads ema-pytorch's and torch-ema's states so that training continues as with the
other library."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import polyak.convert
from _docs import DOCS, named, run_block
from _switching import small_model as _model
from _switching import train_on_random as _train
from polyak import EMA, schedules
from polyak.posthoc import PostHocEMA, synthesize

ema_pytorch = pytest.importorskip("ema_pytorch")
torch_ema = pytest.importorskip("torch_ema")

PAGE = DOCS / "switching" / "ema-pytorch.md"
COUNT = "1.num_batches_tracked"


def _assert_close(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> float:
    """Equal to float32 rounding (ema-pytorch computes its decay in float32); returns the largest difference."""
    assert list(theirs) == list(ours)
    largest = 0.0
    for k in ours:
        if k in skip:
            continue
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
        if ours[k].is_floating_point():
            largest = max(largest, (ours[k].double() - theirs[k].double()).abs().max().item())
    return largest


def test_before_and_after_blocks_agree_to_float32_rounding(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = run_block(named(PAGE, "before"))["averaged"].state_dict()
    after = run_block(named(PAGE, "after"))["averaged"].state_dict()
    largest = _assert_close(before, after, skip=(COUNT,))
    assert largest <= 1.2e-7
    # ema-pytorch never updates integer buffers: its BatchNorm's count is the one it copied at construction
    assert int(before[COUNT]) == 0 and int(after[COUNT]) == 200


# (ema-pytorch's arguments, how often the polyak loop updates, polyak's arguments): the rows of the page's table
CASES = {
    "warm-up": (
        dict(beta=0.99, update_after_step=0, update_every=1, inv_gamma=2.0, power=0.75),
        1,
        dict(schedule=schedules.inverse_gamma(gamma=2.0, power=0.75, max_decay=0.99)),
    ),
    "update_after_step": (
        dict(beta=0.99, update_after_step=6, update_every=1),
        1,
        dict(schedule=schedules.inverse_gamma(max_decay=0.99), copy_first=6),
    ),
    "min_value": (
        dict(beta=0.99, update_after_step=3, update_every=1, min_value=0.5),
        1,
        dict(schedule=schedules.inverse_gamma(max_decay=0.99, min_decay=0.5), copy_first=3),
    ),
    "constant beta": (
        dict(beta=0.95, update_after_step=3, update_every=1, min_value=0.95),
        1,
        dict(momentum=1 - 0.95, copy_first=4),
    ),
    "update_every": (
        dict(beta=0.99, update_after_step=6, update_every=3),
        3,
        dict(schedule=schedules.inverse_gamma(gamma=1 / 3, max_decay=0.99), copy_first=2),
    ),
    "defaults": (dict(beta=0.99), 10, dict(schedule=schedules.inverse_gamma(gamma=0.1, max_decay=0.99), copy_first=10)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_table_rows_match_ema_pytorch(case):
    theirs_kwargs, every, ours_kwargs = CASES[case]
    model = _model()
    theirs = ema_pytorch.EMA(model, **theirs_kwargs)
    steps = 150 if case == "defaults" else 60  # the defaults copy for 100 steps
    _train(model, steps, lambda step: theirs.update())
    model = _model()
    ours = EMA(model, handle_buffers="update", **ours_kwargs)
    _train(model, steps, lambda step: ours.update() if (step - 1) % every == 0 else None)
    _assert_close(theirs.ema_model.state_dict(), ours.ema_model.state_dict(), skip=(COUNT,))


def test_methods():
    model = _model()
    theirs, ours = ema_pytorch.EMA(model, beta=0.9, update_every=1), EMA(model, momentum=0.1, copy_first=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with theirs.add_to_optimizer_post_step_hook(optimizer), ours.hook(optimizer):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    assert int(theirs.step) == ours.num_updates == 1
    theirs.eval()
    x = torch.randn(4, 8)
    assert torch.equal(theirs(x), ours(x))
    target = _model()
    ours.copy_to(target)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), theirs.ema_model.parameters(), strict=True))


def test_call_in_train_mode_moves_the_ema_statistics():
    model = _model()
    theirs, ours = ema_pytorch.EMA(model, update_every=1), EMA(model, handle_buffers="update")
    assert theirs.ema_model.training and not ours.ema_model.training
    before = theirs.ema_model[1].running_mean.clone()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3)) * 3
    theirs(x)
    ours(x)
    moved = (theirs.ema_model[1].running_mean - before).abs().max().item()
    assert moved == pytest.approx(0.104, abs=0.001), moved  # the page: "by up to 0.10"
    assert torch.equal(ours.ema_model[1].running_mean, model[1].running_mean)


def test_bfloat16_decay_0_9999():
    n, decay = 2000, 0.9999
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    theirs = ema_pytorch.EMA(model, beta=decay, min_value=decay, update_after_step=0, update_every=1)
    ours = EMA(model, momentum=1 - decay, copy_first=1)
    start = {k: p.detach().float().clone() for k, p in model.named_parameters()}
    reference: dict[str, torch.Tensor] = {}
    for k in range(1, n + 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(start[name] + 0.5 + k / n)
                reference[name] = p.double().clone() if k == 1 else reference[name].lerp_(p.double(), 1 - decay)
        theirs.update()
        ours.update()

    def error(state: dict[str, torch.Tensor]) -> float:
        return max((state[k].double() - reference[k]).abs().max().item() for k in reference)

    first = {k: (start[k] + 0.5 + 1 / n).to(torch.bfloat16) for k in reference}
    moved, theirs_error = error(first), error(theirs.ema_model.state_dict())
    ours_error, master_error = error(ours.ema_model.state_dict()), error(ours.state_dict()["master"])
    shown = f"moved {moved:.3g}, ema-pytorch {theirs_error:.3g}, polyak {ours_error:.3g}, master {master_error:.3g}"
    assert 0.09 < moved < 0.1, shown
    assert all(torch.equal(theirs.ema_model.state_dict()[k], first[k]) for k in first), shown  # it never moved
    assert ours_error <= 2**-8 and master_error < 1e-5, shown
    print(shown)


# -- PostHocEMA ---------------------------------------------------------------------------------------------
def _curve(k: float) -> float:
    return math.sin(k / 50) + k / 1000  # EDM2's worked example in the design notes


def test_posthoc_tracked_ema_numbers():
    """KarrasEMA at sigma_rel 0.10 on the curve, k = 1..1000; the power-function EMA at k = 1000 is 0.8630461481."""
    got = {}
    for every in (1, 100):
        model = nn.Linear(1, 1, bias=False)
        theirs = ema_pytorch.KarrasEMA(model, sigma_rel=0.10, update_every=every)
        ours = EMA(model, schedule=schedules.power_function(sigma_rel=0.10))
        for step in range(1, 1000 * every + 1):
            with torch.no_grad():
                model.weight.fill_(_curve(step / every))
            theirs.update()
            if step % every == 0:
                ours.update()
        got[every] = theirs.ema_model.weight.item(), ours.ema_model.weight.item()
    assert got[1][1] == pytest.approx(0.8630461481, abs=1e-6) and got[100][1] == got[1][1]
    assert got[1][0] == pytest.approx(0.8628, abs=1e-4)  # one update late
    assert got[100][0] == pytest.approx(0.1655, abs=1e-3)  # each update counted as one step


def test_posthoc_synthesis_numbers(tmp_path):
    """Synthesized at sigma_rel 0.15 from snapshots every 100 updates: EDM2's reconstruction is 0.7698320276."""
    got = {}
    for every in (1, 10):
        model = nn.Linear(1, 1, bias=False)
        theirs = ema_pytorch.PostHocEMA(
            model,
            sigma_rels=(0.05, 0.10),
            update_every=every,
            checkpoint_every_num_steps=100 * every,
            checkpoint_folder=tmp_path / f"theirs{every}",
        )
        ours = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=100, directory=tmp_path / f"ours{every}")
        for step in range(1, 1000 * every + 1):
            with torch.no_grad():
                model.weight.fill_(_curve(step / every))
            theirs.update()
            if step % every == 0:
                ours.update()
        synthesized = theirs.synthesize_ema_model(sigma_rel=0.15).ema_model.weight.item()
        got[every] = synthesized, synthesize(tmp_path / f"ours{every}", sigma_rel=0.15)["weight"].item()
    assert got[1][1] == pytest.approx(0.7698320276, abs=1e-6) and got[10][1] == got[1][1]
    assert got[1][0] == pytest.approx(0.76775, abs=1e-4)
    assert got[10][0] == pytest.approx(0.4645, abs=1e-3)


def test_posthoc_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = run_block(named(PAGE, "posthoc-before"))["averaged"]
    after = run_block(named(PAGE, "posthoc-after"))["averaged"]
    x = torch.ones(2, 8)
    with torch.no_grad():
        assert torch.allclose(before(x), after(x), rtol=0.05, atol=0.05)
    assert sorted(p.name for p in (tmp_path / "post-hoc-ema").iterdir())[0] == "ema-0.0500-0000000020.safetensors"


# -- polyak.convert: ema-pytorch's and torch-ema's states -----------------------------------------------------
@pytest.mark.parametrize("include_online_model", [True, False])
def test_convert_ema_pytorch_state_then_continue(include_online_model, tmp_path):
    model = _model()
    theirs = ema_pytorch.EMA(
        model, beta=0.99, update_after_step=4, update_every=1, include_online_model=include_online_model
    )
    _train(model, 30, lambda step: theirs.update())
    torch.save(theirs.state_dict(), tmp_path / "ema.pt")
    assert any(k.startswith("online_model.") for k in theirs.state_dict()) == include_online_model

    ours = EMA(copy.deepcopy(model), schedule=schedules.inverse_gamma(max_decay=0.99), copy_first=4)
    ours.handle_buffers = "update"
    source = polyak.convert.load_state_dict(ours, torch.load(tmp_path / "ema.pt", weights_only=True))
    assert source == "ema_pytorch" and ours.num_updates == 30
    _assert_close(theirs.ema_model.state_dict(), ours.ema_model.state_dict())

    _train(model, 20, lambda step: theirs.update(), seed=2)
    _train(ours.model, 20, lambda step: ours.update(), seed=2)
    _assert_close(theirs.ema_model.state_dict(), ours.ema_model.state_dict(), skip=(COUNT,))


def test_convert_karras_ema_state():
    model = _model()
    theirs = ema_pytorch.KarrasEMA(model, sigma_rel=0.10, update_every=1)
    _train(model, 10, lambda step: theirs.update())
    ours = EMA(model, schedule=schedules.power_function(sigma_rel=0.10))
    assert polyak.convert.load_state_dict(ours, theirs.state_dict()) == "ema_pytorch"
    assert ours.num_updates == 10
    _assert_close(theirs.ema_model.state_dict(), ours.ema_model.state_dict())


def test_convert_bf16_ema_pytorch_state_fills_the_masters():
    model = _model().to(torch.bfloat16)
    theirs = ema_pytorch.EMA(model, update_every=1)
    theirs.update()
    ours = EMA(model)
    polyak.convert.load_state_dict(ours, theirs.state_dict())
    state = theirs.ema_model.state_dict()
    masters = ours.state_dict()["master"]
    assert masters and all(m.dtype == torch.float32 and torch.equal(m, state[k].float()) for k, m in masters.items())


def test_convert_torch_ema_state_then_continue():
    model = _model()
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.99)
    _train(model, 30, lambda step: theirs.update())
    ours = EMA(copy.deepcopy(model), schedule=schedules.ratio_warmup(0.99))
    assert polyak.convert.load_state_dict(ours, theirs.state_dict()) == "torch_ema"
    assert ours.num_updates == 30

    def params_equal() -> None:
        for shadow, ema_p in zip(theirs.shadow_params, ours.ema_model.parameters(), strict=True):
            torch.testing.assert_close(ema_p, shadow, rtol=1e-6, atol=1e-7)  # torch-ema's arithmetic is not lerp's

    params_equal()
    _train(model, 20, lambda step: theirs.update(), seed=2)
    _train(ours.model, 20, lambda step: ours.update(), seed=2)
    params_equal()


def test_convert_torch_ema_of_some_parameters():
    model = _model()
    last = list(model[3].parameters())
    theirs = torch_ema.ExponentialMovingAverage(last, decay=0.9)
    with torch.no_grad():
        for p in last:
            p.add_(1.0)
    theirs.update(last)
    ours = EMA(model, momentum=0.1)
    kept = {k: v.clone() for k, v in ours.ema_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"has 2 shadow_params, but the EMA model has 6 parameters.*pass names="):
        polyak.convert.load_state_dict(ours, theirs.state_dict())
    with pytest.raises(ValueError, match=r"shadow_params\[0\] has shape \(1, 16\).*'0.weight'.*\(16, 8\)"):
        polyak.convert.load_state_dict(ours, theirs.state_dict(), names=["0.weight", "0.bias"])
    polyak.convert.load_state_dict(ours, theirs.state_dict(), names=["3.weight", "3.bias"])
    state = ours.ema_model.state_dict()
    assert torch.equal(state["3.weight"], theirs.shadow_params[0]) and ours.num_updates == 1
    assert all(torch.equal(state[k], kept[k]) for k in kept if not k.startswith("3."))


def _no_count(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "num_updates": None}


def test_convert_torch_ema_without_a_count_needs_one():
    model = _model()
    state = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9, use_num_updates=False).state_dict()
    ours = EMA(model, momentum=0.1)
    with pytest.raises(ValueError, match="pass num_updates=.*use_num_updates=False"):
        polyak.convert.load_state_dict(ours, state)
    assert polyak.convert.load_state_dict(ours, _no_count(state), num_updates=7) == "torch_ema"
    assert ours.num_updates == 7


def test_names_no_ema_is_exclude():
    model = _model()
    theirs = ema_pytorch.EMA(
        model, beta=0.9, update_after_step=0, update_every=1, param_or_buffer_names_no_ema={"3.bias"}
    )
    ours = EMA(model, schedule=schedules.inverse_gamma(max_decay=0.9), exclude="3.bias", handle_buffers="update")
    _train(model, 20, lambda step: (theirs.update(), ours.update()))
    _assert_close(theirs.ema_model.state_dict(), ours.ema_model.state_dict(), skip=(COUNT,))


def test_detect_source_and_polyak_states_pass_through():
    model = _model()
    ours = EMA(model, momentum=0.1)
    ours.update()
    assert polyak.convert.detect_source(ours.state_dict()) == "polyak"
    assert polyak.convert.detect_source(ema_pytorch.EMA(model).state_dict()) == "ema_pytorch"
    assert polyak.convert.detect_source(torch_ema.ExponentialMovingAverage(model.parameters(), 0.9).state_dict()) == (
        "torch_ema"
    )
    assert polyak.convert.detect_source(model.state_dict()) == "model"
    other = EMA(model, momentum=0.1)
    assert polyak.convert.load_state_dict(other, ours.state_dict()) == "polyak"
    assert other.num_updates == 1
    assert polyak.convert.load_state_dict(other, model.state_dict(), num_updates=5) == "model"
    assert other.num_updates == 5
