"""``master="split"``: a bf16 model's exact float32 average in 4 bytes per parameter (the bf16 EMA model as the
high half, an int16 low half), bit for bit the default float32 master's arithmetic."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import EMA, _kernels
from polyak._kernels import join_float32, split_float32


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone()
    hi, lo = torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.int16)
    split_float32(x, torch.empty_like(x, dtype=torch.int32), hi, lo)
    return hi, lo


def every_class_of_bits() -> torch.Tensor:
    """Every high half (sign, exponent and 7 mantissa bits: zeros, subnormals, normals, the largest, the
    infinities, NaNs) with low halves at and around every rounding boundary."""
    high = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 0x3FFF, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFE, 0xFFFF])
    bits = (high[:, None] | lows[None, :]).flatten()
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)  # as signed 32-bit words


def test_split_then_join_gives_every_float32_back_bit_for_bit():
    x = every_class_of_bits()
    hi, lo = halves(x)
    back = join_float32(hi, lo, torch.empty_like(x))
    finite_or_inf = ~torch.isnan(x)
    assert torch.equal(back.view(torch.int32)[finite_or_inf], x.view(torch.int32)[finite_or_inf])
    assert torch.isnan(back[~finite_or_inf]).all() and torch.isnan(hi[~finite_or_inf]).all()  # never a number
    # NaNs: per sign, the 127 high halves above infinity's with any low half, and infinity's with a non-zero one
    assert finite_or_inf.sum() == len(x) - 2 * (127 * 10 + 9)


def test_the_high_half_is_the_float32_value_rounded_to_nearest_ties_away_from_zero():
    x = every_class_of_bits()
    hi, _ = halves(x)
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    magnitude = bits & 0x7FFFFFFF
    expected = ((bits >> 31) << 15) | ((magnitude + 0x8000) >> 16)  # sign | magnitude rounded half up
    expected = (expected - ((expected >> 15) << 16)).to(torch.int16)
    number = ~torch.isnan(x)
    assert torch.equal(hi.view(torch.int16)[number], expected[number])
    # away from ties, that is torch's own rounding (to nearest, ties to even)
    no_tie = number & ((bits & 0xFFFF) != 0x8000)
    assert torch.equal(hi[no_tie], x[no_tie].to(torch.bfloat16))


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_round_trip_of_any_float32(values):
    x = torch.tensor(values, dtype=torch.float32)
    hi, lo = halves(x)
    back = join_float32(hi, lo, torch.empty_like(x))
    number = ~torch.isnan(x)
    assert torch.equal(back.view(torch.int32)[number], x.view(torch.int32)[number])
    assert torch.isnan(back[~number]).all()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        self.big = nn.Linear(64, 40)
        self.norm = nn.LayerNorm(40)


def walk(model: nn.Module, emas: list[EMA], steps: int, seed: int = 1) -> None:
    """A bf16 random walk of a few ulps per step: what a float32 master exists for."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p.float() * (1 + 2**-7 * torch.randn(p.shape, generator=g))).to(p.dtype))
        for e in emas:
            e.update()


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("chunk", [100, 1 << 20])
def test_split_master_is_the_float32_master_bit_for_bit(monkeypatch, flat, chunk):
    monkeypatch.setattr(_kernels, "CHUNK", chunk)
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    split = EMA(model, momentum=0.05, master="split", flat=flat)
    full = EMA(model, momentum=0.05, flat=flat)
    assert isinstance(split._kernels[0], _kernels.Split)
    walk(model, [split, full], 30)
    a, b = split.state_dict(), full.state_dict()
    assert a["master"].keys() == b["master"].keys()
    for name, master in b["master"].items():
        assert torch.equal(a["master"][name], master), name
        hi, _ = halves(master.contiguous().view(-1))
        assert torch.equal(a["ema_model"][name].contiguous().view(-1), hi), name
        # the EMA models differ only at ties (half way between two bf16 values)
        ties = (master.view(torch.int32) & 0xFFFF) == 0x8000
        assert torch.equal(a["ema_model"][name][~ties], b["ema_model"][name][~ties]), name


def test_it_holds_four_bytes_per_parameter():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024)).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    ema = EMA(model, master="split")
    ema.update()
    (kernel,) = ema._kernels
    held = sum(p.numel() * p.element_size() for p in ema.ema_model.parameters())
    held += kernel.low.flat.numel() * kernel.low.flat.element_size()
    assert held == 4 * n and kernel.master is None
    assert sum(b.numel() * b.element_size() for b in kernel.scratch) <= 2 * 4 * _kernels.CHUNK


