"""The plan of an EMA: which tensors of the two models are paired, which kernel updates each group, and the one
authority on whether that still holds.

A :class:`Plan` is built from both models (:func:`polyak._tracking.pair`), picks a kernel per group
(:mod:`polyak._kernels`), and then answers, before every update and at a cost of a pointer comparison per
module and a few per group, whether anything it relies on changed:

* the modules' registrations and the data pointers of one canary tensor per module
  (:class:`polyak._tracking.Structure`): a replaced submodule, a tensor registered anew, a module moved or
  converted; and of every tensor whose data the plan holds by address (the views of a flat buffer, the model's
  tensors the EMA model shares): a ``.data`` assigned by hand;
* what each kernel needs of the tensors it reads (:meth:`polyak._kernels.Kernel.watched`), in the same check:
  the dtypes and shapes of the online tensors it reads as objects, the strides of flat views;
* the version counters of the EMA model's tensors that have a master: whoever writes them (a load, an edit)
  makes their values the average.

Where the pairing no longer holds, the EMA builds a new plan, which follows the change (keeping each master whose
EMA values are unchanged) or raises naming the tensor, before anything is written. The plan also owns what
outlives one update and belongs to the pairing: the copied tensors' lists, the finiteness probe of
``skip_nonfinite``, the tensors traded by ``swapped()`` and the masters' views for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from polyak import _sharding as sharding
from polyak._flat import compact_state_dicts, flatten, flattenable, gatherable, scripted_owners
from polyak._kernels import (
    Buf,
    Compiled,
    CompiledSplit,
    Gathered,
    Kernel,
    Lerp,
    Split,
    Staged,
    Stochastic,
    same_values,
)
from polyak._tracking import (
    Pair,
    SharedGuard,
    Structure,
    canaries,
    pair,
    unwrap_model,
    versions,
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# the dtype a finiteness probe sums in: wide enough not to lose a NaN, never narrower than the tensor
_WIDE_SUM = {torch.float64: torch.float64, torch.complex64: torch.complex64, torch.complex128: torch.complex128}

Masters = dict[str, tuple[Tensor, Callable[[Tensor], Tensor], Tensor, tuple[int, int, torch.dtype] | None]]


@dataclass(frozen=True)
class Options:
    """What the EMA's arguments say about the plan."""

    handle_buffers: str
    dtype: torch.dtype | None
    master: str
    flat: bool
    compile: bool
    stochastic_rounding: bool
    skip_nonfinite: bool
    device: torch.device | None
    selected: Callable[[str, Tensor], bool] | None
    given_ema_model: bool

    def accumulator(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype an EMA model's tensor of ``dtype`` is averaged in."""
        if dtype.is_complex:  # averaged in its own dtype: a real accumulator would drop the imaginary part
            return dtype
        if self.dtype is not None:
            return self.dtype
        return torch.float32 if dtype in _LOW_PRECISION else dtype

    def reads_as_is(self, p: Pair) -> bool:
        """Whether the group of ``p`` averages in the EMA model's tensors, reading the online ones as they are."""
        dtype = p.ema.dtype
        return (
            not (self.stochastic_rounding and not dtype.is_complex)
            and self.accumulator(dtype) == dtype
            and p.online.dtype == dtype
            and p.online.device == p.ema.device
        )


@dataclass
class Lasting:
    """What outlives one plan: the flat buffers made so far (their views may move into new ones), the generator
    of stochastic rounding, the guard of shared tensors."""

    seed: int
    flat_storages: set[int] = field(default_factory=set)
    generator: torch.Generator | None = None
    shared_guard: SharedGuard = field(default_factory=SharedGuard)


class Plan:
    """The pairing of ``model`` and ``ema_model`` and the kernels that update it (see the module docstring)."""

    def __init__(self, options: Options, lasting: Lasting, model: nn.Module, ema_model: nn.Module) -> None:
        self.options = options
        self.lasting = lasting
        self.online_module, self.ema_module = unwrap_model(model), unwrap_model(ema_model)
        self.fsdp_online = sharding.fsdp_modules(self.online_module)
        self.fsdp_ema = sharding.fsdp_modules(self.ema_module)
        with torch.inference_mode(False):  # buffers made here are used outside any inference_mode block
            self._build()

    def _pair(self) -> list[Pair]:
        return pair(self.online_module, self.ema_module, self.options.handle_buffers, self.options.selected)

    def _build(self) -> None:
        pairs = self._pair()
        self._materialise(pairs)
        self._separate(pairs)
        self.unmaterialised = [p.name for p in pairs if p.online.device.type == "meta" and p.role != "keep"]
        self.shared_names = [p.name for p in pairs if p.role == "share"]
        self.lasting.shared_guard.watch(self.ema_module, {p.name: p.online for p in pairs if p.role == "share"})
        groups: dict[tuple[Any, ...], list[Pair]] = {}
        for p in pairs:
            if p.role == "lerp":
                key = (p.online.device, p.online.dtype, p.ema.device, p.ema.dtype, sharding.is_sharded(p.online))
                groups.setdefault(key, []).append(p)
        if self.options.stochastic_rounding and self.lasting.generator is None:
            device = next((p.ema.device for p in pairs if p.role == "lerp"), torch.device("cpu"))
            if device.type != "meta":  # (a model on meta: made when it has values, where they are)
                self.lasting.generator = torch.Generator(device=device)
                self.lasting.generator.manual_seed(self.lasting.seed)
        self.kernels: list[Kernel] = [k for members in groups.values() for k in self._kernels_for(members)]
        copies = [p for p in pairs if p.role == "copy"]
        self.copy_ema = [sharding.local(p.ema) for p in copies]
        self.copy_online = [sharding.local(p.online) for p in copies]
        self.copy_names = [p.name for p in copies]
        # ZeRO-3: the model's partitioned parameters by name (what gathers or slices the EMA's partitions)
        self.zero = {p.name: p.online for p in pairs if sharding.is_zero3(p.online)}
        self._watch()

    def _materialise(self, pairs: list[Pair]) -> None:
        """Deferred initialisation: an EMA built from a model on the meta device (before ``to_empty()``) holds no
        values. Once the model's tensors have them, the EMA model's are made where they belong and start from
        the model's values, as at construction."""
        made: dict[int, Tensor] = {}
        with torch.no_grad():
            for p in pairs:
                if p.ema.device.type == "meta" and p.online.device.type != "meta":
                    device = self.options.device if self.options.device is not None else p.online.device
                    t = torch.empty_like(p.online, device=device, dtype=p.ema.dtype).copy_(p.online)
                    made[id(p.ema)] = nn.Parameter(t, requires_grad=False) if p.is_param else t
                    p.ema = made[id(p.ema)]
        if made:  # registered anew (a meta tensor's data cannot be set), tied tensors alike
            for module in self.ema_module.modules():
                for registry in (module._parameters, module._buffers):
                    for leaf, value in registry.items():
                        if value is not None and id(value) in made:
                            registry[leaf] = made[id(value)]  # type: ignore[assignment]

    def _separate(self, pairs: list[Pair]) -> None:
        """The EMA model shares memory only where it is meant to: a parameter that is not averaged views the
        model's data (again, after the model's tensor was replaced alike); an averaged or copied tensor that
        came to share memory with the model's (a load with assign=True from the other model's state_dict)
        gets data of its own, the same values."""
        o = self.options
        # a TorchScript module takes no load hook, which guards the model's shared tensors: its are copied
        scripted = scripted_owners([self.online_module, self.ema_module], [p.name for p in pairs if p.is_param])
        with torch.no_grad():
            for p in pairs:
                unselected = p.is_param and o.selected is not None and not o.selected(p.name, p.online)
                alike = p.online.dtype == p.ema.dtype and p.online.device == p.ema.device
                shareable = (
                    o.device is None
                    and not o.given_ema_model
                    and not sharding.is_sharded(p.online)
                    and p.name not in scripted
                )
                if unselected and p.role == "copy" and alike and shareable:
                    p.ema.data = p.online.detach()
                    p.role, p.aliased = "share", True
                elif p.aliased and p.role in ("lerp", "copy"):
                    p.ema.data = p.ema.detach().clone()
                    p.aliased = False

    # -- kernels ---------------------------------------------------------------------------------------------
    def _kernels_for(self, members: list[Pair]) -> list[Kernel]:
        """The kernel(s) of one group: in flat mode, the flattenable tensors get a flat one; many small tensors
        read as they are are gathered."""
        if sharding.is_sharded(members[0].online):
            return [self._kernel(members, flat=False)]
        # TorchScript modules take no state_dict hook (which a flat buffer's views need): theirs stay as they are
        scripted = scripted_owners([self.online_module, self.ema_module], [p.name for p in members])
        movable = [p for p in members if p.name not in scripted]
        fixed = [p for p in members if p.name in scripted]
        storages = self.lasting.flat_storages
        if self.options.flat:
            flat, rest = flattenable(movable, storages) if movable else ([], [])
            rest += fixed
            out = [self._kernel(flat, flat=True)] if flat else []
            return out + ([self._kernel(rest, flat=False)] if rest else [])
        if self.options.reads_as_is(members[0]) and movable:
            small, rest = gatherable(movable, storages)
            if small:
                rest += fixed
                return [self._gathered(small)] + ([self._kernel(rest, flat=False)] if rest else [])
        return [self._kernel(members, flat=False)]

    def _gathered(self, members: list[Pair]) -> Kernel:
        """Many small 1-D tensors: the EMA side becomes one flat buffer, the online side is gathered into it."""
        names = [p.name for p in members]
        ema_t = [p.ema for p in members]
        ema = Buf(ema_t, flatten(ema_t))
        assert ema.flat is not None
        self.lasting.flat_storages.add(ema.flat.untyped_storage().data_ptr())
        compact_state_dicts(self.ema_module, names)
        return Gathered(names, Buf([p.online for p in members]), ema)

    def _kernel(self, members: list[Pair], flat: bool) -> Kernel:
        o = self.options
        names = [p.name for p in members]
        sharded = sharding.is_sharded(members[0].online)
        online_t = [p.online for p in members]
        ema_t = [p.ema for p in members]
        online = Buf(list(map(sharding.local, online_t)))
        ema = Buf(list(map(sharding.local, ema_t)))
        if flat:
            online.flat = flatten(online_t)
            ema.flat = flatten(ema_t)
            self.lasting.flat_storages |= {
                online.flat.untyped_storage().data_ptr(),
                ema.flat.untyped_storage().data_ptr(),
            }
            compact_state_dicts(self.online_module, names)
            compact_state_dicts(self.ema_module, names)
        shards = (online_t, ema_t) if sharded else None
        ema_dtype = ema.views[0].dtype
        acc = o.accumulator(ema_dtype)
        if o.stochastic_rounding and not ema_dtype.is_complex:
            generator = self.lasting.generator or torch.Generator()  # (on meta: never used, updates are refused)
            return Stochastic(names, online, ema, shards, generator)
        if o.reads_as_is(members[0]):
            return Lerp(names, online, ema, shards)
        if o.master == "split" and ema_dtype == torch.bfloat16 and acc == torch.float32:
            if sharded:
                raise TypeError(
                    "master='split' does not support sharded (FSDP2, ZeRO-3) models yet: use the default float32 master"
                )
            return CompiledSplit(names, online, ema) if o.compile and flat else Split(names, online, ema)
        if o.compile and flat and acc != ema_dtype:
            return Compiled(names, online, ema, shards, acc)
        return Staged(names, online, ema, shards, acc)

    # -- whether it still holds ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Snapshot what :meth:`holds` checks: the models' structure, the canaries' data pointers, the masters'
        version counters."""
        names = [n for k in self.kernels if k.sharded is None for n in k.names] + self.copy_names
        # the registered tensors (a flat kernel holds views of their data, not them)
        online = dict(self.online_module.named_parameters()) | dict(self.online_module.named_buffers())
        ema = dict(self.ema_module.named_parameters()) | dict(self.ema_module.named_buffers())
        watched = canaries(names, [online[n] for n in names]) + canaries(names, [ema[n] for n in names])
        # and every tensor whose data the plan holds by address: the views of a flat buffer (a `.data` assigned
        # by hand moves the tensor out of it, also while something else holds the old memory) and the model's
        # tensors that the EMA model shares (the EMA model's view must follow them)
        shaped: list[Tensor] = []
        strided: list[Tensor] = []
        pointed = [online[n] for n in self.shared_names]
        for k in self.kernels:
            a, b, c = k.watched()
            shaped += a
            pointed += b
            strided += c
        seen = {id(t) for t in watched}
        for t in pointed:
            if id(t) not in seen and t.numel() and not sharding.is_sharded(t):
                watched.append(t)
                seen.add(id(t))
        self.structure = Structure([self.online_module, self.ema_module], watched, shaped, strided)
        self.master_kernels = [k for k in self.kernels if k.has_master]
        self.record_versions()
        self.simple = (
            len(self.kernels) == 1
            and type(self.kernels[0]) is Lerp
            and self.kernels[0].sharded is None
            and self.kernels[0].ema.flat is None
            and not self.copy_names
            and not self.options.skip_nonfinite
            and not self.fsdp_ema
            and not self.fsdp_online
            and not self.unmaterialised
        )
        if self.simple:
            self.simple_ema, self.simple_online = self.kernels[0].ema.views, self.kernels[0].online.views

    def holds(self) -> bool:
        """Whether the pairing and the kernels are still true of both models (else: build a new plan)."""
        if self.fsdp_ema or self.fsdp_online:
            # FSDP2 registers its gathered parameters in place of the sharded ones while they are in use (a
            # forward outside training keeps the root's so): the shards are what the EMA pairs
            sharding.reshard(self.fsdp_online + self.fsdp_ema)
        return self.structure.unchanged()

    def follow_writes(self) -> None:
        """Someone wrote into the EMA model (a load, in-place edits): where a tensor's version counter moved,
        its master takes the EMA model's value (unless it still rounds to it; a split master's low half is
        cleared). Also called on a plan that no longer holds, before a new one takes its masters: a tensor
        converted or reshaped since is left to that (its new values are not the old master's)."""
        if not self.master_kernels or (now := self.master_versions()) == self._versions:
            return
        with torch.no_grad():
            for k, before, after, layouts in zip(self.master_kernels, self._versions, now, self._layouts, strict=True):
                written = [
                    i
                    for i, (a, b, t, layout) in enumerate(zip(before, after, k.ema.views, layouts, strict=True))
                    if a != b and (t.dtype, t.shape) == layout
                ]
                k.revalidate(written)
                for i in written:  # (the others keep what was recorded: the new plan tells what became of them)
                    before[i] = after[i]

    def record_versions(self) -> None:
        self._versions = self.master_versions()
        # and the dtype and shape of each then: a conversion since is told from a write by the version counter
        self._layouts = [[(t.dtype, t.shape) for t in k.ema.views] for k in self.master_kernels]

    def master_versions(self) -> list[list[int]]:
        """The version counters of the EMA model's tensors that have a master: whoever writes them bumps them."""
        for k in self.master_kernels:
            k.refetch()
        return [versions(k.ema.views) for k in self.master_kernels]

    def online_versions(self) -> list[list[int]]:
        for k in self.master_kernels:
            k.refetch()
        return [versions(k.online.views) for k in self.master_kernels]

    def settle_versions(self, inside: list[list[int]], written: list[list[int]]) -> None:
        """After swapped(): a tensor that nobody wrote inside the block holds its own values again, so its
        master stands (the trade back bumped its version counter, not its value). Those written inside are
        left for the next update to take as the average."""
        now = self.master_versions()
        self._versions = [
            [new if a == b else old for old, new, a, b in zip(*rows, strict=True)]
            for rows in zip(self._versions, now, inside, written, strict=True)
        ]

    # -- masters -------------------------------------------------------------------------------------------------
    def masters_by_name(self) -> Masters:
        """Each master's values by tensor name, with how they were rounded into the EMA model, and the EMA
        model's tensor with its version counter when the master was last its average."""
        out = {}
        recorded = {
            id(k): [(v, dtype) for v, (dtype, _) in zip(versions, layouts, strict=True)]
            for k, versions, layouts in zip(self.master_kernels, self._versions, self._layouts, strict=True)
        }
        for k in self.kernels:
            if k.has_master and k.ema.views[0].device.type != "meta":  # a meta master holds nothing to keep
                versions_then = recorded.get(id(k), [None] * len(k.names))
                for name, v, t, version in zip(k.names, k.master_values(), k.ema.views, versions_then, strict=True):
                    out[name] = (v, k.round_master, t, None if version is None else (version[0], 0, version[1]))
        return out

    def restore_masters(self, previous: Masters, by_value: bool = False) -> None:
        """After a re-pairing, keep each master whose EMA values nobody wrote since (a conversion of the EMA
        model keeps its tensors and their version counters; a load or an edit moves them): its extra precision
        is not lost. A tensor registered anew (``assign=True``) keeps its master where its values still round
        to it (so do all, with ``by_value``: ``refresh()``, after a write through ``.data``, which counts no
        version). Where the EMA model is now wide enough to hold the average itself, the master's values go in."""
        if not previous:
            return
        with torch.no_grad():
            for k in self.kernels:
                for i, name in enumerate(k.names):
                    if name not in previous:
                        continue
                    master, rounded, tensor, version = previous[name]
                    ema = k.ema.views[i]
                    if master.shape != ema.shape:
                        continue
                    # the same tensor, its memory the same or converted (a `.data` of its own dtype is new values)
                    kept = version is not None and ema.dtype != version[2]  # converted: the version decides
                    if ema is tensor and kept and not by_value:
                        if ema._version != version[0]:  # type: ignore[index]
                            continue  # written since: the EMA model's values are the average
                    elif not same_values(rounded(master).to(device=ema.device, dtype=ema.dtype), ema):
                        continue  # the EMA model holds other values now: they are the average
                    if k.has_master:
                        k.write_master(i, master)
                        if k.master is not None:  # the EMA model shows it rounded once (not its old rounding again)
                            ema.copy_(k.master.views[i])
                    else:
                        ema.copy_(master)
        self.record_versions()

    def master_views(self, saving: bool = False) -> dict[str, Tensor]:
        """The float32 masters by tensor name; for sharded models, as DTensors sharded like the model's.

        ``saving``: the DTensors hold copies, not views into the flat master: torch.save cannot pickle a
        DTensor whose local tensor starts inside its storage ("invalid python storage", torch 2.13).
        """
        masters = {}
        for k in self.kernels:
            if not k.has_master:
                continue
            for i, (name, view) in enumerate(zip(k.names, k.master_values(), strict=True)):
                if k.sharded is not None and sharding.is_dtensor(k.sharded[0][i]):
                    view = sharding.as_dtensor_like(view.clone() if saving else view, k.sharded[0][i])
                elif k.sharded is not None and saving:
                    view = view.clone()
                masters[name] = view
        return masters

    # -- the update ----------------------------------------------------------------------------------------------
    def refuse_unmaterialised(self) -> None:
        if self.unmaterialised:
            raise RuntimeError(
                f"the model's tensor {self.unmaterialised[0]!r} is on the meta device: it holds no values to "
                "average yet (a model built on 'meta' is materialised with model.to_empty(device=...) and then "
                "initialised or loaded; the EMA follows it then)"
            )

    def refetch(self) -> None:
        for kernel in self.kernels:
            kernel.refetch()

    def clear_for_copy(self) -> None:
        """Before an update of momentum 1 (a copy: ``copy_first``, a schedule's first update): see
        :meth:`polyak._kernels.Kernel.clear_for_copy`."""
        for kernel in self.kernels:
            kernel.clear_for_copy()

    def apply(self, m: float) -> None:
        if m == 1.0:
            self.clear_for_copy()
        for kernel in self.kernels:
            kernel.apply(m)
        self.finish()

    def finish(self) -> None:
        """What follows the lerps: copied tensors, the version records of the masters, FSDP2's reshard."""
        if self.copy_ema:
            torch._foreach_copy_(self.copy_ema, self.copy_online)
        if self.master_kernels:
            self.record_versions()
        if self.fsdp_ema:
            sharding.reshard(self.fsdp_ema)

    def online_is_finite(self) -> bool:
        """Whether the update reads only values it may: no NaN or Inf among the averaged ones, no NaN among the
        copied ones (buffers). An infinity is a value to copy (an attention mask of ``-inf``): a copy does not
        accumulate it, and the next update copies again.

        A sum (a flat buffer) or a 2-norm (a list) carries any NaN or Inf into its result and runs at memory
        speed; only where it is not finite (a non-finite value, or a finite sum that overflowed) does an exact
        check decide. A max-abs norm would decide alone, but runs ~8x slower than the update on the CPU. For the
        copied values, a 1-norm is NaN exactly where a value is.
        """
        copied = [t for t in self.copy_online if (t.is_floating_point() or t.is_complex()) and t.numel()]

        def probe(source: Buf, exact: bool) -> Tensor:
            if source.flat is not None:
                if exact:
                    return torch.isfinite(source.flat).all()
                wide = _WIDE_SUM.get(source.flat.dtype, torch.float32)
                return torch.isfinite(source.flat.sum(dtype=wide)).all()
            norms = torch._foreach_norm(source.views, ord=float("inf") if exact else 2)
            return torch.isfinite(torch.stack(norms)).all()

        def all_finite(exact: bool) -> Tensor:
            flags = [probe(k.online, exact).to("cpu") for k in self.kernels]
            if copied:
                flags.append(torch.stack(torch._foreach_norm(copied, ord=1)).isnan().any().logical_not().to("cpu"))
            return torch.stack(flags).all() if flags else torch.tensor(True)

        finite = all_finite(exact=False)
        if not finite:
            finite = all_finite(exact=True)
        if any(k.sharded is not None for k in self.kernels):
            finite = sharding.all_ranks_agree(finite)  # each rank sees only its shard: all must agree
        return bool(finite)

    # -- swapping ------------------------------------------------------------------------------------------------
    def swap_pairs(self, roles: tuple[str, ...] = ("lerp", "copy", "keep")) -> list[Pair]:
        return [p for p in self._pair() if p.role in roles]


def start_from_model(options: Options, model: nn.Module, ema_model: nn.Module) -> None:
    """A user's ``ema_model`` (FSDP2) is checked to be built like the model, and starts from its values."""
    ema = unwrap_model(ema_model)
    advice = "ema_model must be built and sharded like the model"
    pairs = pair(unwrap_model(model), ema, options.handle_buffers, options.selected, ValueError, advice)
    for p in pairs:
        sharding.check_alike(p.name, p.online, p.ema)
    with torch.no_grad():
        for p in pairs:
            if p.role != "keep":
                p.ema.copy_(p.online)
    ema.requires_grad_(False)


def swap_in(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor] | None]:
    """Trade values; where the two sides differ in dtype or device, keep both sides' values aside instead (a
    trade through the other's dtype would round them)."""
    kept: list[tuple[Tensor, Tensor] | None] = []
    for online, ema in pairs:
        if online.dtype == ema.dtype and online.device == ema.device:
            _trade(online, ema)
            kept.append(None)
        else:
            kept.append((online.clone(), ema.clone()))
            online.copy_(ema)
    return kept


def swap_out(pairs: list[tuple[Tensor, Tensor]], kept: list[tuple[Tensor, Tensor] | None]) -> None:
    for (online, ema), aside in zip(pairs, kept, strict=True):
        if aside is None:
            _trade(online, ema)
        else:
            online.copy_(aside[0])
            ema.copy_(aside[1])


def _trade(a: Tensor, b: Tensor) -> None:
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)
