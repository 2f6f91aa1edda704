"""Defects the contract suite (test_core.py) found, each as a minimal standalone test.

They fail until the core is fixed; /tmp/contract_findings.md (during the work) and the report say what is
expected and why. The second half holds issue 17's list of known defects as regression tests.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from polyak import EMA


# -- found by the state machine -----------------------------------------------------------------------------------
def test_flat_follows_a_transposed_view_of_the_same_storage() -> None:
    """lifecycle.md: ``param.data = ...`` is followed where dtype and device stay, in flat mode too."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = EMA(model, momentum=0.5, flat=True)
    w = model[0].weight
    w.data = w.data.t()  # same shape, dtype, device and storage; other strides: the values are W.T now
    expected = ema.ema_model[0].weight.detach().clone().lerp(w.detach(), 0.5)
    ema.update()
    assert torch.allclose(ema.ema_model[0].weight, expected)


def test_flat_follows_a_data_assignment_while_the_old_storage_is_held() -> None:
    """The same ``.data`` assignment the flat buffer notices when nothing else holds the old view (its use count
    drops), missed when user code still holds it (a closure, an optimizer's reference, a saved ``p.data``)."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    ema = EMA(model, momentum=0.5, flat=True)
    old = model[0].bias.data  # noqa: F841  (held)
    model[0].bias.data = model[0].bias.data.clone() + 4.0
    expected = ema.ema_model[0].bias.detach().clone().lerp(model[0].bias.detach(), 0.5)
    ema.update()
    assert torch.allclose(ema.ema_model[0].bias, expected)  # the EMA read the old storage: 2.0 off


def test_a_parameter_not_averaged_follows_a_data_assignment() -> None:
    """A parameter left out of the average is shared: the EMA model "always shows the model's current values".
    After ``p.data = ...`` (same dtype and device: followed, lifecycle.md) it shows the old data until refresh()."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    ema = EMA(model, momentum=0.5, exclude="1.*")
    model[1].bias.data = model[1].bias.data + 1.0
    ema.update()
    assert torch.equal(ema.ema_model[1].bias, model[1].bias)


