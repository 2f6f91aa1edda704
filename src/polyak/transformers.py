"""polyak for the Hugging Face ``Trainer``: :class:`EMACallback` (``pip install "polyak[hf]"``).

The ``Trainer`` has no EMA; this callback keeps a :class:`polyak.EMA` of the model through
``trainer.train()``: updated once per optimizer step (``on_step_end``: after gradient accumulation),
evaluated with the EMA's weights, saved into every checkpoint folder as safetensors beside the model's
files, restored by ``trainer.train(resume_from_checkpoint=...)``, and written at the end in the model's own
``save_pretrained`` format, so that ``AutoModel.from_pretrained(folder)`` loads the averaged model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from polyak._extras import require

require("transformers", "polyak.transformers")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_model, save_file, save_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging  # noqa: E402

from polyak.ema import EMA  # noqa: E402
from polyak.schedules import Schedule, _callback_schedule  # noqa: E402

__all__ = ["EMACallback"]

logger = logging.get_logger(__name__)

WEIGHTS_NAME = "ema.safetensors"
"""The EMA's weights in a checkpoint folder (with its update count in the file's metadata)."""
MASTERS_NAME = "ema_master.safetensors"
"""The float32 masters of a low-precision model's EMA, beside it."""


class EMACallback(TrainerCallback):
    """An exponential moving average of the model's weights, for ``transformers.Trainer``.

    Args:
        momentum: weight of the online model in each update, in (0, 1); or ``decay = 1 - momentum``; neither:
            ``decay=0.999``.
        decay: timm's and diffusers' convention: ``momentum = 1 - decay``.
        schedule: a callable ``k -> momentum`` (see :mod:`polyak.schedules`), instead of the two above.
        copy_first: how many updates copy the online weights before the averaging starts (a delayed start;
            see :class:`polyak.EMA`).
        evaluate: evaluate with the EMA's weights (the trainer's evaluations during ``train()``); the online
            weights are back, bit for bit, when the evaluation ends (``on_evaluate``) or, if it failed, at the
            next step, save or the end of training.
        final_dir: where ``on_train_end`` writes the EMA model with ``save_pretrained`` (a folder, relative to
            ``args.output_dir``), or None. The model itself keeps its online weights.
        dtype, handle_buffers, skip_nonfinite, device, flat, include, exclude, predicate, trainable_only:
            as for :class:`polyak.EMA` (a bf16 model is averaged in a float32 master by default).

    Attributes:
        ema: the :class:`polyak.EMA`, built by ``on_train_begin`` (None before).

    Example:
        >>> from polyak.transformers import EMACallback
        >>> callback = EMACallback(decay=0.999)   # Trainer(..., callbacks=[callback])
        >>> callback.ema is None
        True
    """

    def __init__(
        self,
        momentum: float | None = None,
        *,
        decay: float | None = None,
        schedule: Schedule | None = None,
        copy_first: int = 0,
        evaluate: bool = True,
        final_dir: str | None = "ema",
        dtype: torch.dtype | None = None,
        handle_buffers: str = "copy",
        skip_nonfinite: bool = False,
        device: torch.device | str | None = None,
        flat: bool = False,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predicate: Callable[[str, torch.Tensor], bool] | None = None,
        trainable_only: bool = False,
    ) -> None:
        schedule, self.copy_first = _callback_schedule(momentum, decay, schedule, copy_first, copy_first_default=0)
        if final_dir is not None and not isinstance(final_dir, (str, os.PathLike)):
            raise TypeError(f"final_dir must be a folder name or None, got {final_dir!r}")
        self.schedule = schedule
        self.evaluate = bool(evaluate)
        self.final_dir = final_dir
        self._options: dict[str, Any] = dict(
            dtype=dtype,
            handle_buffers=handle_buffers,
            skip_nonfinite=skip_nonfinite,
            device=device,
            flat=flat,
            include=include,
            exclude=exclude,
            predicate=predicate,
            trainable_only=trainable_only,
        )
        self.ema: EMA | None = None
        self._swap: Any = None

    # -- building, and resuming ----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if self.ema is None:
            if model is None:
                raise ValueError("EMACallback needs the model: the Trainer passes it to on_train_begin")
            self.ema = EMA(model, schedule=self.schedule, **self._options)
        if state.global_step > 0:  # resuming: the checkpoint of that step holds the EMA
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (folder / WEIGHTS_NAME).is_file():
                self.load(folder)
            else:
                logger.warning(
                    f"polyak: resuming at step {state.global_step}, but {folder / WEIGHTS_NAME} does not exist: the "
                    "EMA starts from the model's weights (call callback.load(checkpoint_folder) to take it from "
                    "elsewhere)"
                )

    # -- updating --------------------------------------------------------------------------------------------------
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()
        if self.ema is not None:
            self.ema.update()
            if self.evaluate and control.should_evaluate:
                self._enter()  # the evaluation that follows this step runs with the EMA's weights

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.evaluate and control.should_evaluate:
            self._enter()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()

    def _enter(self) -> None:
        if self._swap is None and self.ema is not None and self.ema.num_updates > 0:
            self._swap = self.ema.swapped()
            self._swap.__enter__()

    def _leave(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.__exit__(None, None, None)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()
        if self.ema is not None and state.is_world_process_zero:
            self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()
        if self.ema is None or self.final_dir is None or not state.is_world_process_zero:
            return
        model = self.ema.ema_model
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(Path(args.output_dir) / self.final_dir)
        else:
            self.save(Path(args.output_dir) / self.final_dir)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the EMA into ``folder`` (created if missing): its weights as ``ema.safetensors`` (with the
        update counts in the file's metadata) and, for a low-precision model, its float32 masters beside."""
        assert self.ema is not None, "the EMA is built by on_train_begin"
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.ema.state_dict()
        metadata = {"format": "polyak.transformers", "num_updates": str(state["num_updates"])}
        metadata["num_skipped"] = str(state["num_skipped"])
        save_model(self.ema.ema_model, str(folder / WEIGHTS_NAME), metadata=metadata)
        if "master" in state:
            save_file({k: v.contiguous() for k, v in state["master"].items()}, str(folder / MASTERS_NAME))
        return folder / WEIGHTS_NAME

    def load(self, folder: str | os.PathLike[str]) -> None:
        """Take the EMA from ``folder`` (written by :meth:`save`): weights, masters and counts, exactly."""
        assert self.ema is not None, "the EMA is built by on_train_begin"
        folder = Path(folder)
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != "polyak.transformers":
            raise ValueError(f"{folder / WEIGHTS_NAME} was not written by polyak's EMACallback: {json.dumps(metadata)}")
        weights = self.ema.ema_model
        load_model(weights, str(folder / WEIGHTS_NAME))
        state: dict[str, Any] = {
            "num_updates": int(metadata["num_updates"]),
            "num_skipped": int(metadata.get("num_skipped", 0)),
            "ema_model": weights.state_dict(),
        }
        if (folder / MASTERS_NAME).is_file():
            with safe_open(str(folder / MASTERS_NAME), framework="pt") as f:
                state["master"] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        self.ema.load_state_dict(state)
