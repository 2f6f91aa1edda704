"""The EMA never goes silently stale: a contract suite over every mode and every change users make.

For each change to the online model or to ``ema_model`` (conversions, moves, loads with ``assign=True``, a
replaced submodule or tensor, a load into a submodule, PyTorch's conversion flags), the next update either
follows it exactly (checked against a float64 reference EMA of the same online values) or raises an error
naming the tensor and changes nothing; the online model is never damaged. The table these tests hold is in
the README ("What the EMA follows").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import EMA, _kernels

MODES = {
    "default": dict(dtype=torch.float32, kwargs={}),
    "flat": dict(dtype=torch.float32, kwargs={"flat": True}),
    "bf16-master": dict(dtype=torch.bfloat16, kwargs={}),
    "bf16-master-flat": dict(dtype=torch.bfloat16, kwargs={"flat": True}),
    "bf16-split": dict(dtype=torch.bfloat16, kwargs={"master": "split"}),
    "bf16-split-flat": dict(dtype=torch.bfloat16, kwargs={"master": "split", "flat": True}),
    "bf16-split-compile": dict(dtype=torch.bfloat16, kwargs={"master": "split", "flat": True, "compile": True}),
    "update-buffers": dict(dtype=torch.float32, kwargs={"handle_buffers": "update"}),
    "device": dict(dtype=torch.float32, kwargs={"device": "cpu"}),
    "bf16-compile": dict(dtype=torch.bfloat16, kwargs={"flat": True, "compile": True}),
    # the default mode's gathered update of small 1-D tensors, for every one of them (GATHER_MIN = 1)
    "gathered": dict(dtype=torch.float32, kwargs={}),
}


@pytest.fixture(autouse=True)
def _gather_in_gathered_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    callspec = getattr(request.node, "callspec", None)
    with gathering(callspec is not None and callspec.params.get("mode") == "gathered"):
        yield


def gathering(on: bool) -> contextlib.AbstractContextManager:
    return mock.patch.object(_kernels, "GATHER_MIN", 1) if on else contextlib.nullcontext()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Reference:
    """A float64 EMA of the online parameters, kept by hand: what the EMA must hold."""

    def __init__(self, model: nn.Module) -> None:
        self.values = {k: v.detach().double().clone() for k, v in model.named_parameters()}

    def update(self, model: nn.Module, m: float) -> None:
        for k, v in model.named_parameters():
            self.values[k].mul_(1 - m).add_(v.detach().double(), alpha=m)

    def check(self, ema_model: nn.Module, dtype: torch.dtype, names: list[str] | None = None) -> None:
        # the EMA model in bf16 holds the float32 master rounded: half a bf16 ulp; in float32, rounding only
        tol = 2**-8 if dtype == torch.bfloat16 else 1e-6
        params = dict(ema_model.named_parameters())
        for k in names or self.values:
            ref = self.values[k]
            got = params[k].detach().double()
            assert torch.allclose(got, ref, rtol=tol, atol=tol), (k, (got - ref).abs().max().item())


def build(mode: str, seed: int = 0) -> tuple[nn.Module, EMA, Reference]:
    torch.manual_seed(seed)
    spec = MODES[mode]
    model = Net().to(spec["dtype"])
    ema = EMA(model, momentum=0.3, **spec["kwargs"])
    assert (mode == "gathered") == any(isinstance(k, _kernels.Gathered) for k in ema._kernels)
    return model, ema, Reference(model)


def step(model: nn.Module, ema: EMA, ref: Reference, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape).to(p.dtype) * scale)
    m = ema.update()
    ref.update(model, m)


def online_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_online_intact(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k].to(v.dtype)), k


# -- events that are followed --------------------------------------------------------------------------------
FOLLOWED = {
    "model.to(float64)": lambda model, ema: model.to(torch.float64),
    "model.half()": lambda model, ema: model.half(),
    "ema_model.float()": lambda model, ema: ema.ema_model.float(),
    "ema_model.double()": lambda model, ema: ema.ema_model.double(),
    "ema_model.cpu()": lambda model, ema: ema.ema_model.cpu(),
    "model.load_state_dict(assign=True)": lambda model, ema: model.load_state_dict(
        {k: v.clone() for k, v in model.state_dict().items()}, assign=True
    ),
    "ema_model.load_state_dict(assign=True)": lambda model, ema: ema.ema_model.load_state_dict(
        {k: v.clone() for k, v in ema.ema_model.state_dict().items()}, assign=True
    ),
    "model.head replaced, same shape": lambda model, ema: setattr(model, "head", copy.deepcopy(model.head)),
    "ema_model.head replaced, same shape": lambda model, ema: setattr(
        ema.ema_model, "head", copy.deepcopy(ema.ema_model.head)
    ),
    "a parameter registered anew": lambda model, ema: model.head.register_parameter(
        "bias", nn.Parameter(model.head.bias.detach().clone())
    ),
    "model.body[0].to(float64).to(float32)": lambda model, ema: (
        model.body[0].to(torch.float64).to(next(model.head.parameters()).dtype)
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("event", list(FOLLOWED))
def test_change_is_followed_exactly(mode: str, event: str) -> None:
    model, ema, ref = build(mode)
    step(model, ema, ref)
    FOLLOWED[event](model, ema)
    for _ in range(3):
        step(model, ema, ref)
    ref.check(
        ema.ema_model, MODES[mode]["dtype"] if "float()" not in event and "double" not in event else torch.float32
    )
    assert ema.num_updates == 4


@pytest.mark.parametrize("flag", ["overwrite", "swap"])
@pytest.mark.parametrize("mode", ["default", "flat", "bf16-master"])
def test_torch_conversion_flags_are_followed(mode: str, flag: str) -> None:
    """``torch.__future__``: conversions that make new parameters, or swap their contents in place."""
    setter = getattr(torch.__future__, f"set_{flag}_module_params_on_conversion")
    getter = getattr(torch.__future__, f"get_{flag}_module_params_on_conversion")
    before = getter()
    setter(True)
    try:
        model, ema, ref = build(mode)
        step(model, ema, ref)
        model.to(torch.float64).to(MODES[mode]["dtype"])
        for _ in range(2):
            step(model, ema, ref)
    finally:
        setter(before)
    ref.check(ema.ema_model, MODES[mode]["dtype"])


@pytest.mark.parametrize("mode", list(MODES))
def test_a_load_into_a_submodule_of_ema_model_is_the_new_average(mode: str) -> None:
    """Also with a float32 master (which must not undo it at the next update)."""
    model, ema, ref = build(mode)
    step(model, ema, ref)
    new_head = {k: torch.full_like(v, 0.5) for k, v in ema.ema_model.head.state_dict().items()}
    ema.ema_model.head.load_state_dict(new_head)
    for k in dict(ema.ema_model.head.named_parameters()):
        ref.values[f"head.{k}"] = torch.full_like(ref.values[f"head.{k}"], 0.5)
    step(model, ema, ref)
    ref.check(ema.ema_model, MODES[mode]["dtype"])


# -- events that are refused, changing nothing -----------------------------------------------------------------
REFUSED = {
    "model.head replaced, another shape": (
        lambda model, ema: setattr(model, "head", nn.Linear(8, 5).to(next(model.parameters()).dtype)),
        r"'head.weight' is a parameter of torch\.\w+ \(5, 8\) and the EMA model's a parameter of torch\.\w+ \(3, 8\)",
    ),
    "a parameter added to the model": (
        lambda model, ema: model.head.register_parameter("scale", nn.Parameter(torch.ones(3))),
        r"missing \['head.scale'\]",
    ),
    "a submodule deleted from the EMA model": (
        lambda model, ema: delattr(ema.ema_model, "head"),
        r"missing \['head.bias', 'head.weight'\]",
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("event", list(REFUSED))
def test_change_that_cannot_be_followed_is_refused_naming_the_tensor(mode: str, event: str) -> None:
    model, ema, ref = build(mode)
    step(model, ema, ref)
    change, match = REFUSED[event]
    ema_before = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    change(model, ema)
    online = online_snapshot(model)
    with pytest.raises(RuntimeError, match=match):
        ema.update()
    assert ema.num_updates == 1
    assert_online_intact(model, online)
    for k, v in ema.ema_model.state_dict().items():
        assert torch.equal(v, ema_before[k]), k


def test_a_refused_head_is_followed_once_the_ema_model_has_one_too() -> None:
    model, ema, ref = build("default")
    step(model, ema, ref)
    model.head = nn.Linear(8, 5)
    with pytest.raises(RuntimeError, match="head.weight"):
        ema.update()
    ema.ema_model.head = copy.deepcopy(model.head)  # the EMA of the new head starts from its values
    ref.values["head.weight"] = model.head.weight.detach().double().clone()
    ref.values["head.bias"] = model.head.bias.detach().double().clone()
    step(model, ema, ref)
    ref.check(ema.ema_model, torch.float32)


# -- swapped() -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_update_inside_swapped_is_refused_and_the_online_model_comes_back(mode: str) -> None:
    model, ema, ref = build(mode)
    step(model, ema, ref)
    online = online_snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = ema.hook(optimizer)
    with ema.swapped():
        with pytest.raises(RuntimeError, match=r"update\(\) inside ema.swapped\(\)"):
            ema.update()
        model(torch.randn(4, 6).to(next(model.parameters()).dtype)).float().sum().backward()
        with pytest.raises(RuntimeError, match=r"optimizer.step\(\) with ema.hook\(optimizer\) inside ema.swapped"):
            optimizer.step()
        for what in (ema.state_dict, lambda: ema.load_state_dict({}), lambda: ema.copy_to(Net())):
            with pytest.raises(RuntimeError, match="inside ema.swapped"):
                what()
        with ema.swapped() as inner:  # nested: part of the outer block, the model still holds the EMA
            assert inner is model
            ref.check(model, MODES[mode]["dtype"])
        ref.check(model, MODES[mode]["dtype"])
    handle.remove()
    assert ema.num_updates == 1
    assert_online_intact(model, online)
    ref.check(ema.ema_model, MODES[mode]["dtype"])


def test_swapped_restores_when_the_block_raises_and_what_changes_the_model_inside_changes_the_ema() -> None:
    model, ema, ref = build("update-buffers")
    step(model, ema, ref)
    online = online_snapshot(model)
    with pytest.raises(KeyError), ema.swapped():
        model.train()(torch.randn(16, 6) + 3.0)  # a BatchNorm forward in train mode: it moves the EMA's buffers
        raise KeyError("inside")
    assert_online_intact(model, online)
    assert not torch.equal(ema.ema_model.body[1].running_mean, online["body.1.running_mean"])
    ref.check(ema.ema_model, torch.float32)  # the averaged parameters are untouched


# -- every tensor kind -----------------------------------------------------------------------------------------
def test_complex_parameters_are_averaged() -> None:
    model = nn.Linear(2, 2)
    model.phase = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    ema = EMA(model, momentum=0.25)
    start = ema.ema_model.phase.detach().clone()
    with torch.no_grad():
        model.phase.add_(4 + 4j)
    ema.update()
    assert torch.allclose(ema.ema_model.phase, start + 0.25 * (4 + 4j))


class WithExtraState(nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)
        self.calls = 0

    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.calls = state["calls"]


def test_modules_with_extra_state_checkpoint_and_resume(tmp_path) -> None:
    model = nn.Sequential(WithExtraState(), nn.ReLU())
    ema = EMA(model, momentum=0.5)
    ema.ema_model[0].calls = 7
    ema.update()
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    other = EMA(nn.Sequential(WithExtraState(), nn.ReLU()), momentum=0.5)
    other.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert other.ema_model[0].calls == 7 and other.num_updates == 1
    assert torch.equal(other.ema_model[0].weight, ema.ema_model[0].weight)


def test_torchscript_submodules_are_averaged() -> None:
    model = nn.Sequential(torch.jit.script(nn.Linear(3, 3)), nn.ReLU())
    ema = EMA(model, momentum=0.5)
    start = ema.ema_model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.ema_model[0].weight, start + 0.5)


def test_no_process_wide_side_effect_on_modules_built_later() -> None:
    EMA(nn.Linear(2, 2))

    @dataclasses.dataclass(eq=True)
    class Config(nn.Module):  # __hash__ = None: any global registry of modules would choke on it
        width: int = 3

        def __post_init__(self) -> None:
            super().__init__()

    assert Config().width == 3
    assert nn.Linear(2, 2).weight.shape == (2, 2)


# -- the EMA model exports like any module ---------------------------------------------------------------------
@pytest.mark.parametrize("flat", [False, True])
def test_ema_model_exports_like_any_module(tmp_path, flat: bool) -> None:
    import safetensors.torch as safetensors

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2))
    ema = EMA(model, momentum=0.1, flat=flat)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    for module, name in ((ema.ema_model, "ema"), (model, "online")):
        safetensors.save_model(module, str(tmp_path / f"{name}.safetensors"))
        copy_ = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2))
        safetensors.load_model(copy_, str(tmp_path / f"{name}.safetensors"))
        for a, b in zip(copy_.state_dict().values(), module.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        head = io.BytesIO()
        torch.save(module[2].state_dict(), head)
        assert len(head.getvalue()) < 4000  # the head's 130 floats and pickle framing, not the whole model


def test_flat_mode_keeps_memory_format_shared_storage_and_plain_tensors() -> None:
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    base = torch.randn(20)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(base[:10])
            self.b = nn.Parameter(base[10:])

    shared = Shared()
    model = nn.ModuleDict({"conv": conv, "shared": shared})
    with torch.inference_mode():  # an EMA built here must not turn the parameters into inference tensors
        ema = EMA(model, flat=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert ema.ema_model["conv"].weight.is_contiguous(memory_format=torch.channels_last)
    assert (
        shared.a.untyped_storage().data_ptr()
        == base.untyped_storage().data_ptr()
        == shared.b.untyped_storage().data_ptr()
    )
    assert not conv.weight.is_inference()
    conv(torch.randn(1, 3, 5, 5)).sum().backward()  # training still works
    with torch.no_grad():
        shared.a.add_(1.0)
        conv.weight.add_(1.0)
    ema.update()
    ema.update()


def test_two_flat_emas_of_one_model_do_not_reflatten_each_other() -> None:
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    fast, slow = EMA(model, momentum=0.5, flat=True), EMA(model, momentum=0.01, flat=True)
    pointer = model[0].weight.data_ptr()
    for _ in range(3):
        fast.update()
        slow.update()
    assert model[0].weight.data_ptr() == pointer
    assert fast._plan.structure.unchanged() and slow._plan.structure.unchanged()


# -- choosing what is averaged ---------------------------------------------------------------------------------
class LoRA(nn.Module):
    def __init__(self, d: int = 256, r: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(r, d) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(d, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trainable_only": True},
        {"include": "*.lora_*"},
        {"exclude": ["*.base.*"]},
        {"predicate": lambda name, p: "lora" in name},
    ],
    ids=["trainable_only", "include", "exclude", "predicate"],
)
def test_lora_ema_costs_the_adapter_only(kwargs: dict) -> None:
    model = nn.Sequential(LoRA(), LoRA())
    ema = EMA(model, momentum=0.5, **kwargs)
    online = {p.data_ptr() for p in model.parameters()}
    own = {n: p for n, p in ema.ema_model.named_parameters() if p.data_ptr() not in online}
    assert set(own) == {f"{i}.lora_{x}" for i in (0, 1) for x in "ab"}
    assert sum(p.numel() for p in own.values()) == 2 * 2 * 4 * 256  # the adapters: 8192, against 131,584
    base, ema_base = model[0].base.weight, ema.ema_model[0].base.weight
    assert ema_base is not base and ema_base.data_ptr() == base.data_ptr()  # its own parameter over the data
    start = ema.ema_model[0].lora_b.detach().clone()
    with torch.no_grad():
        model[0].lora_b.add_(1.0)
        base.add_(1.0)  # not averaged: the EMA model shows the model's own
    ema.update()
    assert torch.equal(ema.ema_model[0].lora_b, start + 0.5)
    assert torch.equal(ema.ema_model[0].base.weight, base)
    assert model[0].lora_a.requires_grad and not base.requires_grad  # the model's own flags


def test_shared_parameters_survive_what_users_do_to_either_model() -> None:
    """Converting the EMA model leaves the model's shared tensors alone; a freeze after construction does not
    change what is averaged; the model's tensors replaced alike are shared again (no doubled memory)."""
    model = nn.Sequential(LoRA(16), LoRA(16))
    ema = EMA(model, momentum=0.5, trainable_only=True)
    ema.ema_model.half()
    assert model[0].base.weight.dtype == torch.float32  # the model's own, untouched
    ema.update()  # follows: the half EMA model gets the model's values (copied, now it has its own dtype)
    assert torch.equal(ema.ema_model[0].base.weight, model[0].base.weight.half())
    ema.ema_model.float()
    ema.update()
    assert ema.ema_model[0].base.weight.data_ptr() == model[0].base.weight.data_ptr()  # shared again
    model[0].lora_a.requires_grad_(False)  # frozen after construction: still averaged
    start = ema.ema_model[0].lora_a.detach().clone()
    with torch.no_grad():
        model[0].lora_a.add_(2.0)
    ema.refresh()
    ema.update()
    assert torch.allclose(ema.ema_model[0].lora_a, start + 1.0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    ema.update()
    assert ema.ema_model[1].base.weight.data_ptr() == model[1].base.weight.data_ptr()


def test_memory_shared_by_mistake_is_separated_and_a_part_of_the_model_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ema = EMA(model, momentum=0.5)
    ema.ema_model.load_state_dict(model.state_dict(), assign=True)  # "reset the EMA": now it views the model
    ema.update()
    assert ema.ema_model[0].weight.data_ptr() != model[0].weight.data_ptr()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.ema_model[0].weight, model[0].weight - 0.5)  # an EMA again, not the model
    ema.ema_model[1] = model[1]  # the model's own module, not a copy
    with pytest.raises(RuntimeError, match=r"holds the model's own tensor '1.weight'.*copy.deepcopy"):
        ema.update()