def test_an_ema_loads_its_own_state_after_a_frozen_parameter_was_replaced() -> None:
    """``ema.load_state_dict(ema.state_dict())`` must work in any state the EMA accepts for updates; after a frozen
    (shared) parameter's ``.data`` was replaced, it is refused: "cannot load '1.bias' into the EMA model"."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[1].requires_grad_(False)
    ema = EMA(model, momentum=0.5, trainable_only=True)
    model[1].bias.data = model[1].bias.data + 1.0
    ema.update()
    ema.load_state_dict(ema.state_dict())


def test_ema_built_on_meta_before_to_empty_follows_or_refuses() -> None:
    """Deferred initialisation: nothing is documented, but "follow or refuse, never go stale" (device='meta' is
    refused already: "an EMA on the meta device would average nothing"). Today the EMA stays on meta silently."""
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    try:
        ema = EMA(model, momentum=0.5, copy_first=1)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.weight.normal_()
            model.bias.normal_()
        ema.update()
    except (ValueError, TypeError, RuntimeError) as e:
        assert "meta" in str(e)
        return
    assert ema.ema_model.weight.device == model.weight.device
    assert torch.equal(ema.ema_model.weight, model.weight)


# -- issue 17's known defects (regression tests) --------------------------------------------------------------------
@pytest.mark.parametrize("flat", [False, True])
def test_split_master_momentum_one_after_averaging_copies(flat: bool) -> None:
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, momentum=0.5, master="split", flat=flat)
    with torch.no_grad():
        model.weight.add_(0.3)
    ema.update()
    ema.update(momentum=1.0)
    assert torch.equal(ema.ema_model.weight, model.weight)
    assert torch.equal(ema.state_dict()["master"]["weight"], model.weight.float())


def test_skip_nonfinite_with_an_attention_mask_of_minus_inf_still_averages() -> None:
    model = nn.Linear(4, 4)
    model.register_buffer("mask", torch.full((4,), float("-inf")))
    ema = EMA(model, momentum=0.5, skip_nonfinite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [ema.update() for _ in range(3)] == [0.5] * 3
    assert ema.num_skipped == 0 and ema.num_updates == 3


def test_trainable_only_load_into_ema_model_leaves_the_frozen_online_weights_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].requires_grad_(False)
    ema = EMA(model, momentum=0.5, trainable_only=True)
    before = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="0.weight"):  # refused; or loaded without touching the model
        ema.ema_model.load_state_dict({k: v + 1 for k, v in ema.ema_model.state_dict().items()})
    assert torch.equal(model[0].weight, before)


def test_a_refused_load_state_dict_changes_nothing() -> None:
    model = nn.Linear(3, 3)
    ema = EMA(model, momentum=0.5)
    state = ema.state_dict()
    bad = {**state, "ema_model": {k: v + 1 for k, v in state["ema_model"].items()}, "num_updates": -1}
    before = ema.ema_model.weight.detach().clone()
    with pytest.raises(ValueError, match="num_updates"):
        ema.load_state_dict(bad)
    assert torch.equal(ema.ema_model.weight, before) and ema.num_updates == 0


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.complex32], ids=["float8", "complex32"])
def test_parameters_torch_cannot_average_are_refused_up_front(dtype: torch.dtype) -> None:
    model = nn.Linear(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ComplexHalf is experimental
        model.extra = nn.Parameter(torch.zeros(3, dtype=dtype), requires_grad=False)
    try:
        ema = EMA(model, momentum=0.5)
    except TypeError as e:
        assert "extra" in str(e)
        return
    before = ema.ema_model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises((TypeError, RuntimeError), match="extra"):
        ema.update()
    assert torch.equal(ema.ema_model.weight, before) and ema.num_updates == 0


def test_a_data_dtype_change_is_followed_or_refused_before_anything_is_written() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    ema = EMA(model, momentum=0.5)
    before = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].bias.add_(1.0)
    model[1].bias.data = model[1].bias.data.double()
    try:
        ema.update()
    except (TypeError, RuntimeError) as e:
        assert "1.bias" in str(e)
        for k, v in ema.ema_model.state_dict().items():
            assert torch.equal(v, before[k]), k
        return
    expected = before["1.bias"].lerp(model[1].bias.detach().float(), 0.5)
    assert torch.allclose(ema.ema_model[1].bias, expected)


def test_flat_with_a_torchscript_submodule() -> None:
    model = nn.Sequential(torch.jit.script(nn.Linear(3, 3)), nn.ReLU(), nn.Linear(3, 3))
    ema = EMA(model, momentum=0.5, flat=True)
    start = ema.ema_model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.ema_model[0].weight, start + 0.5)


def test_copy_to_a_compiled_model() -> None:
    model = nn.Linear(3, 3)
    ema = EMA(model, momentum=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    target = torch.compile(nn.Linear(3, 3))
    ema.copy_to(target)
    assert torch.equal(target._orig_mod.weight, ema.ema_model.weight)


@pytest.mark.parametrize("value", [None, "0.1", True])
def test_a_schedule_returning_a_non_number_is_refused(value: object) -> None:
    ema = EMA(nn.Linear(2, 2), schedule=lambda k: value)
    with pytest.raises(TypeError, match="schedule"):
        ema.update()
    assert ema.num_updates == 0


def test_a_checkpoint_round_trip_through_torch_save_is_exact() -> None:
    """(A sanity anchor for the found tests above: what works.)"""
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, momentum=0.3, master="split")
    with torch.no_grad():
        model.weight.add_(0.1)
    ema.update()
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    fresh = EMA(model, momentum=0.3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.state_dict()["master"]["weight"], ema.state_dict()["master"]["weight"])


def test_a_resumed_ema_model_shows_the_loaded_master_and_keeps_it_through_a_conversion() -> None:
    """A checkpoint of an fp16 model's EMA resumed by an EMA of the same model now in bf16: the masters load
    exactly, but the EMA model holds the saved fp16 values rounded again (not the master rounded), and a
    conversion before the next update (``ema_model.double()``, lifecycle.md: "the master keeps its precision")
    takes those doubly rounded values as the average: the master's precision is lost (1e-3 here)."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64).half()
    ema = EMA(model, momentum=0.3)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 0.1)
        ema.update()
    state = ema.state_dict()
    model.bfloat16()
    fresh = EMA(model, momentum=0.3)
    fresh.load_state_dict(state)
    master = fresh.state_dict()["master"]["weight"].clone()
    assert torch.equal(master, state["master"]["weight"])
    assert torch.equal(fresh.ema_model.weight, master.bfloat16())
    fresh.ema_model.double()
    fresh.update(momentum=0.0)
    assert torch.equal(fresh.ema_model.weight, master.double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16-model", "float32-model"])
def test_stochastic_rounding_keeps_a_nan(dtype: torch.dtype) -> None:
    """Stochastic rounding adds random low bits to the float32 result and masks them off: a NaN whose bits lie
    within 0xFFFF of the top (every NaN of an fp16 model, staged to float32; a float32 NaN with a full payload)
    carries into the sign bit and comes out as -0.0: the NaN is silently gone (split_float32 canonicalises NaNs
    for this very reason; the stochastic path does not)."""
    model = nn.Linear(4, 3).to(dtype)
    ema = EMA(model, momentum=0.5, dtype=torch.bfloat16, stochastic_rounding=True)
    with torch.no_grad():
        if dtype == torch.float32:
            model.bias.view(torch.int32)[1] = 0x7FFFFFFF  # a NaN
        else:
            model.bias[1] = float("nan")
    assert model.bias[1].isnan()
    ema.update()
    assert ema.ema_model.bias[1].isnan(), ema.ema_model.bias[1].item()


@pytest.mark.parametrize(
    "kwargs",
    [{"device": "cpu"}, {"dtype": torch.bfloat16, "stochastic_rounding": True}],
    ids=["device-cpu", "stochastic-rounding"],
)
def test_an_ema_built_before_to_empty_in_any_mode(kwargs: dict) -> None:
    """lifecycle.md: an EMA built on a ``meta`` model before ``to_empty()`` refuses updates until the model has
    values (naming the tensor), then starts from them. With ``device="cpu"`` the constructor fails instead
    ("could not deep-copy ... pass it as ema_model="), with stochastic rounding too ("META device type not an
    accelerator": the generator is made on meta)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    ema = EMA(model, momentum=0.5, **kwargs)
    with pytest.raises(RuntimeError, match=r"0\.weight|0\.bias|1\.weight"):
        ema.update()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape) if t.is_floating_point() else torch.zeros(t.shape))
    ema.update()
    for k, v in ema.ema_model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("kwargs", [{}, {"master": "split"}, {"flat": True}], ids=["float32", "split", "flat"])
def test_a_nan_in_one_element_does_not_drop_the_master_of_the_tensor_at_a_re_pairing(kwargs: dict) -> None:
    """A re-pairing (refresh(), ema_model.float(), a .data dtype change of any tensor) keeps each master "whose EMA
    values are unchanged", decided by torch.equal(round(master), ema_model's tensor): False wherever the tensor
    holds a NaN, so one NaN element drops the float32 master of the whole tensor, and every finite element falls
    back to its bf16 value (1e-3 here)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4).bfloat16()
    ema = EMA(model, momentum=0.3, **kwargs)
    with torch.no_grad():
        model.weight.add_(torch.randn(4, 4).bfloat16() * 0.1)
        model.weight[0, 0] = float("nan")
    ema.update()
    master = ema.state_dict()["master"]["weight"].clone()
    ema.refresh()
    after = ema.state_dict()["master"]["weight"]
    finite = ~master.isnan()
    assert torch.equal(after[finite], master[finite])


