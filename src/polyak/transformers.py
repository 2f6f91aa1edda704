"""polyak for the Hugging Face ``Trainer``: :class:`EMACallback` (``pip install "polyak[hf]"``).

The ``Trainer`` has no EMA; this callback keeps a :class:`polyak.EMA` of the model through
``trainer.train()``: updated once per optimizer step (``on_step_end``: after gradient accumulation),
evaluated with the EMA's weights, saved into every checkpoint folder as safetensors beside the model's
files, restored by ``trainer.train(resume_from_checkpoint=...)`` from the folder the Trainer resumes from,
and written at the end in the model's own ``save_pretrained`` format, so that
``AutoModel.from_pretrained(folder)`` loads the averaged model.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from polyak._extras import require

require("transformers", "polyak.transformers")

import torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.torch import save_file, save_model  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging  # noqa: E402

from polyak.ema import EMA, _check_options  # noqa: E402
from polyak.schedules import Schedule, _callback_schedule  # noqa: E402

__all__ = ["EMACallback"]

logger = logging.get_logger(__name__)

WEIGHTS_NAME = "ema.safetensors"
"""The EMA's weights in a checkpoint folder (with its update count in the file's metadata); a callback with
``name="slow"`` writes ``ema-slow.safetensors``."""
MASTERS_NAME = "ema_master.safetensors"
"""The float32 masters of a low-precision model's EMA, beside it (``ema_master-slow.safetensors``)."""
FORMAT = "polyak.transformers"
"""The ``format`` entry of the files' metadata."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_COUNT = re.compile(r"[0-9]{1,19}")


class _FinalDir(str):
    """The default ``final_dir``: ``"ema"``, or ``"ema-<name>"`` for a callback with a name."""

    def __repr__(self) -> str:
        return "'ema'"


_FINAL_DIR = _FinalDir("ema")


class EMACallback(TrainerCallback):
    """An exponential moving average of the model's weights, for ``transformers.Trainer``.

    Hooks and what they do (the how-to page has the table of checkpoints and resuming):

    * ``on_train_begin`` builds a new :class:`~polyak.EMA` of the model (``callback.ema``) at every
      ``train()``, also when the callback was used before (for this model or another); resuming, it loads the
      EMA from the folder the Trainer resumes from (``resume_from_checkpoint``, wherever it is), or, without
      an EMA file there, starts it from the model's weights with a warning.
    * ``on_step_end`` updates it once per optimizer step; before an evaluation the EMA's weights go into the
      model (their values trade places, no copy), ``on_evaluate`` puts the online weights back, bit for bit.
      With a dict of evaluation datasets (``eval_dataset={"a": ..., "b": ...}``) every dataset is evaluated
      with the EMA: the online weights come back at the last dataset's ``on_evaluate``, before the checkpoint
      that follows is written. ``trainer.evaluate()`` outside ``train()`` evaluates the model's own (online)
      weights.
    * With ``load_best_model_at_end=True``, ``on_train_end`` takes the EMA of the best checkpoint (the one
      whose evaluation, with the EMA, made it the best), as the Trainer takes its online weights.
    * ``on_save`` writes the EMA into each checkpoint folder; ``on_train_end`` writes it with
      ``save_pretrained`` into ``final_dir``; in a ``trainer.hyperparameter_search()``, into the trial's folder
      (``output_dir/run-<n>``), where the Trainer writes that trial's checkpoints. ``trainer.save_model()`` has
      no callback event: it writes the online weights only (:meth:`save` writes the EMA beside them).

    Several callbacks (two decays, say) keep their EMAs of the same model side by side: each is updated from
    the online weights, each needs its own ``name`` (its own files), and at most one evaluates (the others
    take ``evaluate=False``); otherwise ``train()`` refuses at its start.

    Args:
        momentum: weight of the online model in each update, in (0, 1); or ``decay = 1 - momentum``; neither:
            ``decay=0.999``.
        decay: timm's and diffusers' convention: ``momentum = 1 - decay``.
        schedule: a callable ``k -> momentum`` (see :mod:`polyak.schedules`), instead of the two above.
        copy_first: how many updates copy the online weights before the averaging starts (a delayed start;
            see :class:`polyak.EMA`).
        name: tells the files of several callbacks apart: ``ema-<name>.safetensors`` in the checkpoints,
            ``final_dir`` ``"ema-<name>"``; None (one callback): ``ema.safetensors`` and ``"ema"``. Letters,
            digits, ``.``, ``_`` and ``-``.
        evaluate: evaluate with the EMA's weights (the trainer's evaluations during ``train()``, each dataset
            of a dict of them); the online weights are back, bit for bit, when the evaluation ends (the last
            dataset's ``on_evaluate``); if it raised, at :meth:`restore` or the next ``train()``.
        final_dir: where ``on_train_end`` writes the EMA model with ``save_pretrained`` (a folder, relative to
            ``args.output_dir``, or to a search trial's folder), or None. The model itself keeps its online
            weights.
        dtype, handle_buffers, skip_nonfinite, device, flat, include, exclude, predicate, trainable_only:
            as for :class:`polyak.EMA` (a bf16 model is averaged in a float32 master by default).

    Attributes:
        ema: the :class:`polyak.EMA`, built by ``on_train_begin`` (None before).

    Example:
        >>> from polyak.transformers import EMACallback
        >>> callback = EMACallback(decay=0.999)   # Trainer(..., callbacks=[callback])
        >>> callback.ema is None, callback.weights_name
        (True, 'ema.safetensors')
        >>> EMACallback(decay=0.9999, name="slow", evaluate=False).weights_name
        'ema-slow.safetensors'
    """

    def __init__(
        self,
        momentum: float | None = None,
        *,
        decay: float | None = None,
        schedule: Schedule | None = None,
        copy_first: int = 0,
        name: str | None = None,
        evaluate: bool = True,
        final_dir: str | os.PathLike[str] | None = _FINAL_DIR,
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
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            raise ValueError(
                f"name must be None or letters, digits, '.', '_' and '-' (it is part of file names), got {name!r}"
            )
        if final_dir is not None and not isinstance(final_dir, (str, os.PathLike)):
            raise TypeError(f"final_dir must be a folder name or None, got {final_dir!r}")
        self.schedule = schedule
        self.name = name
        self.evaluate = bool(evaluate)
        self.final_dir = f"ema-{name}" if isinstance(final_dir, _FinalDir) and name is not None else final_dir
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
        _check_options(**self._options)
        self.ema: EMA | None = None
        self._pending: Path | None = None  # load() before the EMA is built: the folder on_train_begin takes
        self._run: _Run | None = None  # the last train()'s

    @property
    def weights_name(self) -> str:
        """The name of this callback's EMA file in a checkpoint folder (``ema.safetensors``, or
        ``ema-<name>.safetensors``)."""
        return WEIGHTS_NAME if self.name is None else f"ema-{self.name}.safetensors"

    @property
    def masters_name(self) -> str:
        """The name of the file of its float32 masters, for a low-precision model (``ema_master.safetensors``,
        or ``ema_master-<name>.safetensors``)."""
        return MASTERS_NAME if self.name is None else f"ema_master-{self.name}.safetensors"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r}, name={self.name!r}, evaluate={self.evaluate})"

    # -- building, and resuming ----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if model is None:
            raise ValueError("EMACallback needs the model: the Trainer passes it to on_train_begin")
        self.restore()  # a train() that raised in an evaluation left the EMA's weights in the model
        self._run = _Run.of(state)
        self._run.join(self)
        calling = _calling_trainer()
        if calling is not None:
            _, folder = calling
        else:  # not called by a Trainer we know: its checkpoint of this step, in the usual place
            folder = _run_dir(args) / f"checkpoint-{state.global_step}" if state.global_step > 0 else None
        ema = EMA(model, schedule=self.schedule, **self._options)  # a new run, or a new model: a new EMA
        pending, self._pending = self._pending, None
        if pending is not None:
            self._load_into(ema, pending)
        elif folder is not None:
            folder = Path(folder)
            if (folder / self.weights_name).is_file():
                self._load_into(ema, folder)
            else:
                logger.warning(
                    f"polyak: resuming at step {state.global_step}, but {folder / self.weights_name} does not "
                    "exist: the EMA starts from the model's weights (call callback.load(folder) before train() "
                    "to take it from elsewhere)"
                )
        self.ema = ema

    def restore(self) -> None:
        """Put the online weights back into the model, if the EMA's are in it for an evaluation.

        The callback does it itself when the evaluation ends, and at the next step, save, end of training or
        ``train()``: call it after a ``train()`` that raised inside an evaluation (the Trainer has no event
        for an exception), before using the model. Nothing happens otherwise.
        """
        if self._run is not None:
            self._run.leave()

    # -- updating --------------------------------------------------------------------------------------------------
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        run = _Run.of(state)
        run.leave()  # another callback's EMA may be in the model for the evaluation to come: update from ours
        if self.ema is not None:
            self.ema.update()
        if control.should_evaluate:
            run.enter()  # the evaluation that follows this step runs with the EMA's weights

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_evaluate:
            _Run.of(state).enter()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not _more_datasets_to_evaluate():  # a dict of evaluation datasets: each one is evaluated with the EMA
            _Run.of(state).leave()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _Run.of(state).leave()

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _Run.of(state).leave()
        if self.ema is None:
            return
        whole = self._whole_state()  # on every rank: under ZeRO-3 a gather (a collective)
        if state.is_world_process_zero:
            self._save(_run_dir(args) / f"checkpoint-{state.global_step}", whole)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _Run.of(state).leave()
        if self.ema is None:
            return
        best = getattr(state, "best_model_checkpoint", None)
        if getattr(args, "load_best_model_at_end", False) and best is not None:
            # the Trainer has loaded the best checkpoint's online weights into the model: the EMA is that
            # checkpoint's too, the one whose evaluation made it the best
            if (Path(best) / self.weights_name).is_file():
                self._load_into(self.ema, Path(best))
            else:
                logger.warning(
                    f"polyak: the Trainer loaded the best checkpoint {best}, which has no {self.weights_name}: the "
                    "EMA stays that of the last step"
                )
        if self.final_dir is None:
            return
        whole = self._whole_state()
        if not state.is_world_process_zero:
            return
        model = self.ema.ema_model
        if hasattr(model, "save_pretrained"):
            # under ZeRO-3 the EMA model holds this rank's partitions: the gathered weights are written
            tensors = None if whole is None else whole["ema_model"]
            model.save_pretrained(_run_dir(args) / self.final_dir, state_dict=tensors)
        else:
            self._save(_run_dir(args) / self.final_dir, whole)

    def _whole_state(self) -> dict[str, Any] | None:
        """Under DeepSpeed ZeRO-3, the EMA gathered whole (call on every rank); otherwise None (nothing to
        gather: the EMA model holds the whole average)."""
        if self.ema is None or not self.ema._plan.zero:
            return None
        return self.ema.full_state_dict()

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the EMA into ``folder`` (created if missing): its weights as :attr:`weights_name` (with the
        update counts in the file's metadata) and, for a low-precision model, its float32 masters as
        :attr:`masters_name`. Each file is written whole or not at all (a temporary file, renamed)."""
        if self.ema is None:
            raise RuntimeError("EMACallback.save(): no EMA yet (on_train_begin builds it)")
        return self._save(Path(folder), self._whole_state())

    def _save(self, folder: Path, whole: dict[str, Any] | None) -> Path:
        assert self.ema is not None
        folder.mkdir(parents=True, exist_ok=True)
        state = self.ema.state_dict() if whole is None else whole
        counts = {"num_updates": str(state["num_updates"]), "num_skipped": str(state["num_skipped"])}
        metadata = {"format": FORMAT, **counts}
        masters = state.get("master")
        if masters:  # first: a save cut short between the two leaves masters that the weights' count refuses
            tensors = {k: v.contiguous() for k, v in masters.items()}
            _write(folder / self.masters_name, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        elif (folder / self.masters_name).is_file():
            (folder / self.masters_name).unlink()  # another run's, which would not match these weights
        model = self.ema.ema_model
        if whole is None:
            _write(folder / self.weights_name, lambda tmp: save_model(model, tmp, metadata=metadata))
        else:  # whole tensors, each of its own (gathered under ZeRO-3)
            weights = {k: v.contiguous() for k, v in whole["ema_model"].items() if isinstance(v, Tensor)}
            _write(folder / self.weights_name, lambda tmp: save_file(weights, tmp, metadata=metadata))
        return folder / self.weights_name

    def load(self, folder: str | os.PathLike[str]) -> None:
        """Take the EMA from ``folder`` (written by :meth:`save`): weights, masters and counts, exactly.

        Everything is read and checked (metadata, names, shapes, dtypes) before the EMA changes: a bad file
        raises ``ValueError`` naming it, and the EMA is as it was. Before ``train()`` (no EMA yet), the folder
        is checked now and loaded by ``on_train_begin``, in place of the checkpoint the Trainer resumes from.
        """
        folder = Path(folder)
        if self.ema is None:
            path = folder / self.weights_name
            _count(path, _read(path)[0], "num_updates")  # a bad file: said now, not at the start of train()
            self._pending = folder
            return
        self._load_into(self.ema, folder)

    def _load_into(self, ema: EMA, folder: Path) -> None:
        path = folder / self.weights_name
        metadata, found = _read(path)
        counts = {key: _count(path, metadata, key) for key in ("num_updates", "num_skipped")}
        own = ema.ema_model.state_dict()
        if ema._plan.zero:  # ZeRO-3: the files hold whole tensors, of which each rank takes its partition
            own = {
                k: torch.empty(ema._plan.zero[k].ds_shape, dtype=v.dtype) if k in ema._plan.zero else v
                for k, v in own.items()
            }
        state: dict[str, Any] = {**counts, "ema_model": _match(path, found, own)}
        own_masters = ema.state_dict().get("master", {})
        masters_path = folder / self.masters_name
        if masters_path.is_file():
            masters_metadata, masters = _read(masters_path)
            # written with the weights (older files have no metadata): the masters of another save are refused
            if masters_metadata and _count(masters_path, masters_metadata, "num_updates") != counts["num_updates"]:
                raise ValueError(f"{masters_path} does not belong to {path}: its metadata is {masters_metadata}")
            for k, v in masters.items():
                if k in own_masters and v.dtype != own_masters[k].dtype:
                    raise ValueError(f"{masters_path}[{k!r}] must be {own_masters[k].dtype}, got {v.dtype}")
            state["master"] = masters
        elif own_masters:
            logger.warning(
                f"polyak: {masters_path} does not exist: the float32 masters start from the low-precision "
                f"weights of {path} (resuming is not exact)"
            )
        try:
            ema.load_state_dict(state)  # checks the rest (names of the masters, shapes) before it writes
        except (TypeError, ValueError) as e:
            raise ValueError(f"{folder}: {e}") from e


class _Run:
    """The EMACallbacks of one ``train()``, kept on its ``TrainerState``: they write apart, at most one
    evaluates, and its EMA goes into the model only after every callback updated from the online weights."""

    def __init__(self) -> None:
        self.callbacks: list[EMACallback] = []
        self._swap: Any = None

    @staticmethod
    def of(state: Any) -> _Run:
        run = getattr(state, "_polyak_run", None)
        if run is None:
            run = _Run()
            state._polyak_run = run  # an attribute, not a field: the state's JSON does not hold it
        return run

    def join(self, callback: EMACallback) -> None:
        for other in self.callbacks:
            if other is callback:
                raise ValueError(f"{callback!r} is twice in the Trainer's callbacks: it would update twice a step")
            if other.weights_name == callback.weights_name:
                raise ValueError(
                    f"two EMACallbacks in one Trainer write {callback.weights_name}: give each its own name=, "
                    f"got name={callback.name!r} for both"
                )
            if other.final_dir is not None and other.final_dir == callback.final_dir:
                raise ValueError(
                    f"two EMACallbacks in one Trainer write final_dir={callback.final_dir!r}: give each its own"
                )
            if other.evaluate and callback.evaluate:
                raise ValueError(
                    f"two EMACallbacks evaluate ({other!r} and {callback!r}): an evaluation runs with one set of "
                    "weights; give evaluate=False to all but one"
                )
        self.callbacks.append(callback)

    def enter(self) -> None:
        if self._swap is not None:
            return
        for callback in self.callbacks:
            if callback.evaluate and callback.ema is not None and callback.ema.num_updates > 0:
                self._swap = callback.ema.swapped()
                self._swap.__enter__()
                return

    def leave(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.__exit__(None, None, None)


def _calling_trainer() -> tuple[Any, str | os.PathLike[str] | None] | None:
    """The ``Trainer`` whose training loop calls, and the folder it resumes from (None: not resuming); None
    when not called from within a Trainer's loop (another trainer, a later transformers that renamed it).

    The Trainer passes that folder to no callback, and keeps it in neither ``args`` nor ``state``: it is the
    ``resume_from_checkpoint`` argument of ``Trainer._inner_training_loop``, where ``train()`` has already
    resolved ``True`` into the last checkpoint's folder."""
    for name, trainer, local in _trainer_frames():
        if name == "_inner_training_loop":
            return trainer, local.get("resume_from_checkpoint")
    return None


def _trainer_frames() -> Iterator[tuple[str, Any, Mapping[str, Any]]]:
    """The frames of ``Trainer`` methods that led to this call, innermost first: each method's name, the
    Trainer, the frame's locals. What the Trainer tells no callback is read there."""
    from transformers import Trainer

    frame = sys._getframe(2)  # past this generator's caller
    while frame is not None:
        trainer = frame.f_locals.get("self")
        if isinstance(trainer, Trainer):
            yield frame.f_code.co_name, trainer, frame.f_locals
        frame = frame.f_back


def _more_datasets_to_evaluate() -> bool:
    """Whether this ``on_evaluate`` ends the evaluation of one of several datasets and more follow.

    ``Trainer.evaluate`` with a dict of datasets calls itself once per dataset, each call ending in
    ``on_evaluate``; no event starts an evaluation, so the EMA's weights stay in the model until the last
    dataset's (the Trainer writes its checkpoint right after it, before ``on_save``: with the online weights).
    Read from the frame of the ``evaluate`` that iterates the dict (its locals ``eval_dataset``, the dict, and
    ``eval_dataset_name``, the name it evaluates now); False when no such frame is found (one dataset, or a
    Trainer that evaluates otherwise): the online weights come back now, as for one dataset."""
    for name, _, local in _trainer_frames():  # (past a subclass's evaluate, calling the Trainer's)
        datasets = local.get("eval_dataset")
        if name == "evaluate" and isinstance(datasets, dict) and local.get("eval_dataset_name", ...) in datasets:
            names = list(datasets)
            return names.index(local["eval_dataset_name"]) < len(names) - 1
    return False


def _run_dir(args: Any) -> Path:
    """The folder of this run's checkpoints: ``args.output_dir``, or, in a ``Trainer.hyperparameter_search``,
    the trial's folder in it (``run-<n>``, or the ``hp_name`` of the trial), where the Trainer writes them."""
    for _, trainer, _ in _trainer_frames():
        output_dir = getattr(trainer, "_get_output_dir", None)
        if callable(output_dir):
            return Path(output_dir(trial=getattr(trainer, "_trial", None)))
        break
    return Path(args.output_dir)


def _write(path: Path, write: Callable[[str], object]) -> None:
    """``write(name)`` into a temporary file beside ``path``, renamed to ``path`` once whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and tensors of a safetensors file, read whole (no code runs), or a ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a safetensors file polyak can read: {e}") from e
    return metadata, tensors


def _count(path: Path, metadata: Mapping[str, str], key: str) -> int:
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by polyak's EMACallback: its metadata is {metadata}")
    value = metadata.get(key, "0" if key == "num_skipped" else None)
    if not isinstance(value, str) or not _COUNT.fullmatch(value):
        raise ValueError(f"{path}: its metadata's {key} must be an int >= 0, got {value!r}")
    return int(value)


def _match(path: Path, found: Mapping[str, Tensor], own: Mapping[str, Any]) -> dict[str, Tensor]:
    """The file's tensors by the EMA model's names, each of its shape and dtype; a tied tensor (GPT-2's
    ``lm_head`` is its ``wte``), which safetensors writes once, under either name."""

    def key(t: Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())

    names_of: dict[tuple, list[str]] = {}
    for name, t in own.items():
        if isinstance(t, Tensor):
            names_of.setdefault(key(t), []).append(name)
    out, missing = {}, []
    for name, t in own.items():
        twins = [n for n in names_of.get(key(t), []) if n in found] if isinstance(t, Tensor) else []
        if name in found or twins:
            out[name] = found[name if name in found else twins[0]]
        else:
            missing.append(name)
    unexpected = sorted(set(found) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the EMA model: missing {missing}, unexpected {unexpected}")
    for name, t in out.items():
        want = own[name]
        if isinstance(want, Tensor) and (t.shape != want.shape or t.dtype != want.dtype):
            raise ValueError(
                f"{path}[{name!r}] must be {want.dtype} of shape {tuple(want.shape)}, got {t.dtype} {tuple(t.shape)}"
            )
    return out
