"""Post-hoc EMA (Karras et al., EDM2, arXiv 2312.02696): choose the EMA length after training.

During training, :class:`PostHocEMA` tracks a few power-function EMAs (EDM2's defaults: ``sigma_rel`` 0.05
and 0.10) and every ``snapshot_every`` updates writes one snapshot of each into a folder. After training,
:func:`synthesize` rebuilds the power-function EMA of *any* ``sigma_rel`` in (0, 1/sqrt(12)), at any snapshot
time, as the least-squares combination of the snapshots' averaging profiles::

    A_ij = <p_i, p_j>,  b_i = <p_i, p_r>,  A x = b (float64, least squares),  x <- x / sum(x)
    weights = sum_i x_i * weights_i

where ``p`` is the profile of a power-function EMA at time ``t``, ``(gamma + 1) tau**gamma / t**(gamma + 1)``
on ``(0, t]``. Normalising ``x`` makes a constant model come out exactly.

Snapshots are `safetensors <https://github.com/huggingface/safetensors>`_ files, never pickles: reading a
snapshot folder cannot run code. Each file holds one profile at one time ``t`` (the update count), named
``ema-{sigma_rel:.4f}-{t:010d}.safetensors`` so that names sort by profile, then time; its metadata holds the
format marker (``format="polyak.posthoc"``, ``format_version="1"``), ``t``, ``gamma``, ``sigma_rel`` and,
for each tensor, the model's dtype and whether it is averaged. The averaged tensors are written from the
accumulator (the float32 master of a float16 or bfloat16 model), widened to float32 where narrower; buffers
and integer tensors are written as they are, and :func:`synthesize` copies them from the latest snapshot.

A write is atomic: the file is written under a temporary name that does not end in ``.safetensors`` (a
hidden ``.ema-....safetensors.tmp-PID`` in the same folder), flushed to disk, renamed over the final name,
and the folder is flushed too. A crash mid-write leaves every earlier snapshot intact and no half-written
file that looks like a snapshot (a stale ``*.tmp-*`` file may remain; delete it at will).

The command line, ``python -m polyak posthoc``, is :func:`posthoc_main` (see :func:`add_posthoc_arguments`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from polyak.ema import EMA, HANDLE_BUFFERS, _Together, unwrap_model
from polyak.schedules import _check_int, gamma_from_sigma_rel, power_function

if TYPE_CHECKING:
    from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList
    from ignite.engine.events import RemovableEventHandle

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PostHocEMA",
    "PostHocEMAHandler",
    "Snapshot",
    "add_posthoc_arguments",
    "list_snapshots",
    "posthoc_command",
    "posthoc_main",
    "profile_inner_product",
    "save_synthesized",
    "snapshot_name",
    "solve_weights",
    "synthesize",
]

FORMAT = "polyak.posthoc"
"""Value of the ``format`` metadata key of every file this module writes."""
FORMAT_VERSION = "1"
"""Value of the ``format_version`` metadata key; files of another version are refused."""

_SNAPSHOT = "snapshot"
_SYNTHESIZED = "synthesized"
_MAX_SIGMA_REL = 12**-0.5
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


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write ``tensors`` to ``path`` so that ``path`` is either absent, its old self, or whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _check_sigma_rel(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number in (0, 1/sqrt(12) ~ {_MAX_SIGMA_REL:.6f}), got {value!r}")
    value = float(value)
    if not 0 < value < _MAX_SIGMA_REL:  # also refuses nan
        raise ValueError(f"{name} must be in (0, 1/sqrt(12) ~ {_MAX_SIGMA_REL:.6f}), got {value!r}")
    return value


# -- training side ----------------------------------------------------------------------------------------
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
        directory: the snapshot folder; created (with parents) if missing. Existing snapshots of the same
            profile and time are replaced; keep one run per folder.
        handle_buffers, dtype, skip_nonfinite, device: keyword-only; passed to each :class:`~polyak.EMA`.

    Attributes:
        emas: the :class:`~polyak.EMA` of each profile, in the order of ``sigma_rels``.
        sigma_rels: the profiles' relative widths, as floats.
        gammas: the profiles' exponents.
        snapshot_every: as given.
        directory: the snapshot folder, as a :class:`~pathlib.Path`.

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

        A snapshot at a time already written replaces it. Nothing is written on ranks other than 0.

        Raises:
            RuntimeError: before the first update (a profile at ``t = 0`` is empty).
        """
        t = self.num_updates
        if t < 1:
            raise RuntimeError("no snapshot before the first update: the profiles are empty at t = 0")
        if not _is_writer():
            return []
        self.directory.mkdir(parents=True, exist_ok=True)
        written = []
        for sigma, gamma, ema in zip(self.sigma_rels, self.gammas, self.emas, strict=True):
            tensors, info = _snapshot_tensors(ema, self.handle_buffers)
            metadata = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "kind": _SNAPSHOT,
                "t": str(t),
                "gamma": repr(float(gamma)),
                "sigma_rel": repr(float(sigma)),
                "tensors": json.dumps(info),
            }
            path = self.directory / snapshot_name(sigma, t)
            _atomic_save(tensors, metadata, path)
            written.append(path)
        return written

    def state_dict(self) -> dict[str, Any]:
        """Each profile's :meth:`polyak.EMA.state_dict` and the profiles' widths; loads with ``weights_only``."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every": self.snapshot_every,
            "emas": [ema.state_dict() for ema in self.emas],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`: the profiles continue where they stopped.

        The profiles must match (same ``sigma_rels``, in order); everything is checked before anything
        changes. ``snapshot_every`` may differ from the saved run's.
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
        emas = state_dict["emas"]
        if not isinstance(emas, Sequence) or len(emas) != len(self.emas):
            raise ValueError(f"state_dict['emas'] must be a list of {len(self.emas)} EMA states, got {emas!r:.200}")
        # each EMA checks its state before changing anything; a later profile's failure undoes the earlier ones
        backups = [_clone_tree(ema.state_dict()) for ema in self.emas]
        try:
            for ema, state in zip(self.emas, emas, strict=True):
                ema.load_state_dict(state)
            counts = [ema.num_updates for ema in self.emas]
            if len(set(counts)) != 1:
                raise ValueError(f"state_dict['emas'] must hold one update count for all profiles, got {counts}")
        except BaseException:
            for ema, backup in zip(self.emas, backups, strict=True):
                ema.load_state_dict(backup)
            raise

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


def _snapshot_tensors(ema: EMA, handle_buffers: str) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The tensors of a snapshot (fresh copies: no shared storage) and the per-tensor metadata."""
    module = unwrap_model(ema.ema_model)
    state = ema.state_dict()
    weights: dict[str, Tensor] = state["ema_model"]
    masters: dict[str, Tensor] = state.get("master", {})
    # tied weights appear in the state dict under each alias; the master is keyed by the first name only
    by_storage = {
        (weights[n].data_ptr(), tuple(weights[n].shape)): m for n, m in masters.items() if weights[n].numel() > 0
    }
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    tensors: dict[str, Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, value in weights.items():
        if not isinstance(value, Tensor):  # extra state of a module: not a tensor, not averaged
            continue
        averaged = value.is_floating_point() and (name in params or handle_buffers == "update")
        source = value
        if averaged:
            source = masters.get(name, by_storage.get((value.data_ptr(), tuple(value.shape)), value))
        tensors[name] = _widened(source) if averaged else value.detach().to("cpu", copy=True).contiguous()
        info[name] = {"dtype": str(value.dtype), "averaged": averaged}
    return tensors, info


# -- synthesis --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """What the header of one snapshot file says: enough to solve for its weight without reading tensors."""

    path: Path
    t: int
    gamma: float
    sigma_rel: float
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype": str, "averaged": bool}, in the model's order
    shapes: dict[str, tuple[int, ...]]


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
    return Snapshot(path, t, gamma, sigma_rel, tensors, shapes)


def list_snapshots(directory: str | os.PathLike[str]) -> list[Snapshot]:
    """The snapshots in ``directory``, sorted by time, then ``gamma``; reads only the files' headers.

    Every ``*.safetensors`` file in the folder must be a snapshot or a file written by
    :func:`save_synthesized` (those are skipped); other files (``*.pt``, temporary files) are ignored and
    never opened.

    Raises:
        ValueError: ``directory`` is not a folder, holds no snapshot, holds a ``*.safetensors`` file that is
            not a valid snapshot (the error names it), or two snapshots of the same time and profile.
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
    for a, b in itertools.pairwise(snapshots):
        if a.t == b.t and a.gamma == b.gamma:
            raise ValueError(
                f"directory {str(folder)!r} holds two snapshots of the same time t={a.t} and gamma={a.gamma}: "
                f"{a.path.name} and {b.path.name} (keep one run per folder)"
            )
    return snapshots


def profile_inner_product(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> Tensor:
    """``<p_a, p_b>`` of two power-function EMA profiles, elementwise over broadcast float64 tensors.

    ``(g_a + 1)(g_b + 1) (t_a / t_b) ** e / ((g_a + g_b + 1) max(t_a, t_b))``, ``e = g_b`` if ``t_a < t_b``
    else ``-g_a``.

    Example:
        >>> from polyak.posthoc import profile_inner_product
        >>> round(float(profile_inner_product(100, 0.0, 100, 0.0)), 6)  # the running mean's profile, 1/t
        0.01
    """
    t_a, g_a, t_b, g_b = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    e = torch.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** e / ((g_a + g_b + 1) * torch.maximum(t_a, t_b))


def solve_weights(ts: Sequence[int], gammas: Sequence[float], t_r: int, gamma_r: float) -> Tensor:
    """The float64 weights ``x`` (summing to 1) of snapshots ``(t_i, gamma_i)`` for the profile ``(t_r, gamma_r)``.

    Least squares on ``A x = b`` with ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_r>`` (``A`` is ill-conditioned,
    about ``n**4`` in the number of snapshots per profile: solved by SVD in float64), then normalised to sum 1.
    Where the target is one of the snapshots, ``x`` picks exactly that one.

    Example:
        >>> from polyak.posthoc import solve_weights
        >>> solve_weights([100, 200], [6.9, 6.9], 200, 6.9).tolist()
        [0.0, 1.0]
    """
    t = torch.tensor(list(ts), dtype=torch.float64)
    g = torch.tensor(list(gammas), dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("no snapshots to solve for")
    exact = ((t == t_r) & ((g - gamma_r).abs() <= 1e-12 * max(1.0, abs(gamma_r)))).nonzero()
    if exact.numel():
        x = torch.zeros_like(t)
        x[int(exact[0, 0])] = 1.0
        return x
    a = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_product(t[:, None], g[:, None], float(t_r), float(gamma_r))
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0]
    total = x.sum()
    if not torch.isfinite(total) or total == 0:
        raise ValueError(f"the snapshots' profiles cannot express t={t_r}, gamma={gamma_r} (weights {x.tolist()})")
    return x / total


def _target_time(snapshots: Sequence[Snapshot], step: object, directory: str | os.PathLike[str]) -> int:
    """``step`` checked to be a snapshot time; the latest snapshot time where it is None."""
    times = sorted({s.t for s in snapshots})
    if step is None:
        return times[-1]
    if isinstance(step, bool) or not isinstance(step, Integral):
        raise ValueError(f"step must be an int (a snapshot time), got {step!r}")
    if int(step) not in times:
        shown = ", ".join(map(str, times[:20])) + (", ..." if len(times) > 20 else "")
        raise ValueError(f"step={step} has no snapshot in {str(directory)!r}; its snapshot times are {shown}")
    return int(step)


def _progress(items: Sequence[Any], enabled: bool, desc: str) -> Iterator[Any]:
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: no bar without it
            pass
        else:
            yield from tqdm(items, desc=desc, unit="file", leave=False)
            return
    yield from items


def _output_dtype(info: dict[str, Any], dtype: torch.dtype | None) -> torch.dtype:
    own = _DTYPES[info["dtype"]]
    return dtype if dtype is not None and own.is_floating_point else own


@torch.no_grad()
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: float,
    step: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The state dict of the power-function EMA of width ``sigma_rel`` at snapshot time ``step``.

    Solves for the least-squares combination of the profiles of the snapshots with ``0 < t_i <= step``
    (see :func:`solve_weights`) and returns ``sum_i x_i * weights_i`` for the averaged tensors; buffers and
    integer tensors are those of the latest snapshot used. The snapshots are streamed one file, one tensor
    at a time into float64 accumulators: memory is one float64 copy of the averaged tensors plus the result
    and one tensor being read, however many snapshots. Only ``*.safetensors`` files are read, with
    ``safetensors.safe_open``: nothing is unpickled.

    Args:
        directory: the snapshot folder of a :class:`PostHocEMA`.
        sigma_rel: relative width of the wanted profile, in (0, 1/sqrt(12)); it may lie outside the
            tracked ones (extrapolation is less accurate).
        step: the time ``t_r`` of the wanted EMA: one of the snapshot times (the update count); by default
            the latest. Snapshots after it are not used.
        dtype: keyword-only; the dtype of the returned floating tensors. By default each tensor has the
            original model's dtype (float32 or float64 averages are rounded once, at the end).
        progress: keyword-only; show a tqdm progress bar over the snapshots (if tqdm is installed).

    Returns:
        A state dict for ``model.load_state_dict``, in the model's tensor order, on the CPU.

    Raises:
        ValueError: ``sigma_rel`` is outside (0, 1/sqrt(12)) or not a number; ``step`` is not a snapshot
            time; ``directory`` is missing, empty of snapshots, or holds an invalid ``*.safetensors`` file
            (named in the message), or snapshots of different models.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from polyak.posthoc import PostHocEMA, synthesize
        >>> model = nn.Linear(1, 1)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     posthoc = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=10, directory=folder)
        ...     for _ in range(30):
        ...         _ = posthoc.update()
        ...     state = synthesize(folder, sigma_rel=0.15, step=20)
        >>> torch.equal(state["weight"], model.weight.detach())  # a constant model comes out exactly
        True
    """
    sigma_rel = _check_sigma_rel("sigma_rel", sigma_rel)
    gamma_r = gamma_from_sigma_rel(sigma_rel)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    snapshots = list_snapshots(directory)
    t_r = _target_time(snapshots, step, directory)
    used = [s for s in snapshots if s.t <= t_r]
    latest = used[-1]
    for s in used:
        if s.shapes != latest.shapes or s.tensors != latest.tensors:
            raise ValueError(
                f"{s.path} does not hold the same tensors as {latest.path} (snapshots of different models?)"
            )
    x = solve_weights([s.t for s in used], [s.gamma for s in used], t_r, gamma_r)
    averaged = [n for n, info in latest.tensors.items() if info["averaged"]]
    acc = {n: torch.zeros(latest.shapes[n], dtype=torch.float64) for n in averaged}
    for s, weight in _progress(list(zip(used, x.tolist(), strict=True)), progress, f"sigma_rel={sigma_rel:g}"):
        if weight == 0.0:
            continue
        with safe_open(str(s.path), framework="pt", device="cpu") as f:
            for n in averaged:
                acc[n].add_(f.get_tensor(n), alpha=weight)
    out: dict[str, Tensor] = {}
    with safe_open(str(latest.path), framework="pt", device="cpu") as f:
        for name, info in latest.tensors.items():
            value = acc.pop(name) if info["averaged"] else f.get_tensor(name)
            out[name] = value.to(_output_dtype(info, dtype))
    return out


def save_synthesized(
    state: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a state dict (from :func:`synthesize`) atomically to a ``.safetensors`` file; returns its path.

    The file is marked (``format="polyak.posthoc"``, ``kind="synthesized"``) so that :func:`synthesize`
    skips it if it lands in a snapshot folder. Load it with ``safetensors.torch.load_file(path)``.

    Args:
        state: tensors by name; shared or non-contiguous ones are copied.
        path: the file to write; its folder must exist.
        metadata: extra string metadata (e.g. ``sigma_rel`` and ``t``).
    """
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("state must be a mapping of names to tensors")
    target = Path(path)
    if not target.parent.is_dir():
        raise ValueError(f"path {str(target)!r}: folder {str(target.parent)!r} does not exist")
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in state.items():
        value = value.detach().to("cpu")
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen or not value.is_contiguous():
            value = value.contiguous().clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[name] = value
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, kind=_SYNTHESIZED)
    _atomic_save(tensors, meta, target)
    return target


# -- command line -----------------------------------------------------------------------------------------
CLI_DESCRIPTION = (
    "Synthesize the power-function EMA of any sigma_rel from the snapshots of a polyak.posthoc.PostHocEMA "
    "(Karras et al., EDM2) and write it as a safetensors file. With --sigma-rel, --out is the file to write "
    "(or an existing folder to write into); with --sweep, --out is a folder (created if missing) that gets "
    "one file per value, named posthoc-sigma{sigma_rel:.4f}-t{t:010d}.safetensors. Load a result with "
    "safetensors.torch.load_file(path) and model.load_state_dict(...)."
)
_CLI_DTYPES = {"model": None, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _sigma_rel_arg(text: str) -> float:
    try:
        return _check_sigma_rel("sigma_rel", float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sweep_arg(text: str) -> list[float]:
    """``START:STOP:STEP`` -> START, START + STEP, ..., up to STOP included (within float tolerance)."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, stride = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be START:STOP:STEP (e.g. 0.03:0.20:0.01), got {text!r}") from None
    if not (math.isfinite(stride) and stride > 0 and start <= stop):
        raise argparse.ArgumentTypeError(f"needs STEP > 0 and START <= STOP, got {text!r}")
    count = math.floor((stop - start) / stride + 1e-9) + 1
    if count > 10_000:
        raise argparse.ArgumentTypeError(f"asks for {count} values (at most 10000), got {text!r}")
    values = [round(start + i * stride, 12) for i in range(count)]
    for v in values:
        _sigma_rel_arg(str(v))
    return values


def add_posthoc_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``python -m polyak posthoc`` to ``parser``; sets ``func=posthoc_command``.

    To wire it as a sub-command::

        p = subparsers.add_parser("posthoc", help="...", description=polyak.posthoc.CLI_DESCRIPTION)
        polyak.posthoc.add_posthoc_arguments(p)
        ...
        args = parser.parse_args(argv)
        return args.func(args)
    """
    parser.add_argument("--snapshots", required=True, metavar="DIR", help="the PostHocEMA snapshot folder")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--sigma-rel",
        type=_sigma_rel_arg,
        metavar="S",
        help=f"relative width of the EMA to synthesize, in (0, {_MAX_SIGMA_REL:.4f})",
    )
    which.add_argument(
        "--sweep",
        type=_sweep_arg,
        metavar="START:STOP:STEP",
        help="synthesize every sigma_rel from START to STOP (inclusive) by STEP, one file each",
    )
    parser.add_argument(
        "--step", type=int, default=None, metavar="N", help="snapshot time to synthesize at (default: the latest)"
    )
    parser.add_argument("--out", required=True, metavar="PATH", help="output file (--sigma-rel) or folder (--sweep)")
    parser.add_argument(
        "--dtype",
        choices=sorted(_CLI_DTYPES),
        default="model",
        help="dtype of the floating tensors written (default: the model's own)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.set_defaults(func=posthoc_command)
    return parser


def _output_name(sigma_rel: float, t: int) -> str:
    return f"posthoc-sigma{sigma_rel:.4f}-t{t:010d}.safetensors"


def posthoc_command(args: argparse.Namespace) -> int:
    """Run ``python -m polyak posthoc`` with parsed ``args``; returns the exit status (2 on bad input)."""
    try:
        t_r = _target_time(list_snapshots(args.snapshots), args.step, args.snapshots)
        dtype = _CLI_DTYPES[args.dtype]
        out = Path(args.out)
        if args.sweep is not None:
            out.mkdir(parents=True, exist_ok=True)
            targets = [(s, out / _output_name(s, t_r)) for s in args.sweep]
        else:
            target = out / _output_name(args.sigma_rel, t_r) if out.is_dir() else out
            targets = [(args.sigma_rel, target)]
        show = not args.no_progress
        for sigma_rel, path in _progress(targets, show and len(targets) > 1, "sweep"):
            state = synthesize(args.snapshots, sigma_rel, args.step, dtype=dtype, progress=show and len(targets) == 1)
            save_synthesized(
                state,
                path,
                {"sigma_rel": repr(sigma_rel), "gamma": repr(gamma_from_sigma_rel(sigma_rel)), "t": str(t_r)},
            )
            print(f"wrote {path} (sigma_rel={sigma_rel:g}, t={t_r})")
    except (ValueError, OSError) as e:
        print(f"polyak posthoc: error: {e}", file=sys.stderr)
        return 2
    return 0


def posthoc_main(argv: Sequence[str] | None = None) -> int:
    """``python -m polyak posthoc [options]`` as a function: ``argv`` are the options (``sys.argv[1:]``).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from polyak.posthoc import PostHocEMA, posthoc_main
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     posthoc = PostHocEMA(nn.Linear(1, 1), snapshot_every=2, directory=Path(folder, "snaps"))
        ...     for _ in range(4):
        ...         _ = posthoc.update()
        ...     out = Path(folder, "ema.safetensors")
        ...     posthoc_main(["--snapshots", str(posthoc.directory), "--sigma-rel", "0.07",
        ...                   "--out", str(out), "--no-progress"]) == 0 and out.is_file()
        wrote ... (sigma_rel=0.07, t=4)
        True
    """
    parser = argparse.ArgumentParser(prog="polyak posthoc", description=CLI_DESCRIPTION)
    add_posthoc_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


# -- pytorch-ignite ---------------------------------------------------------------------------------------
class PostHocEMAHandler:
    """:class:`PostHocEMA` on an ignite ``Engine``'s events (ignite is imported only by :meth:`attach`).

    Takes the arguments of :class:`PostHocEMA`. Put the handler in ``Checkpoint(to_save=...)`` to resume:
    its :meth:`state_dict` is the :class:`PostHocEMA`'s.

    Attributes:
        posthoc: the :class:`PostHocEMA` underneath.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from ignite.engine import Engine
        >>> from polyak.posthoc import PostHocEMAHandler
        >>> model = nn.Linear(2, 1)
        >>> trainer = Engine(lambda engine, batch: None)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     handler = PostHocEMAHandler(model, snapshot_every=4, directory=folder)
        ...     handle = handler.attach(trainer)
        ...     _ = trainer.run(range(10), max_epochs=1)
        ...     len(list(handler.posthoc.directory.glob("*.safetensors"))), handler.posthoc.num_updates
        (4, 10)
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
    ) -> None:
        self.posthoc = PostHocEMA(
            model,
            sigma_rels,
            snapshot_every,
            directory,
            handle_buffers=handle_buffers,
            dtype=dtype,
            skip_nonfinite=skip_nonfinite,
            device=device,
        )

    @property
    def ema_models(self) -> list[nn.Module]:
        """The averaged model of each profile."""
        return self.posthoc.ema_models

    def attach(
        self,
        engine: Engine,
        event: str | Events | CallableEventWithFilter | EventsList | None = None,
    ) -> RemovableEventHandle:
        """Update (and snapshot) on ``event`` of ``engine``, ``Events.ITERATION_COMPLETED`` by default.

        Returns:
            The removable handle of the registered handler: ``handle.remove()`` detaches it.
        """
        from ignite.engine import Engine, Events

        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an ignite Engine, got {type(engine).__name__}")
        return engine.add_event_handler(Events.ITERATION_COMPLETED if event is None else event, self._update)

    def _update(self, engine: Engine) -> None:
        self.posthoc.update()

    def state_dict(self) -> dict[str, Any]:
        """The :meth:`PostHocEMA.state_dict`."""
        return self.posthoc.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.posthoc.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.posthoc!r})"
