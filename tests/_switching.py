"""What the switching-guide tests (``test_switch_*.py``) share: running a page's named block in a folder of its
own, the small BatchNorm model they train, two training loops, and the comparison of two EMAs' state dicts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from _docs import named, run_block


def run(page: Path, name: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run ``page``'s block named ``name`` in ``folder``; its namespace."""
    monkeypatch.chdir(folder)
    return run_block(named(page, name))


def assert_same_average(
    theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """The same keys; floating tensors equal to float32 rounding (``rtol``, ``atol``), the others exactly."""
    assert theirs.keys() == ours.keys()
    for k, v in ours.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, theirs[k], rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(v, theirs[k]), k


def small_model(inputs: int = 8) -> nn.Module:
    """Linear, BatchNorm, ReLU, Linear, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """:func:`small_model` of 4 inputs, 256 inputs and their targets (the sum of each)."""
    model = small_model(4)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
    return model, x, x.sum(1, keepdim=True)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, after_step: Callable[[], None]) -> None:
    """``steps`` SGD steps on random batches of 32 of ``(x, y)``, calling ``after_step()`` after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (32,), generator=g)
        loss = (model(x[batch]) - y[batch]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step()


def train_on_random(model: nn.Module, steps: int, after_step: Callable[[int], None], seed: int = 1) -> None:
    """``steps`` SGD steps of :func:`small_model` on fresh random batches, ``after_step(step)`` after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x = torch.randn(32, 8, generator=data)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step(step)
