"""How a group of tensors is updated: one small object per strategy, all with the same ``apply(m)``.

A group is the averaged tensors that share the online model's (device, dtype) and the EMA model's; the plan
(:mod:`polyak.ema`) pairs them and picks a kernel once. Every kernel reads the online tensors and writes the
EMA model's *tensor objects* (never a cached ``.data``): an update follows the tensors wherever their data
lives now. Private buffers (float32 masters, scratch, a flat buffer) are the kernels' own.

* :class:`Lerp`: the EMA model's tensors are the average and the online values can be read as they are:
  one ``_foreach_lerp_`` (one ``lerp_`` where both sides are flat).
* :class:`Staged`: the online values must change dtype or device first (staged), and/or the average lives in
  a wider *master* (float32 for float16/bfloat16 models), copied out to the EMA model after; chunk by chunk,
  through a scratch buffer of one chunk (no staging copy of the whole model).
* :class:`Stochastic`: a bfloat16 average rounded stochastically (unbiased), through float32 scratch.
* :class:`Compiled`: a master's update as one ``torch.compile``'d kernel (flat buffers only).
"""

from __future__ import annotations

import abc
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from polyak._sharding import local
from polyak._warn import warn


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


def same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values, a NaN where the other holds a NaN (``torch.equal`` is
    False wherever a NaN is)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


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


CHUNK = 1 << 20
"""Elements per chunk of a staged update. Converting the online values and averaging them chunk by chunk needs
a scratch buffer of one chunk (4 MiB in float32) instead of a staging copy of the whole model, and was as fast
or faster than three passes over the model (2 CPU cores: 2.2x instead of 2.5x the time of a plain float32 lerp
of the same tensors). Chunks of 64K elements fell apart when other processes used the cores."""


@dataclass
class Chunk:
    """One chunk of a staged update: the online values it reads, the accumulator's part it averages into and,
    where that is a master, the EMA model's part it writes after. Tensors up to :data:`CHUNK` elements are
    taken whole (the tensor objects: they follow a ``.data`` assignment); larger ones in 1-D pieces."""

    online: Buf
    acc: Buf
    ema: Buf | None
    numel: int
    scratch: list[Buf] | None = None
    low: Buf | None = None  # a split master's low halves
    words: list[Tensor] | None = None  # int32 views of scratch shaped like the parts (a split master)


def _piece(t: Tensor, start: int, n: int) -> Tensor:
    """Elements ``start:start + n`` of a densely laid out ``t``, in memory order."""
    return t.as_strided((n,), (1,), t.storage_offset() + start)


