"""How a group of tensors is updated: one small object per strategy, all with the same ``apply(m)``.

A group is the averaged tensors that share the online model's (device, dtype) and the EMA model's; the plan
(:mod:`polyak.ema`) pairs them and picks a kernel once. Every kernel reads the online tensors and writes the
EMA model's *tensor objects* (never a cached ``.data``): an update follows the tensors wherever their data
lives now. Private buffers (float32 masters, staging, a flat buffer) are the kernels' own.

* :class:`Lerp`: the EMA model's tensors are the average and the online values can be read as they are:
  one ``_foreach_lerp_`` (one ``lerp_`` where both sides are flat).
* :class:`Staged`: the online values must change dtype or device first (a staging copy), and/or the average
  lives in a wider *master* (float32 for float16/bfloat16 models), copied out to the EMA model after.
* :class:`Stochastic`: a bfloat16 average rounded stochastically (unbiased), through a float32 work buffer.
* :class:`Compiled`: a master's update as one ``torch.compile``'d kernel (flat buffers only).
"""

from __future__ import annotations

import abc
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polyak._sharding import local


@dataclass
class Buf:
    """Tensors updated together: ``views``, and ``flat`` where they are exactly the views of one buffer."""

    views: list[Tensor]
    flat: Tensor | None = None

    @classmethod
    def empty_like(cls, like: list[Tensor], dtype: torch.dtype, device: torch.device, pin: bool = False) -> Buf:
        flat = torch.empty(sum(t.numel() for t in like), dtype=dtype, device=device, pin_memory=pin)
        return cls(split_views(flat, like), flat)


def split_views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Views of ``flat`` shaped (and strided, for channels_last and other dense layouts) like ``like``."""
    views, offset = [], 0
    for t in like:
        views.append(flat.as_strided(t.shape, dense_strides(t), flat.storage_offset() + offset))
        offset += t.numel()
    return views


def dense_strides(t: Tensor) -> tuple[int, ...]:
    """``t``'s strides if they lay it out densely without overlap (contiguous, channels_last, ...), else the
    contiguous ones."""
    if t.is_contiguous():
        return torch.empty(t.shape, device="meta").stride()
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), -d))
    expected, ok = 1, True
    for d in order:
        if t.shape[d] != 1 and t.stride(d) != expected:
            ok = False
            break
        expected *= t.shape[d]
    return t.stride() if ok else torch.empty(t.shape, device="meta").stride()


def lerp(dst: Buf, src: Buf, m: float | Tensor) -> None:
    if dst.flat is not None and src.flat is not None:
        dst.flat.lerp_(src.flat, m)
    else:
        torch._foreach_lerp_(dst.views, src.views, m)


def copy(dst: Buf, src: Buf, non_blocking: bool = False) -> None:
    if dst.flat is not None and src.flat is not None:
        dst.flat.copy_(src.flat, non_blocking=non_blocking)
    else:
        torch._foreach_copy_(dst.views, src.views, non_blocking=non_blocking)


class Kernel(abc.ABC):
    """The update of one group. ``online``/``ema`` hold the tensors (for a sharded group, the DTensors, whose
    local shards :meth:`refetch` takes afresh: FSDP2 may re-allocate them)."""

    master: Buf | None = None

    def __init__(self, names: list[str], online: Buf, ema: Buf, sharded: tuple[list[Tensor], list[Tensor]] | None):
        self.names = names
        self.online = online
        self.ema = ema
        self.sharded = sharded
        # the EMA model's dtype the kernel writes (the tensors may be converted later: that is a change)
        self.ema_dtype = ema.views[0].dtype

    def refetch(self) -> None:
        if self.sharded is not None:
            self.online.views = list(map(local, self.sharded[0]))
            self.ema.views = list(map(local, self.sharded[1]))

    def stage(self) -> None:  # noqa: B027 - most kernels read the online values as they are
        """Bring the online values to where :meth:`apply` reads them (nothing for most kernels)."""

    def source(self) -> Buf:
        """What :meth:`apply` reads: the online values, or their staged copy."""
        return self.online

    @abc.abstractmethod
    def apply(self, m: float) -> None:
        """Fold the online values into the average with momentum ``m``."""

    def resync(self) -> None:
        """Take the master's values from the EMA model (after someone else wrote into it)."""
        if self.master is not None:
            copy(self.master, self.ema)

    @property
    def accumulator(self) -> Buf:
        return self.master if self.master is not None else self.ema


class Lerp(Kernel):
    """The EMA model's tensors accumulate, and read the online tensors as they are."""

    def apply(self, m: float) -> None:
        lerp(self.ema, self.online, m)