def test_a_copied_buffer_that_changes_shape_is_followed() -> None:
    """A non-persistent cache that grows (rotary embeddings' cos_cached): copied as it is now."""
    model = nn.Linear(2, 2)
    model.register_buffer("cache", torch.zeros(3), persistent=False)
    for handle_buffers in ("copy", "ema_train"):
        ema = EMA(model, momentum=0.5, handle_buffers=handle_buffers)
        model.cache = torch.ones(5)
        ema.update()
        assert ema.ema_model.cache.shape == ((5,) if handle_buffers == "copy" else (3,))
        model.cache = torch.zeros(3)


def test_parameters_not_averaged_are_copied_where_they_cannot_be_shared() -> None:
    model = LoRA(16)
    ema = EMA(model, momentum=0.5, device="cpu", trainable_only=True)
    assert ema.ema_model.base.weight is not model.base.weight
    with torch.no_grad():
        model.base.weight.add_(1.0)
    ema.update()
    assert torch.equal(ema.ema_model.base.weight, model.base.weight)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"include": 3}, TypeError, "include must be a name or glob"),
        ({"exclude": [None]}, TypeError, "exclude must be a name or glob"),
        ({"predicate": "lora"}, TypeError, "predicate must be a callable"),
        ({"trainable_only": "yes"}, TypeError, "trainable_only must be"),
    ],
)
def test_bad_selection_arguments_are_refused(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        EMA(nn.Linear(2, 2), **kwargs)


# -- atomic ------------------------------------------------------------------------------------------------------
def test_skip_nonfinite_covers_the_buffers_it_copies() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(model, momentum=0.5, skip_nonfinite=True)
    before = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    model[1].running_var[0] = float("nan")  # a copied NaN skips; a copied Inf is a value (test_review_contract.py)
    with pytest.warns(RuntimeWarning, match="skipped EMA update 1"):
        assert ema.update() == 0.0
    assert ema.num_skipped == 1 and ema.num_updates == 0
    for k, v in ema.ema_model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- property: random sequences of what users do, against a float64 reference -------------------------------------
OPS = [
    "step",
    "step",
    "step",
    "ema_float",
    "model_double",
    "assign_model",
    "assign_ema",
    "new_head",
    "swap",
    "save_load",
]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["default", "flat", "bf16-master", "gathered", "bf16-split"]),
    ops=st.lists(st.sampled_from(OPS), max_size=10),
)
def test_any_sequence_of_changes_keeps_the_ema_exact(mode: str, ops: list[str]) -> None:
    with gathering(mode == "gathered"):
        any_sequence_of_changes(mode, ops)


