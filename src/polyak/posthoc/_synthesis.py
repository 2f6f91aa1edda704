"""Synthesis: the post-hoc EMA of any ``sigma_rel`` from a snapshot folder, streamed file by file."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from numbers import Integral
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from polyak.posthoc._files import _DTYPES, Snapshot, list_snapshots
from polyak.posthoc._math import solve_weights
from polyak.posthoc._tracking import _check_sigma_rel
from polyak.schedules import gamma_from_sigma_rel


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
        A state dict for ``model.load_state_dict``, in the model's tensor order, on the CPU (with the modules'
        extra state, ``get_extra_state()``, of the latest snapshot).

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
    out: dict[str, Any] = {}
    with safe_open(str(latest.path), framework="pt", device="cpu") as f:
        for name, info in latest.tensors.items():
            value = acc.pop(name) if info["averaged"] else f.get_tensor(name)
            out[name] = value.to(_output_dtype(info, dtype))
    out.update(latest.extra_state)  # modules' extra state, as the latest snapshot has it
    return out
