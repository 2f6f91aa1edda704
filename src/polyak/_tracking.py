"""Pairing the online and EMA models' tensors, and keeping the pairing true as the models change.

The EMA pairs tensors by name once, and then must notice whatever would make that pairing stale, at a cost
that does not grow with the model beyond a pointer comparison per tensor:

* :class:`Structure` is a snapshot of every module, parameter and buffer registered in both models (the
  values of each module's ``_modules``, ``_parameters`` and ``_buffers``). A replaced submodule, a tensor
  registered anew (``load_state_dict(assign=True)``, ``torch.__future__`` conversions that make new
  parameters) or removed changes it. It is checked with one C-level list comparison.
* :func:`canaries` picks one tensor of each module, whose data pointer the structure check compares too:
  ``module.to()``, ``.half()`` and the like re-allocate every tensor of the modules they touch, so one per
  module tells. Assigning one tensor's ``.data`` by hand is followed where the new data is alike (the update
  reads the tensor objects), and needs :meth:`polyak.EMA.refresh` otherwise.

Nothing here installs a global hook: the checks live in the EMA and cost it alone.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import operator
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polyak._sharding import is_deepspeed_engine, is_sharded, is_zero3, local

_values = operator.methodcaller("values")  # also TorchScript modules' dict-like wrappers
_DTYPE_AND_SHAPE = operator.attrgetter("dtype", "shape")
_chain = itertools.chain.from_iterable


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose tensors are averaged: ``model.module`` for DataParallel, DistributedDataParallel and a
    DeepSpeed engine, the original module of a ``torch.compile``'d one (whose names start with ``_orig_mod.``),
    in any nesting."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or is_deepspeed_engine(model):
            model = model.module  # type: ignore[assignment]
        elif _is_compiled(model):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    compiled = sys.modules.get("torch._dynamo.eval_frame")  # loaded by torch.compile: not before it is used
    kind = getattr(compiled, "OptimizedModule", None)
    return kind is not None and isinstance(model, kind) and isinstance(getattr(model, "_orig_mod", None), nn.Module)


def named_tensors(module: nn.Module) -> OrderedDict[str, tuple[Tensor, bool]]:
    """Parameters then buffers, by name, each tensor once (tied weights under their first name)."""
    out: OrderedDict[str, tuple[Tensor, bool]] = OrderedDict()
    for name, p in module.named_parameters():
        out[name] = (p, True)
    for name, b in module.named_buffers():
        out[name] = (b, False)
    return out


def _all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf (True where its values cannot be read here: meta, sharded)."""
    if t.device.type == "meta" or is_sharded(t) or t.numel() == 0:
        return True
    return bool(torch.isfinite(t).all())


def averaged_kind(t: Tensor) -> bool:
    """Whether a tensor's values can be averaged: floating point or complex (integers are copied)."""
    return t.is_floating_point() or t.is_complex()