def any_sequence_of_changes(mode: str, ops: list[str]) -> None:
    model, ema, ref = build(mode, seed=len(ops))
    tightest = MODES[mode]["dtype"]
    for op in ops:
        if op == "step":
            step(model, ema, ref)
        elif op == "ema_float":
            ema.ema_model.float()
        elif op == "model_double":
            model.double()
            tightest = torch.float32 if tightest == torch.float32 else tightest
        elif op == "assign_model":
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        elif op == "assign_ema":
            ema.ema_model.load_state_dict({k: v.clone() for k, v in ema.ema_model.state_dict().items()}, assign=True)
        elif op == "new_head":
            model.head = copy.deepcopy(model.head)
        elif op == "swap":
            online = online_snapshot(model)
            with ema.swapped(), torch.no_grad():
                model.eval()(torch.randn(2, 6).to(next(model.parameters()).dtype))
            model.train()
            assert_online_intact(model, online)
        elif op == "save_load":
            buffer = io.BytesIO()
            torch.save(ema.state_dict(), buffer)
            buffer.seek(0)
            with contextlib.suppress(Exception):
                pass
            ema.load_state_dict(torch.load(buffer, weights_only=True))
    step(model, ema, ref)
    ema_dtype = next(ema.ema_model.parameters()).dtype
    ref.check(ema.ema_model, torch.bfloat16 if ema_dtype == torch.bfloat16 else torch.float32)
    assert ema.num_updates == ops.count("step") + 1


