"""polyak for Lightning: :class:`EMACallback` and :class:`PostHocEMACallback` (``pip install "polyak[lightning]"``).

:class:`EMACallback` keeps a :class:`polyak.EMA` of the LightningModule's weights through ``trainer.fit``,
updated once per optimizer step, evaluates with the averaged weights in validation, test and predict, and
puts both weight sets in every checkpoint. It takes what Lightning's own ``EMAWeightAveraging`` takes
(``decay``, ``update_every_n_steps``, ``update_starting_at_step``, ``update_starting_at_epoch``, ``device``,
``should_update``) and everything of :class:`polyak.EMA`: schedules, a float32 master for bf16 models, a sharded
EMA, parameter selection, ``skip_nonfinite``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from polyak._extras import require

require("lightning", "polyak.lightning")

import torch  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback, WeightAveraging  # noqa: E402
from lightning.pytorch.utilities.rank_zero import rank_zero_info  # noqa: E402
from torch import nn  # noqa: E402

from polyak._warn import warn  # noqa: E402
from polyak.ema import EMA, _check_options  # noqa: E402
from polyak.posthoc import PostHocEMA  # noqa: E402
from polyak.schedules import Schedule, _callback_schedule, _check_int  # noqa: E402

__all__ = ["EMACallback", "PostHocEMACallback"]

_STAGES = ("validate", "test", "predict")


class _StepCounter:
    """Counts training steps: batches in which an optimizer stepped (``trainer.global_step`` advanced; with
    several optimizers stepping in one batch, manual optimization, it advances by each but counts once), and
    calls the callback's ``_after_step`` at each batch's end, and when training starts for a step that the file
    resumed from had not counted."""

    _seen_steps = 0  # training steps seen
    _last_global_step = 0
    _loaded_global_step: int | None = None  # the last_global_step of the state this fit resumed from

    def _stepped(self, trainer: Trainer) -> bool:
        if trainer.global_step <= self._last_global_step:
            return False  # no optimizer step in this batch (accumulating gradients)
        self._last_global_step = trainer.global_step
        self._seen_steps += 1
        return True

    def _sync_global_step(self, trainer: Trainer) -> bool:
        """When training starts (after a checkpoint restored the trainer's loops): a resumed run, or a second fit
        with a new Trainer whose global_step starts again at 0, counts its next optimizer step and no batch
        before. True when the file resumed from was written after an optimizer step and before this callback
        counted it (by a callback before this one, in ``on_train_batch_end``): the caller counts it now, from the
        weights the file restored, as it would have in that hook."""
        loaded, self._loaded_global_step = self._loaded_global_step, None
        if loaded is not None and loaded < trainer.global_step:
            self._last_global_step = loaded
            return True
        self._last_global_step = trainer.global_step
        return False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sync_global_step(trainer):
            self._after_step(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._after_step(trainer)

    def _after_step(self, trainer: Trainer) -> None:
        """What the callback does after an optimizer step (``self._stepped(trainer)`` tells)."""
        raise NotImplementedError

    def _counter_state(self) -> dict[str, int]:
        return {"seen_steps": self._seen_steps, "last_global_step": self._last_global_step}

    def _load_counters(self, state: Mapping[str, Any]) -> None:
        counters = {
            k: _check_int(f"state_dict[{k!r}]", state[k], 0) for k in ("seen_steps", "last_global_step") if k in state
        }
        for key, value in counters.items():
            setattr(self, f"_{key}", value)
        self._loaded_global_step = counters.get("last_global_step")


class _Swapping:
    """Evaluation with the EMA's weights: enters :meth:`polyak.EMA.swapped` at an evaluation epoch's start and
    leaves it at the loop's end (after the module's ``on_*_epoch_end``), or when a hook raises
    (``on_exception``)."""

    _swap: contextlib.AbstractContextManager[Any] | None = None
    _said_not_yet = False

    def _enter(self, ema: EMA | None) -> None:
        if ema is None or self._swap is not None:
            return
        if ema.num_updates == 0:  # Lightning's evaluates a never-updated copy (#21724): not this one
            if not self._said_not_yet:
                rank_zero_info("polyak: no EMA update yet: this evaluation uses the online weights")
                self._said_not_yet = True
            return
        self._swap = ema.swapped()
        self._swap.__enter__()

    def _leave(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.__exit__(None, None, None)


def _trainer_fn(pl_module: LightningModule) -> str:
    """What the Trainer runs: "fit", "validate", "test" or "predict"."""
    fn = pl_module.trainer.state.fn
    return "fit" if fn is None else str(fn.value)


def _key_of(momentum: object, decay: object, schedule: object) -> dict[str, object]:
    """What tells two EMACallbacks apart in a checkpoint: the momentum, or the schedule by its name (a repr
    with an address would change from process to process)."""
    if schedule is None:
        m = momentum if momentum is not None else 1.0 - (0.999 if decay is None else decay)  # type: ignore[operator]
        return {"momentum": m}
    text = repr(schedule)
    if " at 0x" in text:
        text = f"{getattr(schedule, '__module__', '')}.{getattr(schedule, '__qualname__', type(schedule).__qualname__)}"
    return {"schedule": text}


class EMACallback(_StepCounter, _Swapping, Callback):
    r"""An exponential moving average of the LightningModule's weights, for ``lightning.Trainer``.

    Hooks and what they do:

    * ``setup``: a ``fit`` of another module than the EMA's builds a new EMA (a sweep that builds its callbacks
      once); a ``fit`` of the same module continues it. The first ``EMACallback`` of a Trainer evaluates and
      writes ``state_dict``; a second (another momentum) must be given ``validate=False, test=False,
      predict=False, weights_at_end="online"`` (else a ``ValueError``), and keeps its weights in its own state.
    * ``on_fit_start`` (after the strategy set the module up: moved, converted by ``precision="bf16-true"``,
      wrapped or sharded) builds the :class:`~polyak.EMA` (``callback.ema``); a checkpoint being resumed is
      loaded into it then. A second ``fit`` of a module that still holds the EMA's weights that the first put
      there trains on from its online weights, put back.
    * ``on_train_start`` takes the Trainer's ``global_step`` (restored from a checkpoint, or 0 in a new Trainer),
      so that the next optimizer step is counted and no micro-batch before it. A file written between an
      optimizer step and this callback's update of it (``trainer.save_checkpoint`` in the ``on_train_batch_end``
      of a callback listed before this one) is resumed with that update, made then from the restored weights.
    * ``on_train_batch_end`` updates it once per optimizer step (not per batch: right under
      ``accumulate_grad_batches`` and manual optimization), when :meth:`should_update` says so. With
      ``update_every_n_steps=n`` and ``per_step=True`` (the default) an update after ``n`` steps uses
      ``1 - (1 - m) ** n``, so the EMA's length does not depend on ``n``.
    * ``on_train_epoch_end`` updates once more when :meth:`should_update` says so for the epoch (only with
      ``update_starting_at_epoch``, as Lightning's).
    * ``on_{validation,test,predict}_epoch_start`` to ``on_{validation,test,predict}_end`` evaluate with the
      EMA's weights in the module (its values trade places with the EMA model's, no copy of the model): the
      steps and the module's own ``on_*_epoch_start/end`` hooks see them (samples drawn at an epoch's end are
      the EMA's). The online weights come back bit for bit after, also when a hook raises (``on_exception``).
      Before the first update the online weights are evaluated (a never-updated EMA is not worth evaluating),
      with one log line. Outside ``fit`` with
      ``ckpt_path=``, the module holds the file's ``state_dict``, its EMA, and nothing is swapped (the
      callback's own EMA is left as it was); with the loop's switch off, the file's ``current_model_state``.
    * ``on_train_end``: with ``weights_at_end="ema"`` (Lightning's choice) the module keeps the EMA's weights
      after ``fit``, and the online ones are kept aside (one copy) for the checkpoints written after it
      (``last.ckpt``, ``trainer.save_checkpoint``) and for a second ``fit``; with ``"online"`` its own.
    * ``on_save_checkpoint``: the checkpoint's ``state_dict`` holds the EMA's weights (so that the best
      checkpoint of ``ModelCheckpoint`` is the averaged model, and loading it for inference needs no
      polyak), ``current_model_state`` the online ones (whatever hook writes the file: inside an evaluation,
      after ``fit``), ``averaging_state`` the update count as Lightning's ``EMAWeightAveraging`` reads it (a
      run can go back to it), and the callback's state (``checkpoint["callbacks"][callback.state_key]``)
      the update count, the float32 masters and the step counters; only tensors and plain values, so the
      file loads with ``torch.load(weights_only=True)``. A sharded EMA (FSDP2 through
      ``ModelParallelStrategy``) leaves ``state_dict`` to the strategy (the online weights, written shard by
      shard) and puts the EMA in the callback's state, gathered whole (masters included, so resuming is
      exact on any number of ranks).
    * ``on_load_checkpoint``: resuming with ``Trainer(ckpt_path=...)`` continues exactly as an uninterrupted
      run. A checkpoint of Lightning's ``EMAWeightAveraging`` is taken too (its ``n_averaged`` as the count),
      and one without any EMA starts the EMA from its weights; each says so in one log line.

    Args:
        momentum: weight of the online model in each update (polyak's convention), in (0, 1); or give
            ``decay = 1 - momentum`` (Lightning's); neither: ``decay=0.999``.
        decay: Lightning's and timm's convention: ``momentum = 1 - decay``.
        schedule: a callable ``k -> momentum`` (see :mod:`polyak.schedules`), instead of the two above.
        copy_first: how many updates copy the online weights before the averaging starts (see
            :class:`polyak.EMA`); by default 1 (the first update copies, as in Lightning's), or 0 with a
            ``schedule``.
        update_every_n_steps: update after every ``n``-th optimizer step.
        update_starting_at_step: no update before this optimizer step (0-based, as Lightning counts).
        update_starting_at_epoch: also update at the end of each epoch from this one on (Lightning's).
        validate, test, predict: evaluate with the EMA's weights in these loops.
        weights_at_end: ``"ema"`` or ``"online"``: what the module holds after ``fit``.
        ema_model: a callable ``pl_module -> module`` that builds the EMA module (not a module: a
            ``TypeError`` says so), for modules that cannot be deep-copied (FSDP2 through
            ``ModelParallelStrategy``: build it sharded like the module).
        per_step, handle_buffers, dtype, stochastic_rounding, seed, skip_nonfinite: as for
            :class:`polyak.EMA`; ``handle_buffers`` defaults to ``"update"`` here (Lightning's averages
            buffers too).
        device, flat, compile, include, exclude, predicate, trainable_only: as for :class:`polyak.EMA`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import lightning as L
        >>> from polyak.lightning import EMACallback
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = nn.Linear(4, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         return self.layer(batch).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> ema = EMACallback(decay=0.99)
        >>> trainer = L.Trainer(max_steps=5, callbacks=[ema], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(torch.randn(20, 4), batch_size=4))
        >>> ema.ema.num_updates
        5
    """

    def __init__(
        self,
        momentum: float | None = None,
        *,
        decay: float | None = None,
        schedule: Schedule | None = None,
        copy_first: int | None = None,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        validate: bool = True,
        test: bool = True,
        predict: bool = True,
        weights_at_end: str = "ema",
        ema_model: Callable[[LightningModule], nn.Module] | None = None,
        per_step: bool = True,
        handle_buffers: str = "update",
        dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        skip_nonfinite: bool = False,
        device: torch.device | str | None = None,
        flat: bool = False,
        compile: bool = False,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predicate: Callable[[str, torch.Tensor], bool] | None = None,
        trainable_only: bool = False,
    ) -> None:
        key = _key_of(momentum, decay, schedule)  # before the schedule is resolved
        schedule, self.copy_first = _callback_schedule(momentum, decay, schedule, copy_first, copy_first_default=1)
        self._key = key
        self.update_every_n_steps = _check_int("update_every_n_steps", update_every_n_steps, 1)
        self.update_starting_at_step = (
            None
            if update_starting_at_step is None
            else _check_int("update_starting_at_step", update_starting_at_step, 0)
        )
        self.update_starting_at_epoch = (
            None
            if update_starting_at_epoch is None
            else _check_int("update_starting_at_epoch", update_starting_at_epoch, 0)
        )
        if weights_at_end not in ("ema", "online"):
            raise ValueError(f"weights_at_end must be 'ema' or 'online', got {weights_at_end!r}")
        if isinstance(ema_model, nn.Module) or (ema_model is not None and not callable(ema_model)):
            raise TypeError(
                "ema_model must be a callable pl_module -> module that builds the EMA module (e.g. "
                f"lambda pl_module: Net()), got {type(ema_model).__name__} {ema_model!r}"
            )
        self.evaluate = {"validate": bool(validate), "test": bool(test), "predict": bool(predict)}
        self.weights_at_end = weights_at_end
        self.schedule = schedule
        self._ema_model_factory = ema_model
        self._options: dict[str, Any] = dict(
            per_step=per_step,
            handle_buffers=handle_buffers,
            dtype=dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            skip_nonfinite=skip_nonfinite,
            device=device,
            flat=flat,
            compile=compile,
            include=include,
            exclude=exclude,
            predicate=predicate,
            trainable_only=trainable_only,
        )
        _check_options(**self._options)  # now, not when fit starts
        self.ema: EMA | None = None
        self._last_update_step = 0
        self._last_update_epoch = -1
        self._pending: dict[str, Any] = {}  # what a checkpoint holds for the EMA, until on_fit_start builds it
        # the online weights while the module holds the EMA's after fit (weights_at_end="ema"): what a checkpoint
        # written then calls current_model_state, and what a second fit of the same module trains on
        self._online_aside: dict[str, torch.Tensor] | None = None
        self._evaluating_checkpoint = False  # validate/test/predict(ckpt_path=...): the module holds the file's
        self._first = True  # the first EMACallback of its Trainer (the one that writes state_dict)

    @property
    def state_key(self) -> str:
        """The key of this callback's state in ``checkpoint["callbacks"]``: from its momentum or schedule, so
        that two EMACallbacks of different momenta save apart (two alike are refused by Lightning)."""
        return self._generate_state_key(**self._key)

    # -- when ------------------------------------------------------------------------------------------------
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update after optimizer step ``step_idx`` (0-based) or at the end of epoch ``epoch_idx``.

        Lightning's extension point, with its semantics: after a step, when ``step_idx`` is past
        ``update_starting_at_step`` and a multiple of ``update_every_n_steps``; at an epoch's end, when
        ``update_starting_at_epoch`` is set and reached. Override it to decide otherwise.
        """
        if step_idx is not None:
            started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            if started and step_idx % self.update_every_n_steps == 0:
                return True
        return (
            epoch_idx is not None
            and self.update_starting_at_epoch is not None
            and epoch_idx >= self.update_starting_at_epoch
        )

    # -- building the EMA --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._evaluating_checkpoint = False
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        theirs = [type(c).__name__ for c in callbacks if isinstance(c, WeightAveraging)]
        if theirs:
            raise ValueError(
                f"EMACallback and Lightning's {theirs[0]} in one Trainer: both put their average in the module and "
                "in the checkpoint's state_dict, and each would take the other's for the online weights; use one"
            )
        ours = [c for c in callbacks if isinstance(c, EMACallback)]
        self._first = not ours or ours[0] is self
        weights_only = [c for c in trainer.checkpoint_callbacks if getattr(c, "save_weights_only", False)]
        if stage == "fit" and self._first and weights_only and trainer.is_global_zero:
            warn(
                "ModelCheckpoint(save_weights_only=True) with EMACallback: Lightning calls no callback when it writes "
                "those files, so they hold the module's own (online) weights and no EMA, although validation (and "
                "so their monitor's scores) ran with the EMA's; for files of the EMA's weights, use "
                "save_weights_only=False (their state_dict is the EMA's)"
            )
        if not self._first and (any(self.evaluate.values()) or self.weights_at_end == "ema"):
            raise ValueError(
                f"a second EMACallback in one Trainer must leave the module to the first ({ours[0]!r}): pass it "
                "validate=False, test=False, predict=False, weights_at_end='online' (its EMA is saved in its own "
                f"state), got {', '.join(f'{k}={v}' for k, v in self.evaluate.items())}, "
                f"weights_at_end={self.weights_at_end!r} for {self!r}"
            )
        if stage == "fit" and self.ema is not None and self.ema.model is not pl_module:
            rank_zero_info("polyak: this EMACallback fits another module: a new EMA of it (the previous is dropped)")
            self._forget()

    def _forget(self) -> None:
        self.ema = None
        self._seen_steps = self._last_global_step = self._last_update_step = 0
        self._last_update_epoch = -1
        self._pending = {}
        self._online_aside = None
        self._said_not_yet = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.ema is None:
            ema_model = None
            if self._ema_model_factory is not None:
                ema_model = self._ema_model_factory(pl_module)
                if not isinstance(ema_model, nn.Module):
                    raise TypeError(
                        f"ema_model must return the EMA module (an nn.Module), got {type(ema_model).__name__}"
                    )
            self.ema = EMA(pl_module, schedule=self.schedule, ema_model=ema_model, **self._options)
        elif self._online_aside is not None and self._holds_the_ema(pl_module):
            # a second fit of the module that ended the first holding the EMA's weights: it trains on
            rank_zero_info("polyak: a second fit of the same module: it trains on from its online weights")
            pl_module.load_state_dict(self._online_aside)
        self._online_aside = None
        if self._pending:
            self._restore()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the epoch, too: a new Trainer's second fit counts its epochs from 0 again (a resume from where it stopped)
        self._last_update_epoch = trainer.current_epoch - 1
        super().on_train_start(trainer, pl_module)

    # -- updating ----------------------------------------------------------------------------------------------
    def _after_step(self, trainer: Trainer) -> None:
        if self.ema is None or not self._stepped(trainer):
            return
        if self.should_update(step_idx=self._seen_steps - 1):
            steps = self._seen_steps - self._last_update_step
            self.ema.update(steps=steps if self.ema.per_step else 1)
            self._last_update_step = self._seen_steps

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.ema is not None and epoch > self._last_update_epoch and self.should_update(epoch_idx=epoch):
            self.ema.update()
            self._last_update_epoch = epoch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave()
        if self.weights_at_end == "ema" and self.ema is not None and self.ema.num_updates > 0:
            if not self._sharded():  # (a sharded module's file is written by the strategy, from the module)
                # kept aside: a checkpoint written from now on (ModelCheckpoint's last.ckpt runs after this hook)
                # still knows the online weights, and a second fit trains on from them
                self._online_aside = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.ema.copy_to(pl_module)

    def _holds_the_ema(self, pl_module: LightningModule) -> bool:
        """Whether the module holds the EMA's weights as ``on_train_end`` left them (not changed since)."""
        assert self.ema is not None
        ema = self.ema.ema_model.state_dict()
        own = pl_module.state_dict()
        return own.keys() == ema.keys() and all(torch.equal(v, ema[k].to(v.device)) for k, v in own.items())

    # -- evaluating with the EMA's weights ---------------------------------------------------------------------
    def _evaluate_with_ema(self, stage: str, pl_module: LightningModule) -> None:
        if not self.evaluate[stage] or self._evaluating_checkpoint:
            return  # a checkpoint's evaluation: the module holds what the file's state_dict holds (the EMA's)
        if self.ema is None or self.ema.model is not pl_module:
            if not self._said_not_yet and _trainer_fn(pl_module) != "fit":
                rank_zero_info(
                    "polyak: this EMACallback holds no EMA of this module (no fit of it, and no checkpoint of an "
                    "EMACallback loaded): this evaluation uses the module's weights"
                )
                self._said_not_yet = True
            return
        self._enter(self.ema)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate_with_ema("validate", pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave()  # (not at the epoch's end: the module's own on_validation_epoch_end runs after the callbacks')

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate_with_ema("test", pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave()  # (not at the epoch's end: the module's own on_test_epoch_end runs after the callbacks')

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate_with_ema("predict", pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave()  # (not at the epoch's end: the module's own on_predict_epoch_end runs after the callbacks')

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._leave()

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The callback's part of a checkpoint: the EMA's state but its weights (those are the checkpoint's
        ``state_dict``), and the step counters."""
        state: dict[str, Any] = {
            **self._counter_state(),
            "last_update_step": self._last_update_step,
            "last_update_epoch": self._last_update_epoch,
        }
        if self.ema is not None:
            if self._sharded():  # the EMA whole (a collective: Lightning asks every rank), masters included
                with self._paused():
                    state["ema"] = self.ema.full_state_dict()
            else:  # its weights are the checkpoint's state_dict (on_save_checkpoint), or a second one's below
                state["ema"] = {k: v for k, v in self._ema_state().items() if k != "ema_model"}
        return state

    def _sharded(self) -> bool:
        return self.ema is not None and any(k.sharded is not None for k in self.ema._kernels)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if self._evaluating_checkpoint:
            return  # validate/test/predict(ckpt_path=...) leave this callback's EMA and counters as they are
        counters = {
            k: _check_int(f"state_dict[{k!r}]", state_dict[k], -1)
            for k in ("last_update_step", "last_update_epoch")
            if k in state_dict
        }
        if "ema" in state_dict and not isinstance(state_dict["ema"], Mapping):
            raise TypeError(f"state_dict['ema'] must be a mapping, got {type(state_dict['ema']).__name__}")
        self._load_counters(state_dict)
        self._last_update_step = counters.get("last_update_step", self._last_update_step)
        self._last_update_epoch = counters.get("last_update_epoch", self._last_update_epoch)
        if "ema" in state_dict:
            self._pending["ema"] = dict(state_dict["ema"])
            self._restore_when_ready()

    def _ema_state(self) -> dict[str, Any]:
        assert self.ema is not None
        with self._paused():  # inside an evaluation (a checkpoint saved there): the EMA's own state
            return self.ema.state_dict()

    @contextlib.contextmanager
    def _paused(self) -> Any:
        swapped = self._swap is not None
        self._leave()
        try:
            yield
        finally:
            if swapped:
                self._enter(self.ema)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._evaluating_checkpoint:
            # during or after validate/test/predict(ckpt_path=...) the module holds that file's weights, which are
            # neither this callback's EMA nor the online weights it averages: a file of those weights, without this
            # callback's state (so that a fit resumed from it starts an EMA of them, not this one's of another run)
            callbacks = checkpoint.get("callbacks")
            if isinstance(callbacks, dict) and callbacks.pop(self.state_key, None) is not None:
                rank_zero_info(
                    "polyak: the module holds the weights of the checkpoint it was evaluated from (ckpt_path=): this "
                    "checkpoint holds them, without the EMACallback's state (a fit resumed from it starts the EMA "
                    "from them)"
                )
            return
        if self.ema is None or self.ema.model is not pl_module or self._sharded():
            # no EMA of this module: the module's own weights; a sharded EMA: the strategy writes state_dict shard
            # by shard, the online model's, and the EMA is in the callback's state, whole
            return
        if not self._first:  # a second EMACallback: its weights in its own state, state_dict is the first's
            own = checkpoint.get("callbacks", {}).get(self.state_key)
            if own is not None and "ema" in own:
                own["ema"]["ema_model"] = self._ema_state()["ema_model"]
            return
        if self._swap is not None:  # saved inside an evaluation: the module holds the EMA's weights
            averaged = checkpoint.get("state_dict")
            online = {k: v.detach().clone() for k, v in self.ema.ema_model.state_dict().items()}
        else:
            online = checkpoint.get("state_dict")
            averaged = self.ema.ema_model.state_dict()
            if self._online_aside is not None:
                if self._holds_the_ema(pl_module):  # after fit (weights_at_end="ema"): the module holds the EMA's
                    online = self._online_aside
                else:  # changed since: the module's weights are its own
                    self._online_aside = None
        checkpoint["current_model_state"] = online
        checkpoint["state_dict"] = averaged
        # what Lightning's EMAWeightAveraging reads to resume from this file (AveragedModel's n_averaged)
        device = next(iter(averaged.values())).device if averaged else None
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.ema.num_updates, device=device)}

    def _own_state(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return states[self.state_key]
        # a file of another momentum or of an older polyak ("EMACallback"): taken when it is the only one that no
        # callback of this Trainer claims
        claimed = {c.state_key for c in trainer.callbacks}  # type: ignore[attr-defined]
        others = [
            v for k, v in states.items() if isinstance(k, str) and k.startswith("EMACallback") and k not in claimed
        ]
        if len(others) == 1 and isinstance(others[0], Mapping) and "last_update_step" in others[0]:
            self.load_state_dict(others[0])
            return others[0]
        return None

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._online_aside = None  # the module is loaded from the file
        online = checkpoint.get("current_model_state")
        stage = _trainer_fn(pl_module)
        if stage != "fit":
            # validate/test/predict(ckpt_path=...): the module has loaded the file's state_dict, the EMA's weights
            # when an EMA callback wrote it; this callback's EMA (of a fit before) is not the file's
            self._evaluating_checkpoint = True
            if not self.evaluate.get(stage, True) and online is not None and self._first:
                pl_module.load_state_dict(online)  # evaluation with the online weights asked for
            own = (checkpoint.get("callbacks") or {}).get(self.state_key)
            if self._first and online is None and isinstance(own, Mapping) and "ema_model" in own.get("ema", {}):
                rank_zero_info(
                    "polyak: this checkpoint keeps its EMA in the callback's state (a sharded EMA): this evaluation "
                    "uses the file's state_dict, the online weights"
                )
            return
        own = self._own_state(trainer, checkpoint)
        if not self._first:  # a second EMACallback leaves the module to the first
            if own is not None and "ema" in own and "ema_model" not in own["ema"]:
                self._pending["weights"] = checkpoint.get("state_dict")  # it was the first then: its weights
                self._restore_when_ready()
            elif own is None or "ema_model" not in own.get("ema", {}):
                rank_zero_info(f"polyak: this checkpoint holds no state of {self!r}: its EMA starts from its weights")
                self._pending["ema"] = {"num_updates": 0}
                self._pending["weights"] = online if online is not None else checkpoint.get("state_dict")
                self._restore_when_ready()
            return
        if online is not None:
            pl_module.load_state_dict(online)  # the module loaded the EMA's weights from state_dict: undo that
        if own is not None and "ema_model" in own.get("ema", {}):
            return  # a sharded EMA's checkpoint: the module holds its own weights, the callback's state the EMA
        if own is None:
            count = 0
            if online is not None and "averaging_state" in checkpoint:
                count = int(checkpoint["averaging_state"].get("n_averaged", 0))
                rank_zero_info(
                    "polyak: this checkpoint was written by Lightning's EMAWeightAveraging: its averaged weights and "
                    f"its count ({count} updates) start the EMA"
                )
            else:
                rank_zero_info("polyak: this checkpoint holds no EMA: the EMA starts from its weights")
            self._pending["ema"] = {"num_updates": count}
        self._pending["weights"] = checkpoint.get("state_dict")
        self._restore_when_ready()

    def _restore_when_ready(self) -> None:
        pending = self._pending
        if self.ema is not None and "ema" in pending and ("weights" in pending or "ema_model" in pending["ema"]):
            self._restore()

    def _restore(self) -> None:
        assert self.ema is not None
        state = dict(self._pending.get("ema", {}))
        state.setdefault("num_updates", 0)
        if "ema_model" not in state:
            weights = self._pending.get("weights")
            state["ema_model"] = weights if weights is not None else self.ema.ema_model.state_dict()
        self._pending = {}
        self.ema.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r}, ema={self.ema!r})"


class PostHocEMACallback(_StepCounter, Callback):
    """Post-hoc EMA (EDM2) for ``lightning.Trainer``: a :class:`polyak.posthoc.PostHocEMA` of the module,
    updated once per optimizer step and snapshotted every ``snapshot_every`` updates into ``directory`` (by
    rank 0), with a last snapshot when ``fit`` ends. Resumable: its state (every profile's EMA and the run's
    id) goes into the checkpoint's ``callbacks`` section. After training, ``polyak.posthoc.synthesize`` (or
    ``python -m polyak posthoc``) rebuilds the EMA of any ``sigma_rel``.

    The folder is claimed at the first snapshot (or when a checkpoint is resumed) and given back
    (:meth:`polyak.posthoc.PostHocEMA.close`) when ``fit`` ends or raises, so that another object may write
    into it then; a later snapshot claims it again. A second ``fit`` of the same module continues its ``PostHocEMA``
    (``callback.posthoc``) in the same folder. A ``fit`` of another module (a sweep that builds its callbacks
    once) closes the first module's and tracks the new one in a new run, built from ``callback.directory``
    then; a folder that holds another run's snapshots is refused with a ``ValueError`` before training starts
    (a synthesis would mix the two runs): give each fit its own folder (set ``callback.directory``), or resume
    that run with ``ckpt_path``.

    Args:
        sigma_rels, snapshot_every, directory: as for :class:`~polyak.posthoc.PostHocEMA`; kept as attributes,
            read when the callback builds its ``PostHocEMA`` (at the first ``fit`` of a module).
        snapshot_at_end: write a snapshot of every profile when ``fit`` ends (unless one was just written).
        kwargs: keyword-only options of :class:`~polyak.posthoc.PostHocEMA` (``dtype``, ``device``,
            ``trainable_only``, ...).
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        directory: str = "posthoc_ema",
        *,
        snapshot_at_end: bool = True,
        **kwargs: Any,
    ) -> None:
        self.sigma_rels = sigma_rels
        self.snapshot_every = snapshot_every
        self.directory = directory
        self._kwargs = kwargs
        self.snapshot_at_end = bool(snapshot_at_end)
        self.posthoc: PostHocEMA | None = None
        self._pending: Mapping[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        p = self.posthoc
        if stage == "fit" and p is not None and p.emas[0].model is not pl_module:
            rank_zero_info(
                "polyak: this PostHocEMACallback fits another module: a new PostHocEMA of it, in a new run (the "
                "previous is closed)"
            )
            p.close()  # its folder's lock, before the new run looks at the folder
            self._forget()

    def _forget(self) -> None:
        self.posthoc = None
        self._pending = None
        self._seen_steps = self._last_global_step = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from polyak.posthoc._files import _is_writer, snapshot_runs

        if self.posthoc is None:
            self.posthoc = PostHocEMA(pl_module, self.sigma_rels, self.snapshot_every, self.directory, **self._kwargs)
        if self._pending is not None:
            self.posthoc.load_state_dict(self._pending)
            self._pending = None
        # refused now, not at the first snapshot after snapshot_every steps of training; rank 0 reads the folder
        # (the writer) and every rank raises, so that none waits for the others at a collective
        others = snapshot_runs(self.posthoc.directory) - {self.posthoc.run_id} if _is_writer() else set()
        refusal = None
        if others:
            refusal = (
                f"PostHocEMACallback(directory={str(self.posthoc.directory)!r}): the folder holds the snapshots of "
                f"another run ({', '.join(sorted(r or '(no id)' for r in others))}), which a synthesis would mix "
                "with this fit's: give this fit its own folder (directory=, or set callback.directory before fit), "
                "or resume that run with trainer.fit(..., ckpt_path=) from its checkpoint"
            )
        refusal = trainer.strategy.broadcast(refusal)
        if refusal is not None:
            if self.posthoc.num_updates == 0:
                self._forget()  # a new run that never started: the next fit builds it again, from self.directory
            raise ValueError(refusal)

    def _after_step(self, trainer: Trainer) -> None:
        if self.posthoc is not None and self._stepped(trainer):
            self.posthoc.update()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        p = self.posthoc
        if self.snapshot_at_end and p is not None and p.num_updates > 0 and p.num_updates % p.snapshot_every:
            p.snapshot()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.posthoc is not None:
            self.posthoc.close()  # (after the checkpoints written at the end of fit, which read no files)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.posthoc is not None:
            self.posthoc.close()  # Lightning calls no teardown after an exception

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self._counter_state()
        if self.posthoc is not None:
            state["posthoc"] = self.posthoc.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        self._load_counters(state_dict)
        if "posthoc" in state_dict:
            if self.posthoc is not None:
                self.posthoc.load_state_dict(state_dict["posthoc"])
            else:
                self._pending = state_dict["posthoc"]
