"""Tracking: the power-function EMAs of a model during training, and their snapshots."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyak._kernels import Gathered, Kernel, Lerp, Staged, apply_together
from polyak._warn import warn
from polyak.ema import EMA, HANDLE_BUFFERS
from polyak.posthoc._files import (
    _SNAPSHOT,
    FORMAT,
    FORMAT_VERSION,
    _atomic_save,
    _is_writer,
    _set_aside,
    _snapshots_after,
    snapshot_name,
    snapshot_runs,
)
from polyak.posthoc._lock import FolderClaim, FolderInUse, claim, current_key, give_back
from polyak.schedules import _MAX_SIGMA_REL, _MIN_SIGMA_REL, _check_int, power_function


def _check_sigma_rel(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(
            f"{name} must be a real number in [{_MIN_SIGMA_REL}, 1/sqrt(12) ~ {_MAX_SIGMA_REL:.6f}), got {value!r}"
        )
    value = float(value)
    if not _MIN_SIGMA_REL <= value < _MAX_SIGMA_REL:  # also refuses nan
        raise ValueError(f"{name} must be in [{_MIN_SIGMA_REL}, 1/sqrt(12) ~ {_MAX_SIGMA_REL:.6f}), got {value!r}")
    return value


class PostHocEMA:
    r"""Power-function EMAs of a model's weights, snapshotted for post-hoc synthesis (EDM2).

    Keeps one :class:`~polyak.EMA` with the :func:`~polyak.schedules.power_function` schedule per
    ``sigma_rel`` (float32 masters for float16/bfloat16 models, as the core does by default). Call
    :meth:`update` after each optimizer step; after every ``snapshot_every``-th update it writes one snapshot
    of each profile into ``directory`` (see the module docstring for the format). Afterwards,
    :func:`synthesize` rebuilds the EMA of any ``sigma_rel`` from the folder.

    The update count ``t`` of the snapshots is the number of :meth:`update` calls (an update skipped by
    ``skip_nonfinite`` does not count). Steps or samples would give the same synthesis: the units cancel.

    In a distributed run (``torch.distributed`` initialised) every rank updates its EMAs, and only rank 0
    creates the folder and writes.

    Args:
        model: the online model (``DataParallel``/``DistributedDataParallel`` are unwrapped as in
            :class:`~polyak.EMA`).
        sigma_rels: the relative widths of the tracked profiles, each in (0, 1/sqrt(12)), at least one,
            distinct to 4 decimals (they name the files). EDM2 uses (0.05, 0.10).
        snapshot_every: write snapshots after every this many updates (>= 1). Denser snapshots synthesize
            more accurately: with 10 per profile the error is about 1e-3 of the weights' variation.
        directory: the snapshot folder; created (with parents) if missing. It belongs to one run: each
            snapshot carries the run's id (:attr:`run_id`, saved in :meth:`state_dict`), and a folder that
            holds another run's snapshots is refused at the first write, unless this one resumes that run.
            One object writes into it at a time: the first write (or :meth:`load_state_dict`) claims the
            folder with an exclusive lock (``flock`` on the folder itself, which the operating system drops
            when the process ends, even killed), held until :meth:`close`, garbage collection or exit; a
            second object, here or in another process, is refused with :class:`FolderInUse` naming the
            folder. One exception: a run resumed with :meth:`load_state_dict` takes the folder over from an
            object of the same run in this process (whose timeline it abandons; that one's writes are then
            refused).
        handle_buffers, dtype, skip_nonfinite, device, include, exclude, predicate, trainable_only: keyword-only;
            passed to each :class:`~polyak.EMA` (the last four choose what is averaged: a LoRA adapter's
            post-hoc EMA costs the adapter only).

    Attributes:
        emas: the :class:`~polyak.EMA` of each profile, in the order of ``sigma_rels``.
        sigma_rels: the profiles' relative widths, as floats.
        gammas: the profiles' exponents.
        snapshot_every: as given.
        directory: the snapshot folder, as a :class:`~pathlib.Path`.
        run_id: this run's id (a random hex string; a resumed run continues the saved one).

    Example:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from polyak.posthoc import PostHocEMA, synthesize
        >>> model = nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     posthoc = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=5, directory=folder)
        ...     for _ in range(20):
        ...         optimizer.zero_grad()
        ...         model(torch.randn(8, 2)).pow(2).mean().backward()
        ...         optimizer.step()
        ...         written = posthoc.update()
        ...     state = synthesize(folder, sigma_rel=0.07)
        ...     print(len(list(posthoc.directory.glob("*.safetensors"))), [p.name for p in written])
        8 ['ema-0.0500-0000000020.safetensors', 'ema-0.1000-0000000020.safetensors']
        >>> averaged = nn.Linear(2, 1)
        >>> averaged.load_state_dict(state)
        <All keys matched successfully>
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        directory: str | os.PathLike[str] = "posthoc_ema",
        *,
        handle_buffers: str = "copy",
        dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
        device: torch.device | str | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predicate: Callable[[str, torch.Tensor], bool] | None = None,
        trainable_only: bool = False,
    ) -> None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
            raise ValueError(f"sigma_rels must be a sequence of numbers, got {sigma_rels!r}")
        sigmas = tuple(_check_sigma_rel("sigma_rels", s) for s in sigma_rels)
        if not sigmas:
            raise ValueError("sigma_rels must hold at least one relative width, got an empty sequence")
        names = [snapshot_name(s, 0) for s in sigmas]
        if len(set(names)) != len(names):
            raise ValueError(f"sigma_rels must differ in their first 4 decimals (they name the files), got {sigmas}")
        self.snapshot_every = _check_int("snapshot_every", snapshot_every, 1)
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}: {directory!r}")
        if handle_buffers not in HANDLE_BUFFERS:
            raise ValueError(
                f"handle_buffers must be one of {', '.join(map(repr, HANDLE_BUFFERS))}, got {handle_buffers!r}"
            )
        self.directory = Path(directory)
        # the id every snapshot of this run carries: a folder holding another run's is refused at the first write
        self.run_id = uuid.uuid4().hex
        self._folder_checked = False
        self._claim: FolderClaim | None = None  # this object's lock on the folder, taken at the first write
        self.sigma_rels = sigmas
        self.handle_buffers = handle_buffers
        self.emas = [
            EMA(
                model,
                schedule=power_function(sigma_rel=s),
                handle_buffers=handle_buffers,
                dtype=dtype,
                skip_nonfinite=skip_nonfinite,
                device=device,
                include=include,
                exclude=exclude,
                predicate=predicate,
                trainable_only=trainable_only,
            )
            for s in sigmas
        ]
        self.gammas = tuple(ema.schedule.gamma for ema in self.emas)  # type: ignore[attr-defined]
        self._together = _Together(self.emas)  # all profiles in one pass: the online model is read once
        if _is_writer():
            self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def num_updates(self) -> int:
        """How many updates have been made (the ``t`` of the next snapshot)."""
        return self.emas[0].num_updates

    @property
    def ema_models(self) -> list[nn.Module]:
        """The averaged model of each profile, in the order of ``sigma_rels``."""
        return [ema.ema_model for ema in self.emas]

    def update(self) -> list[Path]:
        """Fold the online weights into every profile; write snapshots after every ``snapshot_every``-th.

        Returns:
            The snapshot files written by this call (none on most calls, and on ranks other than 0).
        """
        before = self.num_updates
        self._together.update()
        if self.num_updates != before and self.num_updates % self.snapshot_every == 0:
            return self.snapshot()
        return []

    def snapshot(self) -> list[Path]:
        """Write a snapshot of every profile now (e.g. at the end of training); returns the files written.

        A snapshot at a time already written (by this run) replaces it. Nothing is written on ranks other than 0.

        Raises:
            RuntimeError: before the first update (a profile at ``t = 0`` is empty).
            ValueError: the folder holds another run's snapshots (checked at the first write).
            FolderInUse: (a ``ValueError``) another object, in this process or another, writes into the
                folder; or this object's folder was taken over by a resumed run of the same id.
        """
        t = self.num_updates
        if t < 1:
            raise RuntimeError("no snapshot before the first update: the profiles are empty at t = 0")
        if not _is_writer():
            return []
        if self._claim is not None and self._claim.revoked is not None:
            raise FolderInUse(self._claim.revoked)
        self.directory.mkdir(parents=True, exist_ok=True)
        unclaimed = self._claim is None or self._claim.key != current_key(self.directory)  # first write; new folder
        if unclaimed or not self._folder_checked:
            self._refuse_other_runs()
            if unclaimed:
                new, previous = claim(self.directory, self.run_id)
                try:
                    self._refuse_other_runs()  # again, under the lock: another run may have written meanwhile
                except BaseException:
                    give_back(new, previous)
                    raise
                if self._claim is not None:
                    self._claim.release()  # the lock of a folder that was removed and made anew
                self._claim = new
            self._folder_checked = True
        written = []
        for sigma, gamma, ema in zip(self.sigma_rels, self.gammas, self.emas, strict=True):
            tensors, info, extra = _snapshot_tensors(ema, self.handle_buffers)
            metadata = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "kind": _SNAPSHOT,
                "t": str(t),
                "gamma": repr(float(gamma)),
                "sigma_rel": repr(float(sigma)),
                "tensors": json.dumps(info),
                "run": self.run_id,
            }
            if extra:
                metadata["extra_state"] = json.dumps(extra)
            path = self.directory / snapshot_name(sigma, t)
            _atomic_save(tensors, metadata, path)
            written.append(path)
        return written

    def _refuse_other_runs(self) -> None:
        others = snapshot_runs(self.directory) - {self.run_id}
        if others:
            raise ValueError(
                f"directory {str(self.directory)!r} holds the snapshots of another run "
                f"({', '.join(sorted(r or '(no id)' for r in others))}), which a synthesis would mix with this "
                "one's: give this run an empty folder, or, to continue that run, load its state "
                "(PostHocEMA.load_state_dict) first"
            )

    def close(self) -> None:
        """Give the snapshot folder back: another :class:`PostHocEMA` may write into it from now on.

        Garbage collection and the end of the process do the same. The profiles stay usable; a later
        snapshot claims the folder again (and is refused if another object holds it then). Also the exit of
        a ``with PostHocEMA(...) as posthoc:`` block.
        """
        claimed = self._claim
        if claimed is not None and claimed.revoked is None:  # a revoked claim keeps refusing this object's writes
            claimed.release()
            self._claim = None

    def __enter__(self) -> PostHocEMA:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Each profile's :meth:`polyak.EMA.state_dict` and the profiles' widths; loads with ``weights_only``."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every": self.snapshot_every,
            "run_id": self.run_id,
            "emas": [ema.state_dict() for ema in self.emas],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`: the profiles continue where they stopped.

        The profiles must match (same ``sigma_rels``, in order); everything is checked before anything
        changes. ``snapshot_every`` may differ from the saved run's. The run's id is restored too: its
        snapshot folder is this run's again, and this call claims it (see ``directory``): it is refused while
        another process writes into the folder, and takes it over from an object of the same run in this
        process (the run being resumed, whose later writes are then refused).

        Resuming from an earlier checkpoint abandons the timeline that went on from it: the folder's
        snapshots of this run taken after the restored update count ``t`` belong to a run that no longer
        exists, and a synthesis must not mix them with the new timeline's. They are moved (not deleted) into
        a new subfolder ``abandoned-after-t{t:010d}`` of the snapshot folder (``-2``, ``-3``, ... when
        taken), where :func:`synthesize` does not look (``synthesize(that_folder, ...)`` still rebuilds the
        abandoned timeline), and a ``UserWarning`` says how many went where. The new timeline writes its own
        snapshots at those times. Snapshots at ``t`` and before are the common history and stay.

        Raises:
            FolderInUse: (a ``ValueError``) another object holds the folder (another process, or another run
                in this process); nothing is changed.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = {"sigma_rels", "emas"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}; it has {sorted(state_dict)}")
        saved = state_dict["sigma_rels"]
        if (
            not isinstance(saved, Sequence)
            or len(saved) != len(self.sigma_rels)
            or not all(
                isinstance(a, Real) and math.isclose(float(a), b, rel_tol=1e-12)
                for a, b in zip(saved, self.sigma_rels, strict=False)
            )
        ):
            raise ValueError(
                f"state_dict['sigma_rels'] must match this PostHocEMA's sigma_rels={list(self.sigma_rels)}, "
                f"got {saved!r}"
            )
        run_id = state_dict.get("run_id", self.run_id)
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"state_dict['run_id'] must be a non-empty string, got {run_id!r}")
        emas = state_dict["emas"]
        if not isinstance(emas, Sequence) or len(emas) != len(self.emas):
            raise ValueError(f"state_dict['emas'] must be a list of {len(self.emas)} EMA states, got {emas!r:.200}")
        # each EMA checks its state before changing anything; a later profile's failure undoes the earlier ones
        backups = [_clone_tree(ema.state_dict()) for ema in self.emas]
        claimed: tuple[FolderClaim, FolderClaim | None] | None = None
        aside, moved = None, []
        try:
            for ema, state in zip(self.emas, emas, strict=True):
                ema.load_state_dict(state)
            counts = [ema.num_updates for ema in self.emas]
            if len(set(counts)) != 1:
                raise ValueError(f"state_dict['emas'] must hold one update count for all profiles, got {counts}")
            if _is_writer() and self.directory.is_dir():
                claimed = claim(self.directory, run_id, take_over=True, mine=self._claim)
                later = _snapshots_after(self.directory, run_id, counts[0])
                if later:
                    aside, moved = _set_aside(later, self.directory, counts[0])
        except BaseException:
            if claimed is not None:
                give_back(*claimed)
            for ema, backup in zip(self.emas, backups, strict=True):
                ema.load_state_dict(backup)
            raise
        if claimed is not None:
            new, previous = claimed
            if self._claim is not None and self._claim is not previous:
                self._claim.release()  # a claim on a folder since replaced
            self._claim = new
        if run_id != self.run_id:
            self.run_id, self._folder_checked = run_id, False
        if moved:
            warn(
                f"resumed at update {counts[0]}: moved the {len(moved)} snapshots of the abandoned timeline (taken "
                f"after it) from {str(self.directory)!r} into {str(aside)!r}, where synthesize() does not look"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sigma_rels={self.sigma_rels}, snapshot_every={self.snapshot_every}, "
            f"directory={str(self.directory)!r}, num_updates={self.num_updates})"
        )


def _clone_tree(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _clone_tree(v) for k, v in value.items()}
    return value


def _widened(t: Tensor) -> Tensor:
    """A fresh, contiguous CPU copy; float16/bfloat16 widened to float32 (losslessly)."""
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _snapshot_tensors(
    ema: EMA, handle_buffers: str
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]], dict[str, Any]]:
    """The tensors of a snapshot (fresh copies: no shared storage), the per-tensor metadata, and the modules'
    extra state (``get_extra_state``), which must be JSON (a snapshot is never a pickle)."""
    state = ema.state_dict()
    weights: dict[str, Tensor] = state["ema_model"]
    masters: dict[str, Tensor] = state.get("master", {})
    averaged_names = {n for k in ema._kernels for n in k.names}
    # tied weights appear in the state dict under each alias; the kernels and masters know the first name only
    key = lambda t: (t.data_ptr(), tuple(t.shape))  # noqa: E731
    averaged_storage = {key(weights[n]) for n in averaged_names if weights[n].numel() > 0}
    by_storage = {key(weights[n]): m for n, m in masters.items() if weights[n].numel() > 0}
    tensors: dict[str, Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    for name, value in weights.items():
        if not isinstance(value, Tensor):  # a module's extra state
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"the extra state {name!r} of the model ({type(value).__name__}) cannot go into a snapshot: "
                    f"snapshots hold tensors and JSON, never pickles ({e})"
                ) from None
            extra[name] = value
            continue
        averaged = name in averaged_names or (value.numel() > 0 and key(value) in averaged_storage)
        source = masters.get(name, by_storage.get(key(value), value)) if averaged else value
        tensors[name] = _widened(source) if averaged else value.detach().to("cpu", copy=True).contiguous()
        info[name] = {"dtype": str(value.dtype), "averaged": averaged}
    return tensors, info, extra


class _Together:
    """Several EMAs of one model (different schedules), updated in one pass.

    Each chunk of online values is read (and staged, where it must be) once, and averaged into every profile
    while it is still in cache: a pass over the model instead of one per profile. Where the EMAs
    are not grouped alike (or use stochastic rounding, ``per_step`` or sharded tensors), each updates on its
    own.
    """

    def __init__(self, emas: list[EMA]) -> None:
        if any(e.model is not emas[0].model for e in emas):
            raise ValueError("EMAs updated together must track the same model")
        self.emas = emas
        self._seen: list[list[Kernel]] = []
        self._alike = False

    def _fused(self) -> bool:
        first = self.emas[0]
        if first.stochastic_rounding or first.per_step:
            return False
        for e in self.emas:
            e._ensure_current()
        kernels = [e._kernels for e in self.emas]
        if len(kernels) != len(self._seen) or any(a is not b for a, b in zip(kernels, self._seen, strict=False)):
            self._seen, self._alike = kernels, self._all_alike()  # decided once per pairing, not per update
        return self._alike

    def _all_alike(self) -> bool:
        def shape(k: Kernel) -> tuple[Any, ...]:
            acc, online = k.accumulator, k.online
            return (
                type(k),
                k.names,
                k.master is None,
                acc.views[0].dtype,
                acc.views[0].device,
                acc.flat is None,
                k.ema.flat is None,
                getattr(k, "work_dtype", None),
                online.flat is None,
            )

        # one pass over all profiles needs them alike, down to where each accumulates and what it reads
        shapes = [[shape(k) for k in e._kernels] for e in self.emas]
        return all(s == shapes[0] for s in shapes) and all(
            type(k) in (Lerp, Staged, Gathered) and k.sharded is None for k in self.emas[0]._kernels
        )

    def update(self) -> list[float]:
        emas = self.emas
        for e in emas:
            e._refuse_when_swapped("update()")
        if all(e._simple for e in emas) and len(emas[0]._kernels[0].chunks()) == 1:
            return [e.update() for e in emas]  # a small model: each its own fastest path, reading from cache
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if not self._fused():
                return [e.update() for e in emas]
            for e in emas:
                e._plan.refuse_unmaterialised()  # a model on the meta device has nothing to average yet
            ks = [e.num_updates + 1 for e in emas]
            ms = [e._scheduled(k) for e, k in zip(emas, ks, strict=True)]  # checked: a real number in [0, 1]
            first = emas[0]
            if first.skip_nonfinite and first._skips(ks[0]):
                for e in emas[1:]:
                    e.num_skipped += 1
                return [0.0] * len(emas)
            for e, m in zip(emas, ms, strict=True):
                if m == 1.0:
                    e._clear_for_copy()
            for i in range(len(first._kernels)):
                apply_together([e._kernels[i] for e in emas], ms)
            for e in emas:
                e._finish()
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        for e, k in zip(emas, ks, strict=True):
            e.num_updates = k
        return ms
