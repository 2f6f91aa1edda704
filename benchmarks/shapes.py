"""The registry of models to benchmark: ``SHAPES`` maps a key to a :class:`Shape`.

To add one, decorate a zero-argument builder returning a fresh ``nn.Module`` with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    build: Callable[[], nn.Module]


SHAPES: dict[str, Shape] = {}


def register(key: str, title: str) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    def decorator(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if key in SHAPES:
            raise ValueError(f"shape {key!r} registered twice")
        SHAPES[key] = Shape(key, title, build)
        return build

    return decorator


def floating_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The floating (and complex) parameters and buffers of ``model``, each tensor once."""
    seen: set[int] = set()
    out = []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and (t.is_floating_point() or t.is_complex()):
            seen.add(id(t))
            out.append(t)
    return out


class ManyParams(nn.Module):
    """``count`` parameters of ``size`` elements each, registered directly: many small tensors."""

    def __init__(self, count: int, size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(torch.randn(size, dtype=dtype)) for _ in range(count))


@register("many-small", "2000 params x 1024 float32 (nn.ParameterList)")
def many_small() -> nn.Module:
    return ManyParams(2000, 1024)


@register("transformer", "nn.TransformerEncoder: 12 layers, d_model=768, nhead=12, ff=3072, float32")
def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(768, nhead=12, dim_feedforward=3072, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)


@register("linear-2x1", "nn.Linear(2, 1) float32 (3 elements: pure overhead)")
def linear() -> nn.Module:
    return nn.Linear(2, 1)