UNAVERAGEABLE = frozenset(
    getattr(torch, name)
    for name in (
        "complex32",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    if hasattr(torch, name)
)
"""Floating and complex dtypes without arithmetic in torch (no ``lerp``): refused where they would be averaged."""


# -- choosing what is averaged ------------------------------------------------------------------------------
Selector = Callable[[str, Tensor], bool]


def _globs(name: str, value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Iterable) else (value,)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a name or glob, or a sequence of them, got {value!r}")
    return patterns


def parameter_selector(
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    predicate: Selector | None = None,
    trainable_only: bool = False,
) -> Selector | None:
    """The rule that says which parameters are averaged, from the EMA's arguments; None: all of them.

    Names are the model's parameter names (``"head.weight"``); patterns are shell-style globs
    (``"*.lora_*"``), matched against the whole name.
    """
    inc, exc = _globs("include", include), _globs("exclude", exclude)
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate must be a callable (name, parameter) -> bool, got {predicate!r}")
    if inc is None and exc is None and predicate is None and not trainable_only:
        return None

    def selected(name: str, p: Tensor) -> bool:
        if inc is not None and not any(fnmatch.fnmatchcase(name, g) for g in inc):
            return False
        if exc is not None and any(fnmatch.fnmatchcase(name, g) for g in exc):
            return False
        if trainable_only and not p.requires_grad:
            return False
        return predicate is None or bool(predicate(name, p))

    return selected


# -- the EMA model ----------------------------------------------------------------------------------------
def copy_model(model: nn.Module, device: torch.device | None, shared: set[int]) -> nn.Module:
    """A deep copy of ``model`` whose tensors are made directly where they belong, with ``shared`` not copied.

    The tensors are put into ``copy.deepcopy``'s memo first, so the copy never holds a second temporary copy
    (no peak beyond the EMA itself), each tensor is made on ``device`` (or its own), keeps its memory format,
    and tied weights stay tied. Tensors whose id is in ``shared`` are not copied: the copy holds a parameter
    of its own over the model's data (only where ``device`` is None: shared data stays where the model has
    it), so that converting or moving the EMA model leaves the model's tensors alone.
    """
    if shared and device is not None:
        raise ValueError("tensors can be shared with the model only where the EMA model stays on its device")
    memo: dict[int, object] = {}
    with torch.inference_mode(False), torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            if id(t) in memo:
                continue
            if id(t) in shared:
                memo[id(t)] = nn.Parameter(t.detach(), requires_grad=False)  # the model's data, not its object
            elif type(t) is nn.Parameter:
                memo[id(t)] = nn.Parameter(_fresh(t, device), requires_grad=False)
            elif type(t) is Tensor:
                memo[id(t)] = _fresh(t, device)
            # other tensor subclasses: deepcopy's own way, then moved below
        ema = copy.deepcopy(model, memo)
    if any(is_zero3(p) for p in model.parameters()):
        for m in ema.modules():  # ZeRO-3's hooks gather the model's parameters: the EMA model holds partitions
            for hooks in (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks, m._backward_pre_hooks):
                hooks.clear()
    if device is not None and not any(
        t.device.type == "meta" for t in itertools.chain(ema.parameters(), ema.buffers())
    ):
        ema.to(device)  # whatever deepcopy copied its own way (tensor subclasses); the rest is there already
    ema.requires_grad_(False)  # its own parameter objects only: the model's flags are the model's
    return ema


def _fresh(t: Tensor, device: torch.device | None) -> Tensor:
    """A copy of ``t`` on ``device``; of a ZeRO-3 parameter, a copy of this rank's partition."""
    t = local(t) if is_zero3(t) else t
    target = t.device if device is None or t.device.type == "meta" else device  # meta: made when the model is
    out = torch.empty_like(t.detach(), device=target, memory_format=torch.preserve_format)
    return out.copy_(t.detach())


class SharedGuard:
    """Refuses a load into the EMA model (or any submodule of it) that would write another value into a tensor
    it shares with the model (a parameter that is not averaged), before anything is loaded: the write would
    change the model. The same values load (a checkpoint of the EMA model taken in this run), and so does
    ``assign=True`` (the EMA model then holds tensors of its own, which the next update copies from the model).

    :meth:`watch` sets the shared tensors (by name, the model's) and hooks every module of the EMA model once;
    the hooks hold weak references, so that a deep copy of the EMA model is not guarded by them."""

    def __init__(self) -> None:
        self.shared: dict[str, Tensor] = {}
        self._hooked: set[int] = set()

    def watch(self, ema_module: nn.Module, shared: dict[str, Tensor]) -> None:
        self.shared = shared
        if not shared:
            return
        for prefix, module in ema_module.named_modules(remove_duplicate=False):
            if isinstance(module, torch.jit.ScriptModule):
                continue  # takes no hook (and shares nothing: its tensors are copied instead)
            if id(module) not in self._hooked:
                module.register_load_state_dict_pre_hook(_Hook(self, module, prefix))
                self._hooked.add(id(module))


class _Hook:
    def __init__(self, guard: SharedGuard, module: nn.Module, prefix: str) -> None:
        self.guard = weakref.ref(guard)
        self.module = weakref.ref(module)
        self.prefix = prefix + "." if prefix else ""

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:  # type: ignore[no-untyped-def]
        guard = self.guard()
        if prefix or guard is None or module is not self.module():
            return  # not where this load started (its start checked the whole), or a copy of the EMA model
        if local_metadata.get("assign_to_params_buffers", False):
            return  # tensors assigned, not written into
        for name, online in guard.shared.items():
            if not name.startswith(self.prefix):
                continue
            value = state_dict.get(name[len(self.prefix) :])
            if isinstance(value, Tensor) and not _same_values(value, online):
                raise RuntimeError(
                    f"cannot load {name!r} into the EMA model: it is not averaged (include=/exclude=/predicate=/"
                    "trainable_only=) and the EMA model shares it with the model, so the load would overwrite "
                    "the model's own tensor. Load it into the model instead, leave it out of this state_dict, or "
                    "load with assign=True"
                )


def _same_values(value: Tensor, online: Tensor) -> bool:
    if value.shape != online.shape or value.device.type == "meta":
        return True  # not a value: the load itself says what is wrong with it
    with torch.no_grad():
        return bool(torch.equal(value.to(device=online.device, dtype=online.dtype), online))


# -- pairing ------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One tensor of the model and its counterpart in the EMA model, and what an update does with them.

    ``role``: ``"lerp"`` (averaged), ``"copy"`` (copied at each update), ``"keep"`` (buffers under
    ``handle_buffers="ema_train"``: left alone) or ``"share"`` (a parameter not averaged whose EMA-model
    tensor is a view of the model's data: nothing to do). ``aliased``: the two tensors share memory.
    """

    name: str
    online: Tensor
    ema: Tensor
    is_param: bool
    role: str
    aliased: bool = False


_ADVICE = (
    "make both alike again (e.g. ema.ema_model.head = copy.deepcopy(model.head) after replacing model.head), "
    "or build a new EMA"
)


def pair(
    online_module: nn.Module,
    ema_module: nn.Module,
    handle_buffers: str,
    selected: Selector | None,
    error: type[Exception] = RuntimeError,
    advice: str = _ADVICE,
) -> list[Pair]:
    """Pair the tensors of the two models by name, checking names, kinds and shapes; refuse a mismatch with
    ``error`` (a model changed since: RuntimeError; a module given that does not fit: ValueError)."""
    online = named_tensors(online_module)
    ema = named_tensors(ema_module)
    if list(online) != list(ema):
        missing = sorted(set(online) - set(ema))
        extra = sorted(set(ema) - set(online))
        raise error(
            f"the EMA model's tensors do not match the model's: missing {missing} (the model's, not in the EMA "
            f"model), unexpected {extra} (the EMA model's, not in the model): {advice}"
        )
    pairs = []
    for name, (t, is_param) in online.items():
        e, e_is_param = ema[name]
        if e is t:
            raise error(
                f"the EMA model holds the model's own tensor {name!r} (the same object: a part of the model "
                "assigned into the EMA model? e.g. ema.ema_model.head = model.head): give it a copy "
                "(copy.deepcopy(model.head))"
            )
        keep = not is_param and handle_buffers == "ema_train"
        if keep:
            role = "keep"  # left alone: whatever it holds
        elif not averaged_kind(t):
            role = "copy"  # integer tensors (num_batches_tracked, ...) are copied, never averaged
        elif is_param and selected is not None and not selected(name, t):
            role = "share" if aliases(t, e) else "copy"  # not averaged: shared where it can be, else copied
        elif is_param:
            role = "lerp"
        else:
            # a buffer holding -inf or inf (an attention mask) would average into NaN (inf - inf): copied
            role = "lerp" if handle_buffers == "update" and _all_finite(t) else "copy"
        if role == "lerp" and t.dtype in UNAVERAGEABLE:
            raise TypeError(
                f"the model's {_what(t, is_param)} {name!r} cannot be averaged: torch has no arithmetic for "
                f"{t.dtype} tensors (the update would fail). Keep it out of the average (exclude={name!r}), or "
                "keep the model in a dtype torch computes in (float32, bfloat16, float16, complex64)"
            )
        # a copied buffer may change shape (a cache that grows): its copy follows; anything else must match
        resized = role == "copy" and not is_param and t.shape != e.shape
        shape = local(t).shape if is_zero3(t) else t.shape  # a ZeRO-3 parameter is paired by its partition
        if (
            not keep
            and not resized
            and (e_is_param != is_param or shape != e.shape or averaged_kind(t) != averaged_kind(e))
        ):
            raise error(
                f"the model's tensor {name!r} is a {_what(t, is_param)} and the EMA model's a "
                f"{_what(e, e_is_param)}: {advice}"
            )
        if resized:
            e = _replace_buffer(ema_module, name, t)
        pairs.append(Pair(name, t, e, is_param, role, shares_memory(t, e)))
    return pairs


def _replace_buffer(module: nn.Module, name: str, like: Tensor) -> Tensor:
    """Register a copy of ``like`` as ``module``'s buffer ``name`` (a copied buffer whose shape changed)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    with torch.inference_mode(False), torch.no_grad():
        owner._buffers[leaf] = like.detach().clone()
    return owner._buffers[leaf]  # type: ignore[return-value]


def shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors have memory in common (the EMA of one could not differ from the other)."""
    if is_sharded(a) or is_sharded(b) or a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def aliases(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` is a view of exactly ``a``'s data: the same memory, layout and dtype."""
    return (
        shares_memory(a, b)
        and a.dtype == b.dtype
        and a.device == b.device
        and a.storage_offset() == b.storage_offset()
        and a.stride() == b.stride()
    )


def _what(t: Tensor, is_param: bool) -> str:
    if is_zero3(t):
        shape = f"{tuple(t.ds_shape)}, partitioned by ZeRO-3 ({local(t).numel()} elements here)"  # type: ignore[attr-defined]
        return f"{'parameter' if is_param else 'buffer'} of {t.dtype} {shape}"
    return f"{'parameter' if is_param else 'buffer'} of {t.dtype} {tuple(t.shape)}"


# -- noticing change -----------------------------------------------------------------------------------------
def _needs_identity(value: object) -> bool:
    """Values whose ``==`` is not identity: compared with ``is`` (a list comparison would ask their ``__eq__``)."""
    if isinstance(value, Tensor):
        return value.numel() <= 1  # a one-element tensor compares by value
    if isinstance(value, nn.Module):
        return type(value).__eq__ is not object.__eq__
    return not (value is None or type(value) in (int, tuple))  # data pointers, dtypes and shapes by value


class Structure:
    """What is registered in some modules, where some tensors' data lies (``canaries``), the dtypes and shapes
    of some (``shaped``) and the strides of others (``strided``), and a cheap check that it is all still so.

    The registered values are read through live ``dict.values()`` views. Tensors with more than one element
    and plain modules are compared by one C-level list comparison (it moves on at once past identical
    objects; a tensor compared with another raises or says False); the few others (one-element tensors,
    modules that define ``__eq__``) by identity. The data pointers of ``canaries`` (one tensor per module:
    ``module.to()``, ``.half()``... re-allocate all of a module's tensors) are compared in the same pass.
    """

    def __init__(
        self,
        roots: Iterable[nn.Module],
        canaries: Sequence[Tensor] = (),
        shaped: Sequence[Tensor] = (),
        strided: Sequence[Tensor] = (),
    ) -> None:
        dicts = [d for root in roots for m in root.modules() for d in (m._modules, m._parameters, m._buffers)]
        if all(isinstance(d, dict) for d in dicts):
            views = [d.values() for d in dicts]  # live: they show what is registered now
            self._read = lambda: _chain(views)
        else:  # TorchScript modules hold dict-like wrappers whose values() is a copy
            self._read = lambda: _chain(map(_values, dicts))
        self.canaries = list(canaries)
        self.shaped = list(shaped)
        self.strided = list(strided)
        self._now = self._reader()
        self.values = self._now()
        exact = [i for i, v in enumerate(self.values) if _needs_identity(v)]
        # itemgetter of one index returns the item, of several a tuple: always a tuple here
        self._pick = operator.itemgetter(*exact, exact[0]) if exact else None
        self._exact = tuple(self.values[i] for i in exact) + ((self.values[exact[0]],) if exact else ())

    def _reader(self) -> Callable[[], list[object]]:
        """The one list of everything checked, read by a function made for what there is to read."""
        read, canaries, shaped, strided = self._read, self.canaries, self.shaped, self.strided
        pointer = Tensor.data_ptr
        if not shaped and not strided:
            return lambda: [*read(), *map(pointer, canaries)]
        if not strided:
            return lambda: [*read(), *map(pointer, canaries), *map(_DTYPE_AND_SHAPE, shaped)]
        return lambda: [
            *read(),
            *map(pointer, canaries),
            *map(_DTYPE_AND_SHAPE, shaped),
            *map(Tensor.stride, strided),
        ]

    def unchanged(self) -> bool:
        now = self._now()
        try:
            if now != self.values:
                return False
        except RuntimeError:  # a tensor compared with another (ambiguous truth value): something changed
            return False
        return self._pick is None or all(map(operator.is_, self._pick(now), self._exact))


def canaries(names: Iterable[str], tensors: Iterable[Tensor]) -> list[Tensor]:
    """Tensors of each module that owns some of ``tensors`` whose data pointers tell whether the module was
    moved or converted: its first real floating one of each dtype (``.half()``, ``.to(dtype)``), its first
    complex one (which ``.half()`` leaves alone), its first of 4 or more dimensions
    (``.to(memory_format=...)``) and, failing those, its first; never one of no elements (its data pointer
    is 0 wherever it is)."""
    by_owner: dict[str, dict[str, Tensor]] = {}
    for name, t in zip(names, tensors, strict=True):
        if t.numel() == 0 or is_sharded(t):  # (ZeRO-3 gathers and frees a parameter's data at will)
            continue
        kinds = by_owner.setdefault(name.rpartition(".")[0], {})
        kinds.setdefault("any", t)
        if t.is_complex():
            kinds.setdefault("complex", t)
        elif t.is_floating_point():
            # one of each dtype: a conversion to one of a module's dtypes leaves its tensors of that dtype alone
            kinds.setdefault(f"floating {t.dtype}", t)
        if t.dim() >= 4:
            kinds.setdefault("layout", t)
    out: dict[int, Tensor] = {}
    for kinds in by_owner.values():
        for t in kinds.values():
            out.setdefault(id(t), t)
    return list(out.values())


_use_count = getattr(torch._C, "_storage_Use_Count", None)


def storage_users(t: Tensor) -> int:
    """How many tensors use ``t``'s memory (0 where this torch cannot tell): a flat buffer whose count drops
    lost a view (a ``.data`` replaced by hand, a module moved), which a data pointer of another tensor misses."""
    return int(_use_count(t.untyped_storage()._cdata)) if _use_count is not None else 0


_version = operator.attrgetter("_version")


def versions(tensors: list[Tensor]) -> list[int]:
    """The version counters of ``tensors``: every in-place write (ours, a load, the user's) bumps them."""
    return list(map(_version, tensors))


def sharded(t: Tensor) -> bool:
    return is_sharded(t)