@pytest.mark.parametrize(
    "kwargs", [{}, {"flat": True}, {"flat": True, "compile": True}], ids=["eager", "flat", "compile"]
)
def test_split_master_takes_a_write_into_the_ema_model_after_a_widening_conversion(kwargs: dict) -> None:
    """lifecycle.md: an in-place write into the EMA model's tensors is the average. With master="split", after
    ema_model.double() (the EMA model then holds the high halves) a write before the next update is joined with the
    old low halves (they still "round" to the written values where those are bf16 numbers): the average is off by
    the old low half (2e-4 here). The float32 master takes the write exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (compile: inductor's notes)
        ema = EMA(model, momentum=0.3, master="split", **kwargs)
        with torch.no_grad():
            model[0].bias.add_(0.001)
        ema.update()
        ema.ema_model.double()
        with torch.no_grad():
            ema.ema_model[0].bias.mul_(0.5)
        written = ema.ema_model[0].bias.detach().clone()
        ema.update()
    expected = written * 0.7 + model[0].bias.detach().double() * 0.3
    assert torch.allclose(ema.ema_model[0].bias, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [{"exclude": "0.*"}, {"include": "1.*"}, {"trainable_only": True}],
    ids=["exclude", "include", "trainable"],
)
def test_a_torchscript_submodule_left_out_of_the_average(kwargs: dict) -> None:
    """lifecycle.md: "TorchScript submodules are averaged like any other"; leaving one out of the average (a frozen
    scripted backbone) fails at construction: the guard on loads into shared parameters registers a
    load_state_dict pre-hook, which ScriptModules refuse ("not supported on ScriptModules")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = nn.Sequential(torch.jit.script(nn.Linear(3, 3)), nn.Linear(3, 3))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    ema = EMA(model, momentum=0.5, **kwargs)
    start = ema.ema_model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
        model[0].weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.ema_model[1].weight, start + 0.5)
    assert torch.equal(ema.ema_model[0].weight, model[0].weight)  # not averaged: the model's own values


