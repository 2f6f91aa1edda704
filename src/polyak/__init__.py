"""polyak: exponential moving averages of PyTorch model weights.

``import polyak`` needs only torch; :class:`EMAHandler` (for pytorch-ignite) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polyak import schedules
from polyak.ema import EMA

if TYPE_CHECKING:
    from polyak.ignite import EMAHandler

__all__ = ["EMA", "EMAHandler", "schedules"]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name == "EMAHandler":
        from polyak.ignite import EMAHandler

        return EMAHandler
    raise AttributeError(f"module 'polyak' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"EMAHandler"})
