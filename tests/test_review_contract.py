"""The defects of issue 17's review (and of the contract suite's first runs), each as a plain test: the update
follows exactly, or refuses naming the tensor and changes nothing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from polyak import EMA


def _state(ema: EMA) -> dict:
    """Everything the EMA holds, copied: values, masters, counts."""
    sd = ema.state_dict()
    return {
        "ema_model": {k: v.clone() for k, v in sd["ema_model"].items()},
        "master": {k: v.clone() for k, v in sd.get("master", {}).items()},
        "counts": (sd["num_updates"], sd["num_skipped"]),
    }


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["counts"] == b["counts"]
    for part in ("ema_model", "master"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]) or (a[part][k].isnan() == b[part][k].isnan()).all(), k


def _step(model: nn.Module, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * scale)


# -- silent defects -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["momentum=1", "copy_first"])
def test_split_master_copy_after_averaging_began_is_exact(how: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 64).bfloat16()
    ema = EMA(model, momentum=0.1, master="split")
    for _ in range(3):
        _step(model)
        ema.update()
    _step(model)
    if how == "momentum=1":
        ema.update(momentum=1.0)
    else:  # a fresh EMA with copy_first, loaded from this one's state: its first update copies
        other = EMA(model, momentum=0.1, master="split", copy_first=1)
        other.load_state_dict(ema.state_dict())
        other.num_updates = 0
        ema = other
        ema.update()
    assert not ema.ema_model.weight.isnan().any()  # was: 1975 of 4096 NaN
    assert torch.equal(ema.ema_model.weight, model.weight)
    assert torch.equal(ema.state_dict()["master"]["weight"], model.weight.float())


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.mask


@pytest.mark.parametrize("late", [False, True])
def test_skip_nonfinite_averages_a_model_with_an_inf_mask(late: bool) -> None:
    torch.manual_seed(0)
    model = Masked()
    if late:
        model.mask.zero_()
    ema = EMA(model, momentum=0.1, skip_nonfinite=True)
    if late:  # a -inf mask set after the EMA was built
        model.mask[1] = float("-inf")
    reference = ema.ema_model.lin.weight.double().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipped" warning
        for _ in range(100):
            _step(model.lin, 0.1)
            ema.update()
            reference.lerp_(model.lin.weight.double(), 0.1)
    assert ema.num_skipped == 0 and ema.num_updates == 100  # was: 100 of 100 skipped
    assert torch.allclose(ema.ema_model.lin.weight.double(), reference, atol=1e-6)
    assert torch.equal(ema.ema_model.mask, model.mask)
    # a NaN in the copied buffer still skips
    model.mask[0] = float("nan")
    before = _state(ema)
    with pytest.warns(RuntimeWarning, match="skipped EMA update 101"):
        assert ema.update() == 0.0
    after = _state(ema)
    assert after["counts"] == (100, 1)  # counted as skipped, nothing else changed
    after["counts"] = before["counts"]
    _assert_same_state(before, after)


def _lora_like() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)  # the frozen base
    return model


def test_a_load_into_the_ema_model_cannot_overwrite_the_models_frozen_weights() -> None:
    model = _lora_like()
    ema = EMA(model, trainable_only=True)
    frozen = model[0].weight.clone()
    zeros = {k: torch.zeros_like(v) for k, v in ema.ema_model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"'0.weight'.*shares it with the model"):
        ema.ema_model.load_state_dict(zeros)
    assert torch.equal(model[0].weight, frozen)  # was: overwritten with zeros
    assert not torch.equal(ema.ema_model[1].weight, torch.zeros(4, 4))  # nothing loaded
    with pytest.raises(RuntimeError, match=r"'0.bias'"):  # a load into a submodule too
        ema.ema_model[0].load_state_dict({"weight": frozen, "bias": torch.zeros(4)})
    assert torch.equal(model[0].weight, frozen)
    # the same values load: a checkpoint of the EMA model written in this run
    saved = copy.deepcopy(ema.ema_model.state_dict())
    saved["1.weight"] = torch.ones(4, 4)
    ema.ema_model.load_state_dict(saved)
    assert torch.equal(ema.ema_model[1].weight, torch.ones(4, 4))
    # assign=True gives the EMA model tensors of its own: the model is untouched, the next update copies
    ema.ema_model.load_state_dict(zeros, assign=True)
    assert torch.equal(model[0].weight, frozen)
    ema.update()
    assert torch.equal(ema.ema_model[0].weight, frozen)
    # a deep copy of the EMA model is an ordinary module
    clone = copy.deepcopy(ema.ema_model)
    clone.load_state_dict(zeros)
    assert torch.equal(clone[0].weight, torch.zeros(4, 4)) and torch.equal(model[0].weight, frozen)


# -- unclear or not atomic ------------------------------------------------------------------------------------
def test_load_state_dict_with_an_unreadable_master_changes_nothing() -> None:
    model = nn.Linear(4, 4).bfloat16()
    ema = EMA(model, momentum=0.5)
    _step(model)
    ema.update()
    before = _state(ema)
    bad = ema.state_dict()
    bad["ema_model"] = {k: torch.zeros_like(v) for k, v in bad["ema_model"].items()}
    bad["master"] = {k: torch.empty(v.shape, device="meta") for k, v in bad["master"].items()}
    with pytest.raises(ValueError, match=r"state_dict\['master'\]\['weight'\].*meta"):
        ema.load_state_dict(bad)
    _assert_same_state(before, _state(ema))
    bad["master"] = {k: torch.zeros(v.shape, dtype=torch.int32) for k, v in ema.state_dict()["master"].items()}
    with pytest.raises(ValueError, match=r"state_dict\['master'\]\['weight'\] must hold values of"):
        ema.load_state_dict(bad)
    _assert_same_state(before, _state(ema))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex32])
def test_dtypes_without_arithmetic_are_refused_when_built_not_half_way_through_an_update(dtype) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        real = torch.complex64 if dtype.is_complex else dtype
        model[1].weight.data = model[1].weight.data.to(real).to(dtype)
    with pytest.raises(TypeError, match=rf"{str(dtype).split('.')[-1]}.*'1.weight' cannot be averaged"):
        EMA(model)
    ema = EMA(model, exclude="1.weight")  # kept out of the average, it is copied
    ema.update()
    assert ema.ema_model[1].weight.dtype == dtype
    with pytest.raises(TypeError, match="dtype must be a floating"):
        EMA(nn.Linear(2, 2), dtype=torch.float8_e4m3fn)
    # converted after the EMA was built: the update refuses before writing anything
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ema = EMA(model, momentum=0.5)
    _step(model)
    before = _state(ema)
    if not dtype.is_complex:
        model[1].to(dtype)
        with pytest.raises(TypeError, match="'1.weight' cannot be averaged"):
            ema.update()
        assert ema.num_updates == 0
        for k, v in ema.ema_model.state_dict().items():
            assert torch.equal(v, before["ema_model"][k]), k


@pytest.mark.parametrize(
    "kwargs, base, new",
    [
        ({}, torch.float32, torch.bfloat16),
        ({}, torch.float32, torch.float16),
        ({"dtype": torch.bfloat16}, torch.bfloat16, torch.float32),
        ({"flat": True}, torch.float32, torch.float64),
    ],
)
def test_a_data_dtype_change_without_refresh_is_followed(kwargs: dict, base, new) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).to(base)
    ema = EMA(model, momentum=0.5, **kwargs)
    # the bias is no module's canary: the structure check alone does not see it
    model[1].bias.data = model[1].bias.data.to(new)
    _step(model)
    expected = ema.ema_model[1].bias.double().lerp(model[1].bias.double(), 0.5)
    ema.update()  # was: "expected dtype float for `end` but got dtype c10::BFloat16"
    assert ema.ema_model[1].bias.dtype == base
    tol = 1e-2 if torch.bfloat16 in (base, new) or torch.float16 in (base, new) else 1e-6
    assert torch.allclose(ema.ema_model[1].bias.double(), expected, atol=tol)


def test_a_data_shape_change_without_refresh_is_refused_before_anything_is_written() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    ema = EMA(model, momentum=0.5)
    _step(model)
    before = _state(ema)
    model[1].bias.data = model[1].bias.data.view(3, 1)
    with pytest.raises(RuntimeError, match=r"'1.bias'"):
        ema.update()
    assert ema.num_updates == 0
    for k, v in ema.ema_model.state_dict().items():  # (state_dict() of the EMA refuses too, until it is fixed)
        assert torch.equal(v, before["ema_model"][k]), k
    model[1].bias.data = model[1].bias.data.view(3)
    ema.update()
    assert ema.num_updates == 1


def test_flat_mode_with_a_torchscript_submodule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), torch.jit.script(nn.Linear(3, 3)))
    ema = EMA(model, momentum=0.5, flat=True)  # was: "register_state_dict_post_hook is not supported ..."
    reference = {k: v.double().clone() for k, v in ema.ema_model.state_dict().items()}
    for _ in range(3):
        _step(model)
        ema.update()
        for k, v in model.state_dict().items():
            reference[k].lerp_(v.double(), 0.5)
    for k, v in ema.ema_model.state_dict().items():
        assert torch.allclose(v.double(), reference[k], atol=1e-6), k
    # many small tensors in a TorchScript module: gathered, and its state_dict still works
    many = nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.Sequential(*[nn.LayerNorm(4) for _ in range(40)])))
    ema = EMA(many, momentum=0.5)
    ema.update()
    assert len(ema.ema_model.state_dict()) == len(many.state_dict())


@pytest.mark.parametrize("bad", [None, 1j, torch.ones(2), "0.1", True, float("nan"), 1.5])
def test_a_schedule_that_returns_no_momentum_is_named(bad) -> None:
    model = nn.Linear(2, 1)

    def schedule(k: int):
        return bad

    ema = EMA(model, schedule=schedule)
    before = _state(ema)
    with pytest.raises((TypeError, ValueError), match=r"schedule must return a momentum.*for update 1 from schedule="):
        ema.update()
    _assert_same_state(before, _state(ema))
    # numbers of other kinds are momenta
    for good in (0, 1, torch.tensor(0.5), 0.25):
        assert EMA(nn.Linear(2, 1), schedule=lambda k, g=good: g).update() == float(good)


def test_hook_twice_on_one_optimizer_is_refused() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model)
    handle = ema.hook(optimizer)
    with pytest.raises(RuntimeError, match="already called with this optimizer"):
        ema.hook(optimizer)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert ema.num_updates == 1  # was: 2
    handle.remove()
    ema.hook(optimizer)  # hooked again after the first was removed
    optimizer.step()
    assert ema.num_updates == 2


def test_copy_to_and_from_compiled_modules() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    ema = EMA(model, momentum=0.5)
    _step(model)
    ema.update()
    target = torch.compile(nn.Linear(2, 1))
    ema.copy_to(target)  # was: "Missing key(s) ... _orig_mod.weight"
    assert torch.equal(target._orig_mod.weight, ema.ema_model.weight)
    compiled = torch.compile(nn.Linear(2, 1))
    ema = EMA(compiled, momentum=0.5)
    plain = nn.Linear(2, 1)
    ema.copy_to(plain)
    assert torch.equal(plain.weight, compiled._orig_mod.weight)


# -- found by the contract suite --------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["model", "ema_model"])
def test_flat_mode_follows_a_transposed_view_of_the_same_storage(side: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = EMA(model, momentum=0.5, flat=True)
    weight = (model if side == "model" else ema.ema_model)[0].weight
    weight.data = weight.data.t()
    expected = ema.ema_model[0].weight.detach().double().lerp(model[0].weight.double(), 0.5)
    ema.update()
    assert torch.allclose(ema.ema_model[0].weight.double(), expected, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs", [{}, {"flat": True}, {"trainable_only": True}, {"master": "split"}, {"device": "cpu"}]
)
def test_an_ema_of_a_model_on_meta_follows_it_once_materialised(kwargs: dict) -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    if "master" in kwargs:
        model.bfloat16()
    model[1].requires_grad_(False)
    ema = EMA(model, momentum=0.5, **kwargs)
    with pytest.raises(RuntimeError, match=r"'0.weight' is on the meta device"):
        ema.update()
    assert ema.num_updates == 0
    model.to_empty(device="cpu")
    with torch.no_grad():
        model[0].reset_parameters()
        model[1].reset_parameters()
        model[1].reset_running_stats()
    start = model[0].weight.double().clone()
    ema.update()  # the EMA starts from the materialised model, as at construction
    _step(model[0])
    ema.update()
    expected = start.lerp(model[0].weight.double(), 0.5)
    tol = 1e-2 if "master" in kwargs else 1e-6
    assert ema.ema_model[0].weight.device.type == "cpu"
    assert torch.allclose(ema.ema_model[0].weight.double(), expected, atol=tol)
    assert torch.equal(ema.ema_model[1].weight, model[1].weight)