class Staged(Kernel):
    """Online values staged into the accumulator's dtype and device first; the average in a master where
    the EMA model's dtype is not the accumulator's, copied out after each update."""

    def __init__(
        self,
        names: list[str],
        online: Buf,
        ema: Buf,
        sharded: tuple[list[Tensor], list[Tensor]] | None,
        acc_dtype: torch.dtype,
        work_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(names, online, ema, sharded)
        device = ema.views[0].device
        online_device = online.views[0].device
        if acc_dtype != ema.views[0].dtype:
            self.master = Buf.empty_like(ema.views, acc_dtype, device)
            copy(self.master, ema)
        work_dtype = work_dtype or acc_dtype
        self.staging: Buf | None = None
        self.wait_for: torch.device | None = None
        if work_dtype != online.views[0].dtype or device != online_device:
            pin = device.type == "cpu" and online_device.type == "cuda"
            self.staging = Buf.empty_like(ema.views, work_dtype, device, pin)
            if pin:
                self.wait_for = online_device

    def stage(self) -> None:
        if self.staging is not None:
            copy(self.staging, self.online, non_blocking=self.wait_for is not None)
            if self.wait_for is not None:
                torch.cuda.current_stream(self.wait_for).synchronize()

    def source(self) -> Buf:
        return self.staging if self.staging is not None else self.online

    def apply(self, m: float) -> None:
        lerp(self.accumulator, self.source(), m)
        if self.master is not None:
            copy(self.ema, self.master)


class Stochastic(Staged):
    """``acc <- lerp(acc, staging, m)`` computed in float32, rounded to bfloat16 stochastically (unbiased)."""

    def __init__(
        self,
        names: list[str],
        online: Buf,
        ema: Buf,
        sharded: tuple[list[Tensor], list[Tensor]] | None,
        generator: torch.Generator,
    ) -> None:
        super().__init__(names, online, ema, sharded, torch.bfloat16, work_dtype=torch.float32)
        device = ema.views[0].device
        if self.staging is None:  # float32 staging, always: it receives the random bits after the lerp
            self.staging = Buf.empty_like(ema.views, torch.float32, device)
        self.rounding = Buf.empty_like(ema.views, torch.float32, device)
        self.mask = torch.tensor(-65536, dtype=torch.int32, device=device)  # a tensor: no scalar per update
        self.generator = generator

    def apply(self, m: float) -> None:
        assert self.staging is not None and self.staging.flat is not None and self.rounding.flat is not None
        acc = self.accumulator
        copy(self.rounding, acc)
        lerp(self.rounding, self.staging, m)
        # Adding uniform random bits below bfloat16's last place and truncating rounds up with probability
        # equal to the distance to the lower neighbour: unbiased.
        noise = self.staging.flat.view(torch.int32)
        torch.randint(0, 1 << 16, noise.shape, out=noise, generator=self.generator)
        self.rounding.flat.view(torch.int32).add_(noise).bitwise_and_(self.mask)
        copy(acc, self.rounding)
        if self.master is not None:
            copy(self.ema, self.master)


class Compiled(Staged):
    """``compile=True``: a master's whole update as one kernel generated by ``torch.compile`` (flat buffers).

    With a flat online model on the master's device, the kernel reads the online values as they are (no
    staging). Where compiling fails (no C++ compiler, ...), it warns once and runs as :class:`Staged`.
    """

    def __init__(
        self,
        names: list[str],
        online: Buf,
        ema: Buf,
        sharded: tuple[list[Tensor], list[Tensor]] | None,
        acc_dtype: torch.dtype,
    ) -> None:
        super().__init__(names, online, ema, sharded, acc_dtype)
        assert self.master is not None and self.master.flat is not None and ema.flat is not None
        self.weight = torch.zeros((), dtype=acc_dtype, device=self.master.flat.device)
        if online.flat is not None and online.flat.device == self.master.flat.device:
            self.staging = None  # the kernel converts the online values as it reads them
        self.fused = True

    def apply(self, m: float) -> None:
        if self.fused:
            assert self.master is not None and self.master.flat is not None and self.ema.flat is not None
            source = self.source()
            assert source.flat is not None
            self.weight.fill_(m)
            try:
                _compiled_master_update(self.master.flat.numel())(
                    self.master.flat, source.flat, self.ema.flat, self.weight
                )
                return
            except Exception as e:  # torch.compile needs a working compiler (a C++ one on the CPU)
                warnings.warn(
                    f"EMA(compile=True) could not compile its update ({type(e).__name__}: {e}); "
                    "using the eager update instead",
                    RuntimeWarning,
                    stacklevel=5,
                )
                self.fused = False
                if self.staging is None:
                    self.staging = Buf.empty_like(self.ema.views, self.master.flat.dtype, self.master.flat.device)
                    self.stage()
        super().apply(m)


def _master_update(master: Tensor, online: Tensor, ema: Tensor, weight: Tensor) -> None:
    master.lerp_(online.to(master.dtype), weight)
    ema.copy_(master)


_COMPILED: dict[int, Any] = {}


def _compiled_master_update(numel: int) -> Any:
    """``_master_update`` compiled for 1-D tensors of ``numel`` elements.

    Static shapes: a kernel compiled for any length ran at half the speed of one for a fixed length (85M
    elements, 2 CPU cores). Each length gets a code object of its own, so that many groups do not run into
    torch.compile's limit of recompilations per code object.
    """
    compiled = _COMPILED.get(numel)
    if compiled is None:
        code = _master_update.__code__.replace(co_name=f"_master_update_{numel}")
        function = types.FunctionType(code, _master_update.__globals__, code.co_name)
        compiled = _COMPILED[numel] = torch.compile(function, dynamic=False, fullgraph=True)
    return compiled
