"""Memory at the minimum: a staged update (float32 master, stochastic rounding, another device) converts and
averages chunk by chunk through a scratch buffer of one chunk, never a staging copy of the whole model.

The chunking must be invisible: every element averaged exactly once, whatever the sizes, layouts and chunk
boundaries, and the result the one of a whole-tensor update. A small ``CHUNK`` (monkeypatched) puts
boundaries inside tensors of a few hundred elements.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import EMA, _kernels
from polyak.posthoc import PostHocEMA
from polyak.schedules import power_function


class Mixed(nn.Module):
    """Tensors of every layout a staged update meets: larger than a chunk, smaller, channels_last, a
    transposed (dense, not contiguous) one and a strided slice (not dense: read whole)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(40, 30)  # 1200 + 30
        self.conv = nn.Conv2d(6, 8, 3).to(memory_format=torch.channels_last)  # 432, channels_last
        self.t = nn.Parameter(torch.randn(12, 20).t())  # dense, strides (1, 20)
        self.sliced = nn.Parameter(torch.randn(16, 40)[:, ::2])  # 320 elements, not dense
        self.small = nn.Parameter(torch.randn(7))


def step(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def ema_state(ema: EMA) -> dict[str, torch.Tensor]:
    return ema.state_dict()["ema_model"] | {"master." + k: v for k, v in ema.state_dict().get("master", {}).items()}


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("chunk", [64, 100, 1 << 20])
def test_chunked_update_equals_whole_tensor_update(monkeypatch, flat, chunk):
    """float32 master of a bf16 model: the chunked update gives, bit for bit, the master of whole-tensor
    lerps in float32 (computed here by hand), and the EMA model is the master rounded."""
    monkeypatch.setattr(_kernels, "CHUNK", chunk)
    torch.manual_seed(0)
    model = Mixed().to(torch.bfloat16)
    ema = EMA(model, momentum=0.3, flat=flat)
    masters = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        step(model, g)
        ema.update()
        for n, p in model.named_parameters():
            masters[n].lerp_(p.detach().float(), 0.3)
    state = ema.state_dict()
    for n, m in masters.items():
        assert torch.equal(state["master"][n], m), n
        assert torch.equal(state["ema_model"][n], m.to(torch.bfloat16)), n
    kernel = next(k for k in ema._kernels if k.master is not None)
    assert max(c.numel for c in kernel.chunks()) <= max(chunk, 320)  # only the slice exceeds a chunk of 64
    assert kernel.scratch and all(b.numel() <= max(chunk, 320) for b in kernel.scratch)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    chunk=st.integers(1, 400),
    flat=st.booleans(),
    stochastic=st.booleans(),
)
def test_every_element_is_averaged_exactly_once(monkeypatch, sizes, chunk, flat, stochastic):
    """From zeros, an update of momentum 0.5 towards small integers gives exactly half of each (any element
    averaged twice would hold three quarters, one missed would hold zero), whatever the chunk boundaries."""
    monkeypatch.setattr(_kernels, "CHUNK", chunk)
    model = nn.ParameterList([nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in sizes])
    kwargs = {"dtype": torch.bfloat16, "stochastic_rounding": True} if stochastic else {}
    ema = EMA(model, momentum=0.5, flat=flat, **kwargs)
    with torch.no_grad():
        for i, p in enumerate(model):
            p.copy_(2 * (torch.arange(p.numel()) % 64 + i))  # even integers up to 150: halves are exact in bf16
    ema.update()
    for p, e in zip(model, ema.ema_model.parameters(), strict=True):
        assert torch.equal(e, p / 2)
    kernel = ema._kernels[0]
    assert sum(c.numel for c in kernel.chunks()) == sum(sizes)
    assert all(c.numel <= chunk for c in kernel.chunks())


def test_a_split_tensor_given_new_data_is_followed(monkeypatch):
    """A tensor read in pieces whose ``.data`` is replaced (same shape and dtype, no refresh()) is read
    where its data is now, on both models."""
    monkeypatch.setattr(_kernels, "CHUNK", 100)
    model = nn.Linear(40, 30).to(torch.bfloat16)
    ema = EMA(model, momentum=0.5)
    ema.update()
    fresh = torch.full_like(model.weight, 2.0)
    model.weight.data = fresh
    ema.ema_model.weight.data = torch.zeros_like(fresh)  # a load with assign=True does this
    ema.update()
    assert torch.equal(ema.ema_model.weight, torch.ones_like(fresh))
    assert torch.equal(ema.state_dict()["master"]["weight"], torch.ones_like(fresh, dtype=torch.float32))


@pytest.mark.parametrize("kwargs", [{}, {"flat": True}, {"dtype": torch.bfloat16, "stochastic_rounding": True}])
def test_scratch_is_one_chunk_whatever_the_model(kwargs):
    """bytes held beyond the model for a bf16 model with a float32 master: the master (4 per parameter), the
    EMA model (2) and scratch of one chunk (4 MiB; two for stochastic rounding), however large the model."""
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 1024)).to(torch.bfloat16)  # 6.3M parameters
    n = sum(p.numel() for p in model.parameters())
    ema = EMA(model, **kwargs)
    ema.update()
    ema.update()
    (kernel,) = ema._kernels
    scratch = sum(b.numel() * b.element_size() for b in kernel.scratch)
    assert scratch <= len(kernel.scratch) * 4 * _kernels.CHUNK
    assert len(kernel.scratch) == (2 if kwargs.get("stochastic_rounding") else 1)
    master = 0 if kernel.master is None else kernel.master.flat.numel() * 4
    assert master == (0 if kwargs.get("stochastic_rounding") else 4 * n)
    ema_bytes = sum(p.numel() * p.element_size() for p in ema.ema_model.parameters())
    # 6 bytes per parameter and 4 MiB with a master (6.7 for this 6.3M model), 2 and 8 MiB without
    assert master + ema_bytes == (2 if kwargs.get("stochastic_rounding") else 6) * n


@pytest.mark.parametrize("chunk", [50, 1 << 20])
def test_profiles_of_posthoc_share_one_scratch_and_equal_separate_emas(tmp_path, monkeypatch, chunk):
    """PostHocEMA stages each chunk once for all its profiles: one scratch buffer in all, and each profile
    bit for bit the separate EMA of its schedule."""
    monkeypatch.setattr(_kernels, "CHUNK", chunk)
    torch.manual_seed(0)
    model = Mixed().to(torch.bfloat16)
    posthoc = PostHocEMA(model, sigma_rels=(0.05, 0.10, 0.2), snapshot_every=100, directory=tmp_path)
    separate = [EMA(model, schedule=power_function(sigma_rel=s)) for s in (0.05, 0.10, 0.2)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        step(model, g)
        posthoc.update()
        for e in separate:
            e.update()
    for fused, alone in zip(posthoc.emas, separate, strict=True):
        a, b = ema_state(fused), ema_state(alone)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    holding = [e for e in posthoc.emas if any(getattr(k, "scratch", None) for k in e._kernels)]
    assert holding == posthoc.emas[:1]


def test_offload_to_another_dtype_stages_in_chunks():
    """An EMA model of another dtype than the model (no master: the EMA model is float32) reads the
    model's bf16 values through scratch as well, and equals whole-tensor float32 lerps."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    ema = EMA(model, momentum=0.25)
    ema.ema_model.float()
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        step(model, g)
        ema.update()
        for n, p in model.named_parameters():
            ref[n].lerp_(p.detach().float(), 0.25)
    for n, p in ema.ema_model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, ref[n]), n