def _splittable(tensors: list[Tensor]) -> bool:
    """Whether pieces in memory order are the same elements of each of ``tensors`` (dense, alike strides)."""
    strides = dense_strides(tensors[0])
    return all(t.stride() == strides and t.shape == tensors[0].shape for t in tensors)


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
        self._plan: list[Chunk] | None = None
        self._pieces: list[tuple[Tensor, int]] = []  # the tensors read in pieces, and their data's address

    def watched(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """What of the tensors it reads the update needs to stay as it was, which a ``.data`` assigned by hand may
        change (:class:`polyak._tracking.Structure` checks it before each update): of the online tensors it
        reads as objects, their dtypes and shapes; of the views of a flat buffer, their data pointers (a view
        leaving it) and, with two or more dimensions, their strides (``p.data = p.data.t()`` keeps the memory,
        not the order of its elements). Returns ``(shaped, pointed, strided)``."""
        if self.sharded is not None:
            return [], [], []
        flat = [t for b in (self.online, self.ema) if b.flat is not None for t in b.views]
        shaped = self.online.views if self.online.flat is None else []
        return shaped, flat, [t for t in flat if t.dim() > 1]

    def refetch(self) -> None:
        if self.sharded is not None:
            before = self.online.views + self.ema.views
            self.online.views = list(map(local, self.sharded[0]))
            self.ema.views = list(map(local, self.sharded[1]))
            if any(a is not b for a, b in zip(before, self.online.views + self.ema.views, strict=True)):
                self._plan = None

    def chunks(self) -> list[Chunk]:
        """The chunks of the update, planned once (again where a tensor read in pieces has new data)."""
        if self._plan is None or any(t.data_ptr() != ptr for t, ptr in self._pieces):
            self._plan = self._chunks()
        return self._plan

    def _chunks(self) -> list[Chunk]:
        sides = self._sides()
        flats = [s.flat for s in sides]
        offset = 0  # of the chunk being filled, in the elements of the group (a flat buffer's order)

        def chunk(parts: list[list[Tensor]], numel: int) -> Chunk:
            # a side that is a flat buffer is read as one slice of it
            bufs = [
                Buf(
                    p,
                    f[offset : offset + numel] if f is not None else p[0] if len(p) == 1 and p[0].dim() == 1 else None,
                )
                for p, f in zip(parts, flats, strict=True)
            ]
            return self._chunk(bufs, numel)

        self._pieces = []
        if all(f is not None for f in flats):
            total = flats[0].numel()  # type: ignore[union-attr]
            out = []
            for offset in range(0, total, CHUNK):
                out.append(chunk([[f[offset : offset + CHUNK]] for f in flats], min(CHUNK, total - offset)))  # type: ignore[index]
            return out
        out = []
        parts: list[list[Tensor]] = [[] for _ in sides]
        numel = 0

        def flush() -> None:
            nonlocal parts, numel, offset
            out.append(chunk(parts, numel))
            parts, offset, numel = [[] for _ in sides], offset + numel, 0

        for i in range(len(self.names)):
            tensors = [s.views[i] for s in sides]
            n = tensors[0].numel()
            if numel and numel + n > CHUNK:
                flush()
            if n <= CHUNK or not _splittable(tensors):
                for side, t in zip(parts, tensors, strict=True):
                    side.append(t)
                numel += n
                continue
            self._pieces += [(t, t.data_ptr()) for t in (self.online.views[i], self.ema.views[i])]
            for start in range(0, n, CHUNK):
                size = min(CHUNK, n - start)
                for side, t in zip(parts, tensors, strict=True):
                    side.append(_piece(t, start, size))
                numel += size
                if numel >= CHUNK:
                    flush()
        if numel:
            flush()
        return out

    def _sides(self) -> list[Buf]:
        """What a chunk holds a part of, in :meth:`_chunk`'s order."""
        return [self.online, self.accumulator] + ([self.ema] if self.master is not None else [])

    def _chunk(self, parts: list[Buf], numel: int) -> Chunk:
        return Chunk(parts[0], parts[1], parts[2] if len(parts) > 2 else None, numel)

    def staged(self, c: Chunk) -> Buf:
        """The chunk's online values where the update reads them (as they are, unless a kernel stages them)."""
        return c.online

    @abc.abstractmethod
    def apply(self, m: float) -> None:
        """Fold the online values into the average with momentum ``m``."""

    # -- the master, where there is one (the float32 average of a low-precision EMA model) ------------------
    @property
    def has_master(self) -> bool:
        return self.master is not None

    def master_values(self) -> list[Tensor]:
        """The master of each tensor, in the accumulator's dtype (views where the master is kept whole)."""
        assert self.master is not None
        return self.master.views

    def round_master(self, master: Tensor) -> Tensor:
        """``master`` rounded as an update writes it into the EMA model."""
        return master.to(self.ema_dtype)

    def write_master(self, i: int, value: Tensor) -> None:
        """Make ``value`` the master of tensor ``i`` (the EMA model's tensor is written after the update)."""
        assert self.master is not None
        self.master.views[i].copy_(value)

    def revalidate(self, changed: list[int]) -> None:
        """Someone wrote into the EMA model's tensors ``changed`` (by their version counters): where a master no
        longer rounds to what the EMA model holds, the EMA model's value is the average now."""
        assert self.master is not None
        for i in changed:
            view, ema = self.master.views[i], self.ema.views[i]
            if not same_values(view.to(self.ema_dtype), ema):
                view.copy_(ema)

    @property
    def accumulator(self) -> Buf:
        return self.master if self.master is not None else self.ema

    def clear_for_copy(self) -> None:
        """Before an update of momentum 1 (a copy): the average made zero, every part of it. A lerp of weight 1
        computes ``online - (online - acc) * 0``, NaN wherever the average held NaN or Inf; from zero it is the
        online value, exactly."""
        torch._foreach_zero_(self.accumulator.views)


def apply_together(kernels: list[Kernel], momenta: list[float]) -> None:
    """Alike kernels of several EMAs of one model (same tensors, layouts and kernel type), chunk by chunk:
    each chunk of online values read (and staged) once, then averaged into each EMA while in cache."""
    plans = [k.chunks() for k in kernels]
    if len(plans[0]) == 1 and type(kernels[0]) is Lerp:  # a second read of one chunk comes from cache anyway
        for k, m in zip(kernels, momenta, strict=True):
            k.apply(m)
        return
    for i, c in enumerate(plans[0]):
        source = kernels[0].staged(c)
        for plan, m in zip(plans, momenta, strict=True):
            lerp(plan[i].acc, source, m)
            ema = plan[i].ema
            if ema is not None:
                copy(ema, plan[i].acc)


class Lerp(Kernel):
    """The EMA model's tensors accumulate, and read the online tensors as they are."""

    def apply(self, m: float) -> None:
        lerp(self.ema, self.online, m)


GATHER_MAX = 1 << 15
"""Online tensors under this many elements run on one thread and cost a dispatch each in ``_foreach_lerp_``."""
GATHER_MIN = 32
"""Fewer small tensors than this are updated with the rest: gathering pays only where dispatches add up."""


class Gathered(Kernel):
    """Many small 1-D tensors (biases, norms, vectors of a ``ParameterList``) whose EMA side is one flat
    buffer: one ``torch.cat`` of the online tensors into scratch (no dispatch per tensor) and one ``lerp_`` of
    the flat buffer, chunk by chunk. The online tensors are read as they are, so a ``.data`` assignment on
    the model is followed; measured on 2000 x 1024 float32 (2 CPU cores): 0.6x the time of
    ``_foreach_lerp_``."""

    def __init__(self, names: list[str], online: Buf, ema: Buf) -> None:
        super().__init__(names, online, ema, None)
        assert ema.flat is not None and all(t.dim() == 1 for t in online.views)
        self.scratch: list[Tensor] = []

    def watched(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The online tensors' data pointers (half the cost of their dtypes and shapes, for many tensors): a
        ``.data`` assigned by hand moves them; ``torch.cat`` reads any dtype. The EMA side is a flat buffer."""
        return [], self.online.views + self.ema.views, []

    def staged(self, c: Chunk) -> Buf:
        if not self.scratch:
            size = max(p.numel for p in self.chunks())
            self.scratch = [torch.empty(size, dtype=self.ema_dtype, device=c.acc.views[0].device)]
        gathered = self.scratch[0][: c.numel]
        torch.cat(c.online.views, out=gathered)
        return Buf([gathered], gathered)

    def apply(self, m: float) -> None:
        for c in self.chunks():
            lerp(c.acc, self.staged(c), m)


class Staged(Kernel):
    """The online values converted to the accumulator's dtype and device (staged) where they must be, and/or
    averaged into a master where the EMA model's dtype is not the accumulator's, then copied out to the EMA
    model; chunk by chunk (:data:`CHUNK`), through a scratch buffer of one chunk, each chunk still in cache
    from one step to the next."""

    scratch_buffers = 1

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
        self.device = ema.views[0].device
        online_device = online.views[0].device
        if acc_dtype != ema.views[0].dtype:
            self.master = Buf.empty_like(ema.views, acc_dtype, self.device)
            copy(self.master, ema)
        work_dtype = work_dtype or acc_dtype
        # the dtype the online values are staged into (None: the update reads them as they are)
        self.work_dtype: torch.dtype | None = None
        if work_dtype != online.views[0].dtype or self.device != online_device:
            self.work_dtype = work_dtype
        self.pin = self.device.type == "cpu" and online_device.type == "cuda"
        self.wait_for = online_device if self.pin else None
        self.scratch: list[Tensor] = []  # flat buffers of one chunk, made at the first update that needs them

    def scratch_of(self, c: Chunk) -> list[Buf]:
        """The scratch buffers' views shaped like the chunk's tensors (made once per chunk)."""
        if c.scratch is None:
            if not self.scratch:
                assert self._plan is not None
                size = max(p.numel for p in self._plan)
                dtype = self.work_dtype or torch.float32
                self.scratch = [
                    torch.empty(size, dtype=dtype, device=self.device, pin_memory=self.pin)
                    for _ in range(self.scratch_buffers)
                ]
            c.scratch = [Buf(split_views(f[: c.numel], c.acc.views), f[: c.numel]) for f in self.scratch]
        return c.scratch

    def staged(self, c: Chunk) -> Buf:
        """The chunk's online values where the update reads them: as they are, or staged into scratch."""
        if self.work_dtype is None:
            return c.online
        staging = self.scratch_of(c)[0]
        copy(staging, c.online, non_blocking=self.wait_for is not None)
        if self.wait_for is not None:
            torch.cuda.current_stream(self.wait_for).synchronize()
        return staging

    def apply(self, m: float) -> None:
        for c in self.chunks():
            lerp(c.acc, self.staged(c), m)
            if c.ema is not None:
                copy(c.ema, c.acc)


class Stochastic(Staged):
    """``acc <- lerp(acc, online, m)`` computed in float32, rounded to bfloat16 stochastically (unbiased),
    chunk by chunk through two float32 scratch buffers of one chunk."""

    scratch_buffers = 2

    def __init__(
        self,
        names: list[str],
        online: Buf,
        ema: Buf,
        sharded: tuple[list[Tensor], list[Tensor]] | None,
        generator: torch.Generator,
    ) -> None:
        super().__init__(names, online, ema, sharded, torch.bfloat16, work_dtype=torch.float32)
        self.work_dtype = torch.float32  # staged always: the staging receives the random bits after the lerp
        self.mask = torch.tensor(-65536, dtype=torch.int32, device=self.device)  # no scalar per update
        self.generator = generator

    def apply(self, m: float) -> None:
        for c in self.chunks():
            staging = self.staged(c)
            rounding = self.scratch_of(c)[1]
            assert staging.flat is not None and rounding.flat is not None
            copy(rounding, c.acc)
            lerp(rounding, staging, m)
            # Adding uniform random bits below bfloat16's last place and truncating rounds up with probability
            # equal to the distance to the lower neighbour: unbiased.
            # A NaN whose bits lie within 0xFFFF of the top of its sign's range (every NaN staged from float16) would
            # carry into the sign bit: NaNs are made the canonical one first, as split_float32 does
            rounding.flat.nan_to_num_(nan=_NAN, posinf=_INF, neginf=-_INF)
            noise = staging.flat.view(torch.int32)
            torch.randint(0, 1 << 16, noise.shape, out=noise, generator=self.generator)
            rounding.flat.view(torch.int32).add_(noise).bitwise_and_(self.mask)
            copy(c.acc, rounding)
            if c.ema is not None:
                copy(c.ema, c.acc)


_NAN = float("nan")
_INF = float("inf")


class _Bits:
    """The constants of splitting, as tensors on one device: a Python scalar would be wrapped into a new
    tensor at every call."""

    _cache: ClassVar[dict[torch.device, _Bits]] = {}

    def __init__(self, device: torch.device) -> None:
        self.half = torch.tensor(0x8000, dtype=torch.int32, device=device)
        self.sixteen = torch.tensor(16, dtype=torch.int32, device=device)

    @classmethod
    def on(cls, device: torch.device) -> _Bits:
        if device not in cls._cache:
            cls._cache[device] = cls(device)
        return cls._cache[device]


def split_float32(x: Tensor, words: Tensor, hi: Tensor, lo: Tensor) -> None:
    """Write float32 ``x`` (flat; NaNs made canonical in place) as a bfloat16 high half ``hi`` (``x`` rounded
    to nearest, ties away from zero) and an int16 low half ``lo``, both flat; ``words`` is int32 scratch.

    With ``h = (bits + 0x8000) >> 16`` the remainder ``bits - (h << 16)`` lies in [-32768, 32767]: it fits an
    int16, and ``(h << 16) + lo`` gives the float32 bits back exactly. (Rounding half to even would need
    +32768.) A NaN whose bits lie within 0x8000 of the top of its sign's range would carry into the sign bit
    or out of it, so NaNs are first made the canonical one.
    """
    _high_words(x, words)
    hi.view(torch.int16).copy_(words)
    _low_words(x, words)
    lo.copy_(words)


def _high_words(x: Tensor, words: Tensor) -> None:
    """``words`` <- the high halves of ``x`` rounded (NaNs in ``x`` made canonical first)."""
    bits = _Bits.on(x.device)
    x.nan_to_num_(nan=_NAN, posinf=_INF, neginf=-_INF)
    torch.add(x.view(torch.int32), bits.half, out=words)
    words.bitwise_right_shift_(bits.sixteen)  # arithmetic: the sign stays


def _low_words(x: Tensor, words: Tensor) -> None:
    """``words`` (holding the high halves) <- the low halves of ``x``."""
    words.bitwise_left_shift_(_Bits.on(x.device).sixteen)
    torch.sub(x.view(torch.int32), words, out=words)


def join_float32(hi: Tensor, lo: Tensor, out: Tensor, low: Tensor | None = None) -> Tensor:
    """The float32 values whose high half is bfloat16 ``hi`` and low half int16 ``lo`` (flat), into ``out``
    (float32, flat); ``low``: int32 scratch like ``out``, or none (then a temporary is made)."""
    words = out.view(torch.int32)
    words.copy_(hi.view(torch.int16))
    words.bitwise_left_shift_(_Bits.on(out.device).sixteen)
    if low is None:
        low = torch.empty_like(words)
    low.copy_(lo)  # int16 to int32 by a copy: an add of mixed dtypes would make a temporary
    return out.view(torch.int32).add_(low).view(torch.float32)


class Split(Staged):
    """``master="split"``: the float32 average of a bfloat16 EMA model kept exactly in 2 more bytes per
    parameter: the EMA model's bfloat16 values are its high half (rounded to nearest), an int16 buffer its
    low half. Each chunk is joined into float32 scratch, averaged in float32, and split again: the result is,
    bit for bit, the update of a float32 master, and the EMA model the master rounded to nearest (ties away
    from zero where a float32 master rounds ties to even)."""

    scratch_buffers = 2

    def __init__(self, names: list[str], online: Buf, ema: Buf) -> None:
        super().__init__(names, online, ema, None, torch.bfloat16, work_dtype=torch.float32)
        assert self.ema_dtype == torch.bfloat16 and self.master is None
        self.work_dtype = torch.float32
        self.low = Buf.empty_like(ema.views, torch.int16, self.device)
        self.low.flat.zero_()  # type: ignore[union-attr]  # the master starts as the EMA model's values

    def _sides(self) -> list[Buf]:
        return [self.online, self.ema, self.low]

    def _chunk(self, parts: list[Buf], numel: int) -> Chunk:
        return Chunk(parts[0], parts[1], None, numel, low=parts[2])

    def _words(self, c: Chunk) -> list[Tensor]:
        """int32 views of the second scratch buffer shaped like the chunk's tensors."""
        if c.words is None:
            work = self.scratch_of(c)[1].flat
            assert work is not None
            c.words = split_views(work.view(torch.int32), c.acc.views)
        return c.words

    def apply(self, m: float) -> None:
        for c in self.chunks():
            first, second = self.scratch_of(c)
            assert first.flat is not None and second.flat is not None and c.low is not None
            assert c.low.flat is not None
            x, words = second.flat, first.flat.view(torch.int32)
            # join, with the first buffer as the low halves' room: then stage the online values into it
            if c.acc.flat is not None:
                join_float32(c.acc.flat, c.low.flat, x, low=words)
            else:
                torch._foreach_copy_(self._words(c), [t.view(torch.int16) for t in c.acc.views])
                x.view(torch.int32).bitwise_left_shift_(_Bits.on(x.device).sixteen)
                words.copy_(c.low.flat)
                x.view(torch.int32).add_(words)
            staging = self.staged(c)
            assert staging.flat is not None
            x.lerp_(staging.flat, m)
            _high_words(x, words)  # the staged values are used: their room is free
            if c.acc.flat is not None:
                c.acc.flat.view(torch.int16).copy_(words)
            else:
                high = split_views(words, c.acc.views)
                torch._foreach_copy_([t.view(torch.int16) for t in c.acc.views], high)
            _low_words(x, words)
            c.low.flat.copy_(words)

    # the master is the join of the halves
    @property
    def has_master(self) -> bool:
        return True

    def master_values(self) -> list[Tensor]:
        """The joined masters. Where the EMA model was converted since the update (it holds the high halves),
        to float32 or float64 the high halves are intact; to another dtype they are lost, and so are the
        masters: those are left out (empty tensors), and the EMA model's values become the average."""
        out = []
        for hi, lo in zip(self.ema.views, self.low.views, strict=True):
            if hi.dtype not in (torch.bfloat16, torch.float32, torch.float64) or hi.shape != lo.shape:
                out.append(torch.empty(0))
                continue
            high = hi.to(device=self.device, dtype=torch.bfloat16).contiguous().view(-1)
            joined = torch.empty(hi.numel(), dtype=torch.float32, device=self.device)
            join_float32(high, lo.contiguous().view(-1), joined)
            out.append(joined.view(hi.shape))
        return out

    @staticmethod
    def _halves(value: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        x = value.to(device=device, dtype=torch.float32, copy=True).contiguous().view(-1)
        high, low = torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.int16)
        split_float32(x, torch.empty_like(x, dtype=torch.int32), high, low)
        return high.view(value.shape), low.view(value.shape)

    def round_master(self, master: Tensor) -> Tensor:
        return self._halves(master, master.device)[0]  # to nearest, ties away from zero

    def write_master(self, i: int, value: Tensor) -> None:
        high, low = self._halves(value, self.device)
        self.ema.views[i].copy_(high)
        self.low.views[i].copy_(low)

    def clear_for_copy(self) -> None:
        """Both halves: a zero high half over the old low half joins into a float32 of the low bits alone (a
        NaN where they are negative)."""
        torch._foreach_zero_(self.ema.views)
        self.low.flat.zero_()  # type: ignore[union-attr]

    def revalidate(self, changed: list[int]) -> None:
        """The EMA model's value of a tensor someone wrote into is its average now: its low half is zero."""
        for i in changed:
            self.low.views[i].zero_()


class Compiled(Staged):
    """``compile=True``: a master's whole update as one kernel generated by ``torch.compile`` (flat buffers).

    With a flat online model on the master's device, the kernel reads the online values as they are, in one
    call; otherwise chunk by chunk from the scratch buffer. Where compiling fails (no C++ compiler, ...), it
    warns once and runs as :class:`Staged`.
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
        self.weight = torch.zeros((), dtype=acc_dtype, device=self.device)
        self.eager_work_dtype = self.work_dtype  # what the eager update stages, if it comes to that
        if online.flat is not None and online.flat.device == self.device:
            self.work_dtype = None  # the kernel converts the online values as it reads them
        self.fused = True

    def apply(self, m: float) -> None:
        if self.fused:
            self.weight.fill_(m)
            try:
                if self.work_dtype is None:
                    assert self.master is not None and self.master.flat is not None
                    assert self.online.flat is not None and self.ema.flat is not None
                    _compiled_master_update(self.master.flat.numel())(
                        self.master.flat, self.online.flat, self.ema.flat, self.weight
                    )
                else:
                    for c in self.chunks():
                        source = self.staged(c)
                        assert c.ema is not None and c.ema.flat is not None and c.acc.flat is not None
                        _compiled_master_update(c.numel)(c.acc.flat, source.flat, c.ema.flat, self.weight)
                return
            except Exception as e:  # torch.compile needs a working compiler (a C++ one on the CPU)
                _warn_not_compiled(e)
                self.fused = False
                self.work_dtype = self.eager_work_dtype
        super().apply(m)


class CompiledSplit(Split):
    """``master="split"`` with ``compile=True``: join, average and split as one kernel generated by
    ``torch.compile``, on flat buffers (the online model's read as it is where it is flat on the same device).
    Its lerp is inductor's, which may round differently from eager ``lerp_`` in the last float32 place (as
    :class:`Compiled`'s). Where compiling fails it warns once and runs as :class:`Split`."""

    def __init__(self, names: list[str], online: Buf, ema: Buf) -> None:
        super().__init__(names, online, ema)
        assert ema.flat is not None
        self.weight = torch.zeros((), dtype=torch.float32, device=self.device)
        self.fused = online.flat is not None and online.flat.device == self.device

    def apply(self, m: float) -> None:
        if self.fused:
            assert self.ema.flat is not None and self.low.flat is not None and self.online.flat is not None
            self.weight.fill_(m)
            try:
                _compiled_split_update(self.ema.flat.numel())(
                    self.ema.flat, self.low.flat, self.online.flat, self.weight
                )
                return
            except Exception as e:  # torch.compile needs a working compiler (a C++ one on the CPU)
                _warn_not_compiled(e)
                self.fused = False
        super().apply(m)


def _warn_not_compiled(e: Exception) -> None:
    """Say, once per kernel, that ``compile=True`` fell back to the eager update, and why."""
    warn(
        f"EMA(compile=True) could not compile its update ({type(e).__name__}: {e}); using the eager update instead",
        RuntimeWarning,
    )


def _master_update(master: Tensor, online: Tensor, ema: Tensor, weight: Tensor) -> None:
    master.lerp_(online.to(master.dtype), weight)
    ema.copy_(master)


def _split_update(hi: Tensor, lo: Tensor, online: Tensor, weight: Tensor) -> None:
    x = ((hi.view(torch.int16).to(torch.int32) << 16) + lo.to(torch.int32)).view(torch.float32)
    x = torch.lerp(x, online.to(torch.float32), weight)
    bits = torch.where(torch.isnan(x), _NAN, x).view(torch.int32)
    high = (bits + 0x8000) >> 16
    hi.view(torch.int16).copy_(high.to(torch.int16))
    lo.copy_((bits - (high << 16)).to(torch.int16))


_COMPILED: dict[tuple[str, int], Any] = {}


def _compiled(update: Any, numel: int) -> Any:
    """``update`` compiled for 1-D tensors of ``numel`` elements.

    Static shapes: a kernel compiled for any length ran at half the speed of one for a fixed length (85M
    elements, 2 CPU cores). Each length gets a code object of its own, so that many groups do not run into
    torch.compile's limit of recompilations per code object.
    """
    key = (update.__name__, numel)
    compiled = _COMPILED.get(key)
    if compiled is None:
        code = update.__code__.replace(co_name=f"{update.__name__}_{numel}")
        function = types.FunctionType(code, update.__globals__, code.co_name)
        compiled = _COMPILED[key] = torch.compile(function, dynamic=False, fullgraph=True)
    return compiled


def _compiled_master_update(numel: int) -> Any:
    return _compiled(_master_update, numel)


def _compiled_split_update(numel: int) -> Any:
    return _compiled(_split_update, numel)