# -- found by an adversarial review of this suite -----------------------------------------------------------------
class FirstIsOdd(nn.Module):
    """A module whose first tensor is not the one a conversion moves."""

    def __init__(self, first: torch.Tensor) -> None:
        super().__init__()
        self.first = nn.Parameter(first)
        self.weight = nn.Parameter(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize(
    ("first", "convert"),
    [
        (torch.randn(3), lambda m: m.to(memory_format=torch.channels_last)),
        (torch.randn(3, dtype=torch.complex64), lambda m: m.half().float()),
        (torch.randn(0), lambda m: m.double().float()),
    ],
    ids=["1d-first-channels-last", "complex-first-half", "empty-first-double"],
)
def test_conversions_that_leave_the_first_tensor_alone_are_seen(flat: bool, first, convert) -> None:
    model = FirstIsOdd(first)
    ema = EMA(model, momentum=0.5, flat=flat)
    start = ema.ema_model.weight.detach().clone()
    convert(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.ema_model.weight, start.lerp(model.weight.detach(), 0.5))


@pytest.mark.parametrize("side", ["model", "ema_model"])
def test_flat_mode_sees_a_data_assigned_by_hand_on_any_tensor(side: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    ema = EMA(model, momentum=0.5, flat=True)
    target = model if side == "model" else ema.ema_model
    target[1].bias.data = target[1].bias.data + 4.0  # not its module's first tensor
    expected = ema.ema_model[1].bias.detach().clone().lerp(model[1].bias.detach(), 0.5)
    ema.update()
    assert torch.allclose(ema.ema_model[1].bias, expected)
    with torch.no_grad():
        model[1].bias.add_(2.0)
    expected = ema.ema_model[1].bias.detach().clone().lerp(model[1].bias.detach(), 0.5)
    ema.update()
    assert torch.allclose(ema.ema_model[1].bias, expected)  # and keeps following it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_complex_parameters_keep_their_imaginary_part_whatever_dtype_is(dtype) -> None:
    model = nn.Linear(2, 2)
    model.phase = nn.Parameter(torch.full((3,), 1 + 2j, dtype=torch.complex64))
    ema = EMA(model, momentum=0.5, dtype=dtype, stochastic_rounding=dtype == torch.bfloat16)
    with torch.no_grad():
        model.phase.add_(2j)
    ema.update()
    assert torch.allclose(ema.ema_model.phase, torch.full((3,), 1 + 3j, dtype=torch.complex64))


@pytest.mark.parametrize("kwargs", [{}, {"flat": True}], ids=["default", "flat"])
def test_emas_built_or_rebuilt_under_inference_mode_keep_working(kwargs: dict) -> None:
    model = nn.Linear(4, 4).to(torch.bfloat16)
    with torch.inference_mode():
        ema = EMA(model, momentum=0.5, **kwargs)
    ema.update()
    model.float()  # a change: the next pairing happens under inference_mode too
    with torch.inference_mode():
        ema.state_dict()
    ema.update()
    model(torch.randn(2, 4)).sum().backward()


def test_a_load_that_fails_late_changes_nothing() -> None:
    class Strict(WithExtraState):
        def set_extra_state(self, state: dict) -> None:
            raise ValueError("refused by the module")

    model = nn.Sequential(nn.Linear(2, 2), Strict())
    ema = EMA(model, momentum=0.5)
    before = {k: v.clone() for k, v in ema.ema_model.state_dict().items() if isinstance(v, torch.Tensor)}
    state = ema.state_dict()
    state["ema_model"] = {k: v + 1 if isinstance(v, torch.Tensor) else v for k, v in state["ema_model"].items()}
    with pytest.raises(ValueError, match="refused by the module"):
        ema.load_state_dict(state)
    for k, v in before.items():
        assert torch.equal(ema.ema_model.state_dict()[k], v), k


def test_post_hoc_profiles_converted_differently_update_each_on_its_own(tmp_path) -> None:
    from polyak.posthoc import PostHocEMA

    model = nn.Linear(4, 4).to(torch.bfloat16)
    posthoc = PostHocEMA(model, directory=tmp_path, snapshot_every=100)
    posthoc.emas[0].ema_model.double()
    posthoc.emas[1].ema_model.float()
    refs = [e.ema_model.weight.detach().double().clone() for e in posthoc.emas]
    with torch.no_grad():
        model.weight.add_(1.0)
    posthoc.update()
    for e, ref in zip(posthoc.emas, refs, strict=True):
        m = e.momentum_at(1)
        assert torch.allclose(e.ema_model.weight.double(), ref.lerp(model.weight.detach().double(), m), atol=1e-6)
    assert posthoc.num_updates == 1
