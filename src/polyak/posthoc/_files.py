"""The snapshot file format: names, metadata, atomic writes, and reading headers (never a pickle)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "polyak.posthoc"
"""Value of the ``format`` metadata key of every file this module writes."""
FORMAT_VERSION = "1"
"""Value of the ``format_version`` metadata key; files of another version are refused."""

_SNAPSHOT = "snapshot"
_SYNTHESIZED = "synthesized"
_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}  # "torch.float16": ...


def snapshot_name(sigma_rel: float, t: int) -> str:
    """The file name of the snapshot of profile ``sigma_rel`` after ``t`` updates."""
    return f"ema-{sigma_rel:.4f}-{t:010d}.safetensors"


def _is_writer() -> bool:
    """False on every rank but 0 of an initialised ``torch.distributed`` process group."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows; renames are durable there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_replaceable(path: Path, arg: str = "path") -> None:
    """Refuse a ``path`` that exists and is not a regular file: a write never replaces a link, a folder or a
    special file (a device, a FIFO) with a file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
    raise ValueError(f"{arg} {str(path)!r} is {kind}: only a regular file (or a new path) is written over")


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write ``tensors`` to ``path`` so that ``path`` is either absent, its old self, or whole.

    ``path`` must be a regular file or absent (checked before the write and again before the rename).
    """
    _check_replaceable(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # safetensors' own error type for I/O failures (permission, disk full)
            raise OSError(f"could not write {str(path)!r}: {e}") from e
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _check_replaceable(path)  # again: something may have appeared there during the write
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class Snapshot:
    """What the header of one snapshot file says: enough to solve for its weight without reading tensors."""

    path: Path
    t: int
    gamma: float
    sigma_rel: float
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype": str, "averaged": bool}, in the model's order
    shapes: dict[str, tuple[int, ...]]
    run: str = ""  # the id of the PostHocEMA run that wrote it ("" for files written before runs had ids)
    extra_state: dict[str, Any] = dataclasses.field(default_factory=dict)  # modules' get_extra_state(), JSON


def _bad(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid post-hoc EMA snapshot: {why}")


def _read_header(path: Path) -> Snapshot | None:
    """The snapshot in ``path``; None for a file this module wrote by :func:`save_synthesized`."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types (and OSError); name the file
        raise _bad(path, f"{type(e).__name__}: {e}") from e
    if metadata.get("format") != FORMAT:
        raise _bad(path, f"its metadata has no format={FORMAT!r} marker (metadata keys: {sorted(metadata)})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _bad(path, f"format_version {metadata.get('format_version')!r}, expected {FORMAT_VERSION!r}")
    kind = metadata.get("kind")
    if kind == _SYNTHESIZED:
        return None
    if kind != _SNAPSHOT:
        raise _bad(path, f"kind {kind!r}, expected {_SNAPSHOT!r}")
    try:
        t = int(metadata["t"])
        gamma = float(metadata["gamma"])
        sigma_rel = float(metadata["sigma_rel"])
        tensors = json.loads(metadata["tensors"])
    except (KeyError, ValueError, TypeError) as e:
        raise _bad(path, f"unreadable metadata ({type(e).__name__}: {e})") from e
    if t < 1 or not math.isfinite(gamma) or gamma < 0:
        raise _bad(path, f"t={t}, gamma={gamma}: need t >= 1 and a finite gamma >= 0")
    if (
        not isinstance(tensors, dict)
        or set(tensors) != set(shapes)
        or not all(
            isinstance(v, dict) and v.get("dtype") in _DTYPES and isinstance(v.get("averaged"), bool)
            for v in tensors.values()
        )
    ):
        raise _bad(path, "its 'tensors' metadata does not describe the tensors it holds")
    try:
        extra = json.loads(metadata.get("extra_state", "{}"))
    except ValueError as e:
        raise _bad(path, f"unreadable extra_state metadata ({e})") from e
    if not isinstance(extra, dict):
        raise _bad(path, "its extra_state metadata is not a mapping")
    return Snapshot(path, t, gamma, sigma_rel, tensors, shapes, str(metadata.get("run", "")), extra)


def snapshot_runs(directory: Path) -> set[str]:
    """The run ids of the snapshots in ``directory`` (empty if there are none, or no folder yet)."""
    if not directory.is_dir():
        return set()
    runs = set()
    for path in directory.glob("*.safetensors"):
        if path.is_file():
            snapshot = _read_header(path)
            if snapshot is not None:
                runs.add(snapshot.run)
    return runs


def _snapshots_after(directory: Path, run: str, t: int) -> list[Path]:
    """The snapshot files of run ``run`` in ``directory`` taken after update ``t``, by name (files that are not
    valid snapshots, and other runs' snapshots, are not this run's to move)."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.safetensors")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            snapshot = _read_header(path)
        except ValueError:
            continue
        if snapshot is not None and snapshot.run == run and snapshot.t > t:
            found.append(path)
    return found


def _set_aside(paths: list[Path], directory: Path, t: int) -> tuple[Path, list[tuple[Path, Path]]]:
    """Move ``paths`` into a new subfolder ``abandoned-after-t{t:010d}`` (``-2``, ``-3``, ... if taken) of
    ``directory``; returns it and the moves, for :func:`_undo_moves`. All or nothing: a failure moves back."""
    for i in itertools.count(1):
        aside = directory / (f"abandoned-after-t{t:010d}" + (f"-{i}" if i > 1 else ""))
        try:
            aside.mkdir()
        except FileExistsError:
            continue
        break
    moved: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            os.rename(path, aside / path.name)  # a new folder: nothing there to replace
            moved.append((path, aside / path.name))
        _fsync_dir(aside)
        _fsync_dir(directory)
    except BaseException:
        _undo_moves(moved)
        with contextlib.suppress(OSError):
            aside.rmdir()
        raise
    return aside, moved


def _undo_moves(moved: list[tuple[Path, Path]]) -> None:
    for source, dest in reversed(moved):
        with contextlib.suppress(OSError):
            os.rename(dest, source)


def is_snapshot(path: Path) -> bool:
    """Whether ``path`` is a snapshot file (a synthesized file, or anything else, is not)."""
    if not path.is_file():
        return False
    try:
        return _read_header(path) is not None
    except ValueError:
        return False


def list_snapshots(directory: str | os.PathLike[str]) -> list[Snapshot]:
    """The snapshots in ``directory``, sorted by time, then ``gamma``; reads only the files' headers.

    Every ``*.safetensors`` file in the folder must be a snapshot or a file written by
    :func:`save_synthesized` (those are skipped); other files (``*.pt``, temporary files) are ignored and
    never opened.

    Raises:
        ValueError: ``directory`` is not a folder, holds no snapshot, holds a ``*.safetensors`` file that is
            not a valid snapshot (the error names it), snapshots of several runs, or two snapshots of the
            same time and profile.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"directory {str(folder)!r} does not exist or is not a folder")
    snapshots = []
    for path in sorted(folder.glob("*.safetensors")):
        if not path.is_file():
            continue
        snapshot = _read_header(path)
        if snapshot is not None:
            snapshots.append(snapshot)
    if not snapshots:
        raise ValueError(f"directory {str(folder)!r} holds no post-hoc EMA snapshots (*.safetensors)")
    snapshots.sort(key=lambda s: (s.t, s.gamma, s.path.name))
    runs = sorted({s.run for s in snapshots})
    if len(runs) > 1:
        counts = ", ".join(f"{run or '(no id)'}: {sum(s.run == run for s in snapshots)} files" for run in runs)
        raise ValueError(
            f"directory {str(folder)!r} holds the snapshots of {len(runs)} runs ({counts}): a synthesis mixes "
            "nothing; keep one run per folder (move the others' files away)"
        )
    for a, b in itertools.pairwise(snapshots):
        if a.t == b.t and a.gamma == b.gamma:
            raise ValueError(
                f"directory {str(folder)!r} holds two snapshots of the same time t={a.t} and gamma={a.gamma}: "
                f"{a.path.name} and {b.path.name} (keep one run per folder)"
            )
    return snapshots


def save_synthesized(
    state: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a state dict (from :func:`synthesize`) atomically to a ``.safetensors`` file; returns its path.

    The file is marked (``format="polyak.posthoc"``, ``kind="synthesized"``) so that :func:`synthesize`
    skips it if it lands in a snapshot folder. Load it with ``safetensors.torch.load_file(path)``; the
    modules' extra state, if any, is in its metadata as JSON (``"extra_state"``).

    Args:
        state: tensors by name (shared or non-contiguous ones are copied), and modules' extra state (JSON).
        path: the file to write: a new path or a regular file (a symbolic link, a folder, a FIFO or a device
            is refused, never replaced); its folder must exist. Written under a temporary name in that
            folder, then renamed over ``path``.
        metadata: extra string metadata (e.g. ``sigma_rel`` and ``t``).
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    extra = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    try:
        extra_json = json.dumps(extra) if extra else None
    except (TypeError, ValueError) as e:
        raise ValueError(f"state must map names to tensors (or JSON extra state), got {sorted(extra)}: {e}") from None
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path must be a file path, got {path!r}")
    target = Path(path)
    if not target.parent.is_dir():
        raise ValueError(f"path {str(target)!r}: folder {str(target.parent)!r} does not exist")
    _check_replaceable(target)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in state.items():
        if name in extra:
            continue
        value = value.detach().to("cpu")
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen or not value.is_contiguous():
            value = value.contiguous().clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[name] = value
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, kind=_SYNTHESIZED)
    if extra_json is not None:
        meta["extra_state"] = extra_json
    _atomic_save(tensors, meta, target)
    return target
