"""The registry of models to benchmark: ``SHAPES`` maps a key to a :class:`Shape`.

To add one, decorate a zero-argument builder returning a fresh ``nn.Module`` with :func:`register`. The
builder is called once per shape for the implementations that share the online model, and once more for
each implementation that changes the model it is given (``flat=True`` rebinds the parameters' storage).
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


def dtypes(model: nn.Module) -> set[torch.dtype]:
    """The dtypes of the floating tensors of ``model``."""
    return {t.dtype for t in floating_tensors(model)}


def is_low_precision(model: nn.Module) -> bool:
    """Whether ``model`` holds float16 or bfloat16 tensors (those that polyak averages in a float32 master)."""
    return bool(dtypes(model) & {torch.float16, torch.bfloat16})


class ManyParams(nn.Module):
    """``count`` parameters of ``size`` elements each, registered directly: many small tensors."""

    def __init__(self, count: int, size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(torch.randn(size, dtype=dtype)) for _ in range(count))


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU-conv-BN plus a (1x1 conv + BN where the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


CONVBN_WIDTHS = (16, 32, 64)


@register(
    "linear",
    "nn.Linear(2, 1), float32: 3 elements, so the time is all per-call overhead",
)
def linear() -> nn.Module:
    return nn.Linear(2, 1)


@register(
    "convbn",
    "a small ResNet-style conv+BatchNorm stack, float32: stem conv3x3+BN, 3 stages x 2 basic blocks "
    f"({'/'.join(map(str, CONVBN_WIDTHS))} channels), linear head; BatchNorm buffers included",
)
def convbn() -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, CONVBN_WIDTHS[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(CONVBN_WIDTHS[0]),
        nn.ReLU(),
    ]
    cin = CONVBN_WIDTHS[0]
    for i, width in enumerate(CONVBN_WIDTHS):
        layers += [BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


@register("many-small", "2000 parameters x 1024 float32 (nn.ParameterList)")
def many_small() -> nn.Module:
    return ManyParams(2000, 1024)


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(768, nhead=12, dim_feedforward=3072, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)


@register("transformer", "nn.TransformerEncoder: 12 layers, d_model=768, nhead=12, ff=3072, float32")
def transformer() -> nn.Module:
    return _encoder()


@register(
    "transformer-bf16",
    "the same nn.TransformerEncoder in bfloat16 (polyak's default averages it in a float32 master)",
)
def transformer_bf16() -> nn.Module:
    return _encoder().to(torch.bfloat16)