def test_checkpoints_move_between_split_and_full_masters_exactly():
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    split, full = EMA(model, momentum=0.1, master="split"), EMA(model, momentum=0.1)
    walk(model, [split, full], 10)
    buffer = io.BytesIO()
    torch.save(split.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other_full, other_split = EMA(model, momentum=0.1), EMA(model, momentum=0.1, master="split")
    other_full.load_state_dict(state)
    other_split.load_state_dict(full.state_dict())
    walk(model, [split, full, other_full, other_split], 10, seed=2)
    for a, b in ((split, other_split), (full, other_full), (split, full)):
        for name, master in a.state_dict()["master"].items():
            assert torch.equal(master, b.state_dict()["master"][name]), name


def test_resume_is_bit_exact():
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    straight = EMA(model, momentum=0.1, master="split")
    walk(model, [straight], 5)
    resumed = EMA(model, momentum=0.1, master="split")
    resumed.load_state_dict(straight.state_dict())
    walk(model, [straight, resumed], 5, seed=3)
    a, b = straight.state_dict(), resumed.state_dict()
    for key in ("ema_model", "master"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), name


def test_swapped_keeps_the_low_halves():
    """An evaluation inside swapped() trades values and back: the master is unchanged, not rounded."""
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    split, full = EMA(model, momentum=0.1, master="split"), EMA(model, momentum=0.1)
    walk(model, [split, full], 5)
    with split.swapped(), torch.no_grad():
        model.big(torch.randn(2, 64, dtype=torch.bfloat16))
    walk(model, [split, full], 5, seed=2)
    for name, master in full.state_dict()["master"].items():
        assert torch.equal(split.state_dict()["master"][name], master), name


def test_a_load_into_the_ema_model_makes_its_values_the_average():
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    ema = EMA(model, momentum=0.1, master="split")
    walk(model, [ema], 3)
    with torch.no_grad():
        ema.ema_model.big.weight.fill_(0.5)
    ema.update(momentum=0.0)
    assert torch.equal(ema.state_dict()["master"]["big.weight"], torch.full((40, 64), 0.5))
    assert ema.state_dict()["master"]["big.bias"].ne(ema.ema_model.big.bias.float()).any()  # others kept


def test_nan_and_inf_are_those_of_a_float32_master():
    """NaN and infinity in the online model: the split master holds what a float32 master holds (never a
    number where that holds a NaN: a NaN's bits could otherwise carry into the sign when rounded)."""
    model = nn.Linear(4, 4).to(torch.bfloat16)
    split, full = EMA(model, momentum=0.5, master="split"), EMA(model, momentum=0.25)
    with torch.no_grad():
        model.weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for e in (split, full):
        e.update(momentum=0.25)
    a, b = split.state_dict()["master"]["weight"], full.state_dict()["master"]["weight"]
    assert torch.isnan(a[0, 0]) and a[0, 1] == float("inf") and a[0, 2] == -float("inf")
    assert torch.equal(a.flatten()[1:], b.flatten()[1:]) and torch.isnan(split.ema_model.weight[0, 0])
    split.update(momentum=0.5)  # inf - inf: NaN, as in float32
    assert torch.isnan(split.state_dict()["master"]["weight"][0, 1])


def test_only_bf16_tensors_are_split_and_bad_arguments_are_refused():
    model = nn.Sequential(nn.Linear(2, 2).to(torch.bfloat16), nn.Linear(2, 2).half(), nn.Linear(2, 2))
    ema = EMA(model, master="split")
    kinds = {k.ema_dtype: type(k).__name__ for k in ema._kernels}
    assert kinds == {torch.bfloat16: "Split", torch.float16: "Staged", torch.float32: "Lerp"}
    assert "(split master)" in repr(ema)
    with pytest.raises(ValueError, match="master must be 'float32' or 'split', got 'half'"):
        EMA(model, master="half")
    with pytest.raises(ValueError, match="master='split'.*dtype=torch.bfloat16"):
        EMA(model, master="split", dtype=torch.bfloat16)


def test_compiled_split_master_tracks_the_float32_master_to_its_last_place():
    """compile=True: one generated kernel. Its lerp is inductor's, which rounds the last float32 place its own
    way (as the compiled float32 master's does): within a few float32 ulps of the eager master after 5
    updates, and the EMA model within one bf16 ulp."""
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    split = EMA(model, momentum=0.05, master="split", flat=True, compile=True)
    full = EMA(model, momentum=0.05, flat=True)
    assert isinstance(split._kernels[0], _kernels.CompiledSplit)
    walk(model, [split, full], 5)
    assert split._kernels[0].fused
    for name, master in full.state_dict()["master"].items():
        torch.testing.assert_close(split.state_dict()["master"][name], master, rtol=2**-21, atol=2**-30)
        torch.testing.assert_close(split.ema_model.state_dict()[name].float(), master, rtol=2**-8, atol=0, msg=name)


def test_compiled_split_master_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(numel):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_kernels, "_compiled_split_update", broken)
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    split = EMA(model, momentum=0.05, master="split", flat=True, compile=True)
    full = EMA(model, momentum=0.05, flat=True)
    with pytest.warns(RuntimeWarning, match="could not compile its update"):
        walk(model, [split, full], 3)
    for name, master in full.state_dict()["master"].items():
        assert torch.equal(split.state_dict()["master"][name], master), name