def test_an_ema_model_converted_when_the_model_mixes_dtypes_follows_or_refuses_before_writing() -> None:
    """A model whose parameters are not all of one dtype (one float64 tensor here); ``ema.ema_model.float()``
    (lifecycle.md: followed). The next update writes some groups, then fails in torch's lerp ("expected dtype
    float for `end` but got dtype double"): half an update, no tensor named, num_updates not counted."""
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].weight.data = model[1].weight.data.double()
    ema = EMA(model, momentum=0.3)
    ema.ema_model.float()
    before = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    try:
        ema.update()
    except (TypeError, RuntimeError) as e:
        assert "1.weight" in str(e)
        for k, v in ema.ema_model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} written by a refused update"
        return
    for k, p in model.named_parameters():
        expected = before[k].double().lerp(p.detach().double(), 0.3)
        assert torch.allclose(ema.ema_model.get_parameter(k).double(), expected, atol=1e-6), k


def test_an_ema_model_converted_narrower_shows_its_master_rounded_once() -> None:
    """(Minor.) An fp16 EMA model with its float32 master, converted to bf16: the master is kept (good), but the EMA
    model keeps the conversion's double rounding (bf16 of fp16 of the master) after the EMA followed the change
    (state_dict() here), so ``ema.load_state_dict(ema.state_dict())`` is not a no-op: it writes bf16(master)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 3)).half()
    ema = EMA(model, momentum=0.3)
    with torch.no_grad():
        model[0].weight.add_(torch.randn(5, 5).half() * 0.1)
    ema.update()
    ema.ema_model.bfloat16()
    state = ema.state_dict()
    assert torch.equal(ema.ema_model[0].weight, state["master"]["0.weight"].bfloat16())
    before = ema.ema_model[0].weight.detach().clone()
    ema.load_state_dict(state)
    assert torch.equal(ema.ema_model[0].weight, before)


@pytest.mark.parametrize(
    "kwargs",
    [dict(master="split"), dict(master="split", flat=True), dict()],
    ids=["split", "split_flat", "float32_master"],
)
@pytest.mark.parametrize("change", ["assign", "convert"])
def test_a_write_into_the_ema_model_counts_when_the_model_changes_before_the_next_call(
    kwargs: dict, change: str
) -> None:
    """A load into the bf16 EMA model makes the loaded values the average; a change of the online model before
    the EMA's next call (a submodule loaded with ``assign=True``, a conversion) re-pairs the two. The masters
    taken over must be those of the loaded values: the split master kept its old low half (the EMA model, its
    high half, always "rounds to" it), off by up to an ulp of bf16 (found by the deep profile, twice)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    ema = EMA(model, momentum=0.3, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ema.update()  # the masters hold more than the bf16 EMA model shows
    assert any(not torch.equal(m.bfloat16().float(), m) for m in ema.state_dict()["master"].values())
    written = {k: v * 0.5 for k, v in ema.ema_model.state_dict().items()}
    ema.ema_model.load_state_dict(written)
    if change == "assign":
        model[1].load_state_dict(model[1].state_dict(), assign=True)
    else:
        model.double()
    state = ema.state_dict()
    for k, v in written.items():
        held = state.get("master", {}).get(k, state["ema_model"][k])
        assert torch.equal(held.double(), v.double()), k
