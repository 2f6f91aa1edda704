"""Warnings reported at the user's line: the first frame outside polyak and the trainer that calls it."""

from __future__ import annotations

import sys
import warnings

# a warning raised while torch or a trainer drives polyak (an optimizer's step hook, Lightning's callback hooks,
# ignite's events and Checkpoint.load_objects, transformers' Trainer) is reported past their frames too, at the
# user's optimizer.step() or trainer.fit(...) line
_SKIPPED = frozenset(
    {"polyak", "torch", "lightning", "pytorch_lightning", "lightning_fabric", "ignite", "transformers"}
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first frame of the caller's code (or the outermost frame)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the frame that called warn()
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _SKIPPED:
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
