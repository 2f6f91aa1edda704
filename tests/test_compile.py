"""compile=True: one generated kernel per group for low-precision models with a float32 master."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyak import EMA, EMAHandler, _kernels
from polyak._kernels import Compiled
from polyak.schedules import linear_warmup


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)).to(torch.bfloat16)


def run(ema: EMA, steps: int = 12) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        with torch.no_grad():
            for p in ema.model.parameters():
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
        ema.update()


def fused(ema: EMA) -> list[bool]:
    return [isinstance(k, Compiled) and k.fused for k in ema._kernels]


def test_compiled_update_matches_the_eager_one():
    schedule = linear_warmup(0.5, 0.01, 5)
    eager = EMA(net(), schedule=schedule, flat=True)
    compiled = EMA(net(), schedule=schedule, flat=True, compile=True)
    assert all(fused(compiled))
    run(eager)
    run(compiled)
    assert compiled.num_updates == eager.num_updates == 12
    for k, a in compiled.state_dict()["master"].items():
        b = eager.state_dict()["master"][k]
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # the generated kernel may round differently
    for (k, a), b in zip(compiled.ema_model.state_dict().items(), eager.ema_model.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=0)  # within a bf16 ulp
        else:
            assert torch.equal(a, b), k
    for k, a in compiled.ema_model.state_dict().items():  # ema_model is the master, rounded
        if k in compiled.state_dict()["master"]:
            assert torch.equal(a, compiled.state_dict()["master"][k].to(a.dtype)), k


def test_flat_compiled_update_needs_no_staging_buffer():
    ema = EMA(net(), flat=True, compile=True)
    ema.update()
    assert all(k.work_dtype is None and not k.scratch for k in ema._kernels)


def test_compile_needs_flat():
    with pytest.raises(ValueError, match="compile=True needs flat=True"):
        EMA(net(), compile=True)


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(numel):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(_kernels, "_compiled_master_update", broken)
    eager = EMA(net(), momentum=0.1, flat=True)
    compiled = EMA(net(), momentum=0.1, flat=True, compile=True)
    run(eager, 1)
    with pytest.warns(RuntimeWarning, match="could not compile its update"):
        run(compiled, 1)
    run(eager, 3)
    run(compiled, 3)
    assert not any(fused(compiled))
    for k, a in compiled.state_dict()["master"].items():
        assert torch.equal(a, eager.state_dict()["master"][k]), k


def test_handler_passes_compile_through():
    assert EMAHandler(net(), flat=True, compile=True).ema.compile
