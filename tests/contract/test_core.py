"""The contract of the EMA core, as a state machine: any mode, any sequence of what users do (issue 17, section 1).

A hypothesis ``RuleBasedStateMachine`` builds an :class:`polyak.EMA` in a mode drawn from every precision
(float32; a bf16 or fp16 model with the default float32 master; ``master="split"``; ``dtype=torch.bfloat16``
with and without stochastic rounding) crossed with ``flat``, ``device="cpu"``, ``skip_nonfinite``,
``include``/``exclude``/``trainable_only``, ``copy_first``, ``per_step`` and a schedule, on a model with a 4-D
conv weight, a square weight, BatchNorm buffers (an integer one among them), a frozen parameter and an
attention-mask-like buffer, sometimes a weight of more than one chunk (``polyak._kernels.CHUNK``) and sometimes
built on ``meta`` and materialised with ``to_empty``. Its rules are what users do, in any order: updates (with
the schedule's momentum, or a given one: 0, 1 or in between; ``steps=k``), optimizer-like in-place steps,
NaN/Inf in a parameter or a buffer, conversions and moves of either model, replaced submodules, ``p.data = ...``,
loads into either model or a submodule, checkpoints through ``torch.save``/``torch.load(weights_only=True)``
into the same EMA or a fresh one of the same or another mode, ``swapped()``, ``copy_to()`` and ``refresh()``.

After every rule the EMA must agree with a float64 reference EMA that this test keeps, fed with the momentum the
EMA returned and the online values as they were when the EMA read them; or the rule's EMA call raised
``ValueError``/``TypeError``/``RuntimeError`` naming the tensor, with the EMA's state (values, masters, counts)
bit for bit what it was. The online model is never written by the EMA outside ``swapped()``.

The tolerance is a *sound* bound carried per element beside the reference, not a guess: each averaging update
of an accumulator of dtype ``A`` (float32 for masters and ``split``; the EMA model's own dtype otherwise; bf16
with ``dtype=torch.bfloat16``) adds at most ``(4 u_op + 3 r_A + 4 u_64) * (|ref| + bound + |x|)`` with ``u_op``
the unit roundoff of the arithmetic (float32, or float64 for a float64 accumulator: lerp's two formulas, its
float32 weight and the staging of the online value), ``r_A`` the rounding of the result into ``A`` (0 for
float32/float64, half a bf16 ulp ``2**-8`` relative, and a whole ulp ``2**-7`` for stochastic rounding, which
rounds to one of the two neighbours) and ``u_64`` the reference's own rounding; the previous error shrinks by
``1 - m``. A copy (momentum 1) is exact where the accumulator holds the online dtype. An EMA-model tensor
narrower than its accumulator (bf16 beside its float32 master) may differ by its own half ulp more. Where the
reference is not finite (NaN or Inf was averaged in), the EMA must not be finite either; which non-finite value
it holds is not specified (``lerp(inf, inf, w)`` is NaN, the formula gives inf).

Stochastic rounding is checked by that bound only (unbiasedness is a statistical property: see
``test_stochastic_rounding_is_unbiased``).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from torch import nn

from polyak import EMA, _kernels

PROFILE = os.environ.get("POLYAK_CONTRACT", "ci")
SETTINGS = settings.get_profile(f"polyak-contract-{PROFILE}")

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
U = {F64: 2.0**-53, F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}  # unit roundoff: half an ulp, relative
TINY = {F64: 2.0**-1074, F32: 2.0**-149, BF16: 2.0**-133, F16: 2.0**-24}  # the smallest subnormal
HOLDS = {F64: {F64, F32, BF16, F16}, F32: {F32, BF16, F16}, BF16: {BF16}, F16: {F16}}  # a holds every b exactly
REFUSALS = (ValueError, TypeError, RuntimeError)
LARGE = (1100, 1000)  # 1.1M elements: more than one chunk
assert LARGE[0] * LARGE[1] > _kernels.CHUNK


class Net(nn.Module):
    """A 4-D conv weight (channels_last), a square weight (a transposed view of the same shape), BatchNorm
    (float and integer buffers), a frozen parameter, an attention-mask-like buffer; ``large``: one weight over
    a chunk."""

    def __init__(self, large: bool = False, scripted: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)
        self.sq = nn.Linear(5, 5)
        self.norm = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("mask", torch.zeros(4))
        if large:
            self.big = nn.Parameter(torch.randn(*LARGE) * 0.1)
        if scripted:  # a TorchScript submodule (its registries are not plain dicts)
            self.script = torch.jit.script(nn.Linear(3, 3))


def initialise(model: nn.Module, generator: torch.Generator) -> None:
    """Values for a model materialised by ``to_empty`` (and for any model: the test owns its randomness)."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                t.zero_()
            elif name.endswith("running_var"):
                t.copy_(1.0 + torch.rand(t.shape, generator=generator))
            elif name == "mask":
                t.zero_()
            else:
                t.copy_(torch.randn(t.shape, generator=generator) * 0.5)


def schedule(k: int) -> float:
    """A schedule whose first update copies (momentum 1), then decays."""
    return min(1.0, 2.0 / (k + 1))


SELECTIONS = {
    "all": {},
    "include": {"include": ["sq.*", "conv.weight", "big"]},
    "exclude": {"exclude": ["head.*", "norm.*"]},
    "trainable_only": {"trainable_only": True},
}
PRECISIONS = ["f32", "bf16-master", "bf16-split", "bf16", "bf16-sr", "f16-master"]


@dataclass(frozen=True)
class Mode:
    precision: str = "f32"
    flat: bool = False
    device: bool = False
    skip: bool = False
    select: str = "all"
    copy_first: int = 0
    per_step: bool = False
    scheduled: bool = False
    momentum: float = 0.3
    compile: bool = False
    large: bool = False

    @property
    def model_dtype(self) -> torch.dtype:
        return {"f32": F32, "f16-master": F16}.get(self.precision, BF16)

    @property
    def sr(self) -> bool:
        return self.precision == "bf16-sr"

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"schedule": schedule} if self.scheduled else {"momentum": self.momentum}
        if self.precision == "bf16-split":
            kw["master"] = "split"
        if self.precision in ("bf16", "bf16-sr"):
            kw["dtype"] = BF16
        if self.sr:
            kw.update(stochastic_rounding=True, seed=1)
        for key, on, value in (
            ("flat", self.flat, True),
            ("device", self.device, "cpu"),
            ("skip_nonfinite", self.skip, True),
            ("per_step", self.per_step, True),
            ("compile", self.compile, True),
        ):
            if on:
                kw[key] = value
        if self.copy_first:
            kw["copy_first"] = self.copy_first
        return kw | SELECTIONS[self.select]

    def averaged(self, name: str, p: torch.Tensor) -> bool:
        """Whether a parameter is averaged (the class docstring: globs on the whole name, exclude wins)."""
        sel = SELECTIONS[self.select]
        if "include" in sel and not any(fnmatch.fnmatchcase(name, g) for g in sel["include"]):
            return False
        if "exclude" in sel and any(fnmatch.fnmatchcase(name, g) for g in sel["exclude"]):
            return False
        return not (sel.get("trainable_only") and not p.requires_grad)

    def acc_dtype(self, ema_dtype: torch.dtype) -> torch.dtype:
        """Where the average is accumulated (the ``dtype`` argument's documentation)."""
        if self.precision in ("bf16", "bf16-sr"):
            return BF16
        return F32 if ema_dtype in (F16, BF16) else ema_dtype

    def rounding(self, acc: torch.dtype) -> float:
        """Relative error of rounding one update's result into the accumulator."""
        if self.sr and acc == BF16:
            return 2.0**-7  # one of the two neighbours: under one ulp
        return U[acc] if acc in (BF16, F16) else 0.0

    def __str__(self) -> str:
        kw = {k: (v.__name__ if callable(v) else v) for k, v in self.kwargs().items()}
        return f"EMA({kw}){' large' if self.large else ''}"


def modes(large: st.SearchStrategy[bool] | None = None) -> st.SearchStrategy[Mode]:
    return st.builds(
        Mode,
        precision=st.sampled_from(PRECISIONS),
        flat=st.booleans(),
        device=st.booleans(),
        skip=st.booleans(),
        select=st.sampled_from(list(SELECTIONS)),
        copy_first=st.integers(0, 3),
        per_step=st.booleans(),
        scheduled=st.booleans(),
        momentum=st.sampled_from([0.3, 0.05, 0.9]),
        large=large if large is not None else st.sampled_from([False] * 9 + [True]),
    )


# -- comparing tensors ------------------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (dtype, shape, every byte: -0.0 is not 0.0), but any NaN is any NaN (a copy may make it
    canonical)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and (a.isnan().any() or b.isnan().any()):
        nan = a.isnan()
        if not torch.equal(nan, b.isnan()):
            return False
        a, b = a.detach().masked_fill(nan, 0), b.detach().masked_fill(nan, 0)
    return torch.equal(bits(a), bits(b))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (NaN equal to NaN), ``b`` converted to ``a``'s dtype first."""
    if a.shape != b.shape:
        return False
    b = b.detach().to(a.dtype)
    a = a.detach()
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters()) | dict(module.named_buffers())


def clones(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in tensors(module).items()}


def describe(now: torch.Tensor, before: torch.Tensor) -> str:
    if now.shape != before.shape or now.dtype != before.dtype:
        return f"{now.dtype} {tuple(now.shape)}, was {before.dtype} {tuple(before.shape)}"
    diff = (now.double() - before.double()).abs()
    return f"{int((diff > 0).sum())} of {diff.numel()} elements moved, by up to {diff.max().item():.3g}"


def names_tensor(message: str, names: set[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", message) for n in names)


@dataclass
class EmaState:
    values: dict[str, torch.Tensor]
    counts: tuple[int, int]
    masters: dict[str, torch.Tensor] | None = None
    generator: torch.Tensor | None = None
    pending: frozenset[str] = frozenset()  # converted wider, not yet shown at full precision: may change


# -- the state machine ------------------------------------------------------------------------------------------
class EMAContract(RuleBasedStateMachine):
    """Any mode, any sequence of user actions; after each, the EMA equals the float64 reference or refused."""

    fixed_modes: st.SearchStrategy[Mode] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.held: list[torch.Tensor] = []  # references users keep to old storages
        self.others: list[EMA] = []  # other EMAs of the same model

    # -- construction ------------------------------------------------------------------------------------------
    @initialize(data=st.data())
    def build(self, data: st.DataObject) -> None:
        mode = data.draw(self.fixed_modes if self.fixed_modes is not None else modes(), label="mode")
        deferred = data.draw(st.sampled_from(["no", "EMA after to_empty", "EMA before to_empty"]), label="meta")
        scripted = deferred == "no" and data.draw(st.sampled_from([False] * 5 + [True]), label="scripted")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        generator = torch.Generator().manual_seed(seed)
        script = " with a TorchScript submodule" if scripted else ""
        note(f"mode: model {mode.model_dtype}{script}, {mode}; deferred init: {deferred}")
        self.generator = generator
        if deferred == "EMA before to_empty":
            # lifecycle.md: an update before the model has values is refused naming the tensor; after to_empty()
            # and initialisation the EMA model is made where it belongs and starts from the model's values
            with torch.device("meta"):
                model = Net(mode.large).to(mode.model_dtype)
            self.model = model
            ema = EMA(model, **mode.kwargs())
            with pytest.raises(RuntimeError) as refused:
                ema.update()
            assert names_tensor(str(refused.value), set(tensors(model))), f"refused without a name: {refused.value}"
            assert ema.num_updates == 0
            model.to_empty(device="cpu")
            initialise(model, generator)
            ema.state_dict()  # any call of the EMA follows it
            for n, t in tensors(ema.ema_model).items():
                assert t.device == torch.device("cpu") and same_values(t, tensors(model)[n]), f"{n!r} after to_empty"
            self.start(mode, ema)
        else:
            if deferred == "EMA after to_empty":
                with torch.device("meta"):
                    model = Net(mode.large)
                model.to_empty(device="cpu")
            else:
                with torch.random.fork_rng():
                    model = Net(mode.large, scripted)
            initialise(model, generator)
            model.to(mode.model_dtype)
            self.model = model
            self.start(mode, EMA(model, **mode.kwargs()))
        self.ref: dict[str, torch.Tensor] = {}
        self.bound: dict[str, torch.Tensor] = {}
        self.allowed: dict[str, list[torch.Tensor]] = {}
        for name, t in tensors(self.ema.ema_model).items():
            if name in self.averaged_names:
                self.ref[name] = t.detach().double().clone()
                self.bound[name] = torch.zeros_like(self.ref[name])
            else:
                self.allowed[name] = [t.detach().clone()]
        self.num_updates = self.num_skipped = 0
        self.pending: dict[str, torch.dtype] = {}  # the EMA model's rounding until the EMA's next call
        self.pending_update: dict[str, torch.dtype] = {}  # the EMA model's rounding until the next update

    def start(self, mode: Mode, ema: EMA) -> None:
        self.mode, self.ema = mode, ema
        self.params = {n for n, _ in self.model.named_parameters()}
        self.averaged_names = {n for n, p in self.model.named_parameters() if mode.averaged(n, p)}

    # -- helpers -----------------------------------------------------------------------------------------------
    def perturbed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v + self.noise(v, 0.1)) if v.is_floating_point() else v.clone() for k, v in state.items()}

    def noise(self, like: torch.Tensor, scale: float) -> torch.Tensor:
        return (torch.randn(like.shape, generator=self.generator) * scale).to(like.dtype)

    def ema_state(self, masters: bool) -> EmaState:
        """The EMA's state, to compare with after a call; ``masters``: through ``state_dict()`` (an EMA call: it
        follows what changed first, so the values are read after it)."""
        sd = self.ema.state_dict() if masters else None
        if masters:
            self.pending.clear()
        # where the EMA model is not its own accumulator (a bf16 EMA model with its float32 master; a float64 one
        # of a bf16 average), its values are the master rounded, and any EMA call may write them so again (after a
        # conversion, a load): they are checked against the reference bound; the masters, bit for bit
        ema = tensors(self.ema.ema_model)
        derived = {n for n in self.ref if self.mode.acc_dtype(ema[n].dtype) != ema[n].dtype}
        state = EmaState(
            clones(self.ema.ema_model),
            (self.ema.num_updates, self.ema.num_skipped),
            pending=frozenset(self.pending) | frozenset(derived),
        )
        if sd is not None:
            state.masters = {k: v.detach().clone() for k, v in sd.get("master", {}).items()}
            state.generator = sd.get("generator")
        return state

    def assert_ema_unchanged(self, before: EmaState, what: str, skip_masters: bool = False) -> None:
        now = clones(self.ema.ema_model)
        online = tensors(self.model)
        assert set(now) == set(before.values), what
        for n, v in before.values.items():
            if n in self.params and n not in self.averaged_names and same_values(now[n], online[n]):
                continue  # a parameter not averaged may come to show the model's current value (shared again)
            if n in before.pending:
                continue  # an EMA model converted wider takes the master's precision (the invariant checks it)
            assert identical(now[n], v), f"{what}: the EMA model's {n!r} changed ({self.mode}): {describe(now[n], v)}"
        assert (self.ema.num_updates, self.ema.num_skipped) == before.counts, f"{what}: the counts changed"
        if before.masters is not None and not skip_masters:
            sd = self.ema.state_dict()
            masters = sd.get("master", {})
            assert set(masters) == set(before.masters), f"{what}: the masters changed: {sorted(masters)}"
            for n, v in before.masters.items():
                assert identical(masters[n], v), f"{what}: the master of {n!r} changed ({self.mode})"
            if before.generator is not None:
                assert torch.equal(sd["generator"], before.generator), f"{what}: the generator moved"

    def assert_model_unchanged(self, before: dict[str, torch.Tensor], what: str) -> None:
        now = clones(self.model)
        assert set(now) == set(before), what
        for n, v in before.items():
            assert identical(now[n], v), f"{what} wrote the online model's {n!r} ({self.mode})"

    def assert_refused(self, e: Exception, before: EmaState, what: str) -> None:
        names = set(tensors(self.model)) | set(tensors(self.ema.ema_model))
        assert names_tensor(str(e), names), f"{what} refused without naming a tensor: {type(e).__name__}: {e}"
        self.assert_ema_unchanged(before, f"{what} (refused: {e})", skip_masters=True)

    def remember_unselected(self) -> None:
        """Before the model's tensors are replaced (not written in place): a parameter shared with the EMA model
        keeps showing the old data until the next update."""
        for n, t in tensors(self.ema.ema_model).items():
            if n in self.params and n not in self.averaged_names:
                self.allowed[n].append(t.detach().clone())

    def expected_momentum(self, k: int, momentum: Any, steps: int) -> float:
        if momentum is not None:
            m = float(momentum)
        elif k <= self.mode.copy_first:
            m = 1.0
        else:
            j = k - self.mode.copy_first
            m = schedule(j) if self.mode.scheduled else self.mode.momentum
        return 1.0 - (1.0 - m) ** steps if steps != 1 else m

    def skip_rule(self, read: dict[str, torch.Tensor]) -> str:
        """skip_nonfinite's documented rule: 'required' (an averaged value is not finite, or a copied buffer holds
        NaN), 'forbidden' (everything finite), else 'either' (an Inf only in a copied or shared tensor)."""
        floating = {n: t for n, t in read.items() if t.is_floating_point()}
        if all(bool(torch.isfinite(t).all()) for t in floating.values()):
            return "forbidden"
        if any(not bool(torch.isfinite(floating[n]).all()) for n in self.averaged_names):
            return "required"
        if any(bool(t.isnan().any()) for n, t in floating.items() if n not in self.params):
            return "required"
        return "either"

    def fold(self, read: dict[str, torch.Tensor], m: float) -> None:
        """The reference update, and its error bound."""
        ema = tensors(self.ema.ema_model)
        for n in self.ref:
            x = read[n].double()
            acc = self.mode.acc_dtype(ema[n].dtype)
            r = self.mode.rounding(acc)
            if m == 1.0:  # a copy
                self.ref[n] = x.clone()
                exact = read[n].dtype in HOLDS[acc]
                self.bound[n] = torch.zeros_like(x) if exact else (max(r, U[acc]) * x.abs() + TINY[acc])
                continue
            op = U[F64] if acc == F64 else U[F32]
            scale = self.ref[n].abs() + self.bound[n] + x.abs()
            self.bound[n] = (1 - m) * self.bound[n] + (4 * op + 3 * r + 4 * U[F64]) * scale + 3 * TINY[acc]
            self.ref[n] = (1 - m) * self.ref[n] + m * x
        for n in self.allowed:
            self.allowed[n] = [read[n].clone()]

    def check_average(
        self, name: str, value: torch.Tensor, acc: torch.dtype, what: str, rounded: tuple[torch.dtype, ...] = ()
    ) -> None:
        """``value`` (of the EMA model, or a master) is the reference average, within the bound, plus its own
        rounding where its dtype cannot hold the accumulator's (and ``rounded``: roundings it went through on its
        way there and still shows, say a conversion not yet followed)."""
        ref, bound = self.ref[name], self.bound[name]
        assert value.shape == ref.shape, f"{what} {name!r}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        v = value.detach().double()
        lossy = [d for d in {value.dtype, *rounded} if acc not in HOLDS[d]]
        allowed = bound
        if lossy:
            out = sum(U[d] for d in lossy)
            allowed = bound + 1.01 * out * (ref.abs() + bound) + sum(TINY[d] for d in lossy)
        err = (v - ref).abs()
        if bool((err <= allowed).all()):  # the common case (NaN anywhere takes the careful way below)
            return
        finite = torch.isfinite(ref)
        poisoned = ~finite & torch.isfinite(v)
        assert not poisoned.any(), f"{what} {name!r} is finite where NaN/Inf was averaged in ({self.mode})"
        err = (v - ref).abs()
        bad = finite & ~(err <= allowed)  # NaN in the EMA counts as bad
        if bad.any():
            i = int(bad.reshape(-1).nonzero()[0])
            raise AssertionError(
                f"{what} {name!r} ({value.dtype}, accumulated in {acc}, shown through {rounded}) is not the "
                f"reference EMA: element {i} holds "
                f"{v.reshape(-1)[i].item()!r}, the reference {ref.reshape(-1)[i].item()!r} +- "
                f"{allowed.reshape(-1)[i].item():.3g} ({int(bad.sum())} elements off; {self.mode})"
            )

    def check_masters(self) -> None:
        sd = self.ema.state_dict()
        self.pending.clear()
        assert sd["num_updates"] == self.num_updates and sd["num_skipped"] == self.num_skipped
        masters = sd.get("master", {})
        ema = tensors(self.ema.ema_model)
        expected = {n for n in self.ref if ema[n].dtype in (F16, BF16) and self.mode.acc_dtype(ema[n].dtype) == F32}
        assert expected <= set(masters), f"state_dict() lacks the masters of {sorted(expected - set(masters))}"
        for n, master in masters.items():
            if n in self.ref:
                self.check_average(n, master, self.mode.acc_dtype(ema[n].dtype), "state_dict()['master']")

    # -- the invariant -----------------------------------------------------------------------------------------
    @invariant()
    def ema_matches_the_reference(self) -> None:
        ema, online = tensors(self.ema.ema_model), tensors(self.model)
        assert set(ema) == set(online)
        assert (self.ema.num_updates, self.ema.num_skipped) == (self.num_updates, self.num_skipped)
        for n, t in ema.items():
            if n in self.ref:
                rounded = tuple(d for d in (self.pending.get(n), self.pending_update.get(n)) if d is not None)
                self.check_average(n, t, self.mode.acc_dtype(t.dtype), "ema_model's", rounded)
            else:
                candidates = self.allowed[n] + ([online[n]] if n in self.params else [])
                assert any(same_values(t, c) for c in candidates), (
                    f"ema_model's {n!r} ({'a parameter not averaged' if n in self.params else 'a buffer'}) is "
                    f"neither the model's value at the last update nor its current one ({self.mode})"
                )

    # -- updates -----------------------------------------------------------------------------------------------
    def update(
        self,
        data: st.DataObject,
        momentum: Any = None,
        steps: int = 1,
        what: str = "update()",
        before: EmaState | None = None,
        call: Callable[[dict[str, Any]], None] | None = None,
    ) -> bool:
        """One update, checked; False where it was refused (and changed nothing). ``before``: the EMA's state
        taken before the user's change (where the change makes every EMA call refuse). ``call``: something that
        makes the update itself (an optimizer step with ``ema.hook``), filling in ``read`` and ``before`` just
        before it (the update's momentum is then the expected one: the hook does not return it)."""
        k = self.num_updates + 1
        expected = self.expected_momentum(k, momentum, steps)
        seen: dict[str, Any] = {}
        if call is None:
            seen["read"] = clones(self.model)
            seen["before"] = before or self.ema_state(data.draw(st.booleans(), label="snapshot the masters first"))
        args: dict[str, Any] = {} if momentum is None else {"momentum": momentum}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # skip_nonfinite's warning
            try:
                if call is None:
                    m = self.ema.update(steps, **args) if steps != 1 else self.ema.update(**args)
                else:
                    call(seen)
            except REFUSALS as e:
                self.assert_model_unchanged(seen["read"], f"a refused {what}")
                self.assert_refused(e, seen["before"], what)
                self.refused_state = seen["before"]
                event(f"{what}: refused")
                return False
        read, before = seen["read"], seen["before"]
        skipped = self.ema.num_skipped == before.counts[1] + 1
        if call is not None:
            m = 0.0 if skipped else expected
        snapshot_masters = before.masters is not None
        self.assert_model_unchanged(read, what)
        self.pending.clear()
        if not skipped:
            self.pending_update.clear()
        rule = self.skip_rule(read) if self.mode.skip else "never"
        if skipped:
            assert self.mode.skip and rule != "forbidden", f"{what} skipped though the online model is finite"
            assert m == 0.0 and self.ema.num_updates == before.counts[0], f"a skipped {what} returned {m!r}"
            counts = (before.counts[0], before.counts[1] + 1)
            unchanged = EmaState(before.values, counts, before.masters, before.generator, before.pending)
            self.assert_ema_unchanged(unchanged, f"a skipped {what}")
            self.num_skipped += 1
            event("update(): skipped")
            return True
        assert rule != "required", f"{what} averaged NaN/Inf in with skip_nonfinite=True ({self.mode})"
        assert self.ema.num_updates == k and self.ema.num_skipped == before.counts[1], (
            f"{what}: counts {self.ema.num_updates, self.ema.num_skipped}, expected {k, before.counts[1]}"
        )
        assert isinstance(m, float) and math.isclose(m, expected, rel_tol=1e-12), (
            f"{what} returned momentum {m!r}, expected {expected!r} (update {k}; {self.mode})"
        )
        self.fold(read, m)
        event(f"update(): {'a copy' if m == 1.0 else 'momentum 0' if m == 0.0 else 'averaged'}")
        self.num_updates = k
        if snapshot_masters:
            self.check_masters()
        return True

    def steps(self, data: st.DataObject) -> int:
        return data.draw(st.integers(1, 4), label="steps") if self.mode.per_step else 1

    @rule(data=st.data())
    def update_with_the_schedule(self, data: st.DataObject) -> None:
        self.update(data, steps=self.steps(data))

    @rule(data=st.data())
    def train_step(self, data: st.DataObject) -> None:
        """What a training loop does most: an optimizer step, then an update."""
        self.optimizer_step(data)
        self.update(data, steps=self.steps(data))

    @rule(data=st.data())
    def hooked_optimizer_step(self, data: st.DataObject) -> None:
        """``ema.hook(optimizer)``: the update runs after ``optimizer.step()`` (SGD on the trainable parameters)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1)
        for p in params:
            p.grad = self.noise(p, 1.0)

        def step(seen: dict[str, Any]) -> None:
            def look(*_: Any) -> None:  # registered first: runs after the step, before the EMA's hook
                seen["read"], seen["before"] = clones(self.model), self.ema_state(False)

            handles = [optimizer.register_step_post_hook(look), self.ema.hook(optimizer)]
            try:
                optimizer.step()
            finally:
                for h in handles:
                    h.remove()

        self.update(data, what="optimizer.step() with ema.hook(optimizer)", call=step)
        for p in params:
            p.grad = None

    @rule(data=st.data())
    def another_ema_of_the_model(self, data: st.DataObject) -> None:
        """Another EMA of the same model (a second decay, a post-hoc profile), of any mode, that lives on: building
        it (a flat one lays the model's tensors out anew) and updating it leave this EMA and the model alone."""
        online, before = clones(self.model), self.ema_state(False)
        if len(self.others) < 2:
            mode = data.draw(modes(large=st.just(self.mode.large)), label="another EMA")
            self.remember_unselected()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.others.append(EMA(self.model, **mode.kwargs()))
            what = f"another EMA of the model ({mode})"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for other in self.others:
                    with contextlib.suppress(*REFUSALS):  # (its own contract is not checked here)
                        other.update()
            what = "another EMA's update()"
        self.assert_model_unchanged(online, what)
        self.assert_ema_unchanged(before, what)

    @rule(data=st.data())
    def update_with_a_momentum(self, data: st.DataObject) -> None:
        m = data.draw(st.sampled_from([0.0, 1.0]) | st.floats(0.001, 0.999), label="momentum")
        as_tensor = data.draw(st.booleans(), label="as a 0-d tensor")
        self.update(data, momentum=torch.tensor(m, dtype=F64) if as_tensor else m, steps=self.steps(data))

    # -- the user's writes to the online model -----------------------------------------------------------------
    @rule(data=st.data())
    def optimizer_step(self, data: st.DataObject) -> None:
        scale = data.draw(st.sampled_from([1e-3, 0.1, 1.0]), label="scale")
        frozen_too = data.draw(st.booleans(), label="frozen parameters too")
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad or frozen_too:
                    p.add_(self.noise(p, scale))

    @rule()
    def buffers_move(self) -> None:
        norm = self.model.norm
        with torch.no_grad():
            norm.running_mean.add_(self.noise(norm.running_mean, 0.1))
            norm.running_var.mul_(1.25)
            norm.num_batches_tracked.add_(1)

    @rule(data=st.data())
    def poison(self, data: st.DataObject) -> None:
        floating = sorted(n for n, t in tensors(self.model).items() if t.is_floating_point())
        name = data.draw(st.sampled_from(floating), label="poisoned tensor")
        value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
        t = tensors(self.model)[name]
        with torch.no_grad():
            i = data.draw(st.integers(0, t.numel() - 1), label="index")
            t[torch.unravel_index(torch.tensor(i), t.shape)] = value  # any layout (a transposed view too)

    @rule(data=st.data())
    def set_attention_mask(self, data: st.DataObject) -> None:
        with torch.no_grad():
            self.model.mask[: data.draw(st.integers(1, 4), label="masked")] = -math.inf

    @rule()
    def heal(self) -> None:
        """A user recovers from a diverged step (and unmasks)."""
        with torch.no_grad():
            for t in tensors(self.model).values():
                if t.is_floating_point():
                    t.nan_to_num_(nan=0.25, posinf=0.5, neginf=-0.5)

    CONVERSIONS: ClassVar[dict[str, Callable[[nn.Module], Any]]] = {
        "double": lambda m: m.double(),
        "to(float64)": lambda m: m.to(F64),
        "half": lambda m: m.half(),
        "float": lambda m: m.float(),
        "bfloat16": lambda m: m.bfloat16(),
        "channels_last": lambda m: m.to(memory_format=torch.channels_last),
        "contiguous_format": lambda m: m.to(memory_format=torch.contiguous_format),
    }

    @rule(kind=st.sampled_from(list(CONVERSIONS)))
    def convert_the_model(self, kind: str) -> None:
        self.remember_unselected()
        self.CONVERSIONS[kind](self.model)

    @rule(data=st.data())
    def replace_a_submodule(self, data: st.DataObject) -> None:
        kinds = ["model alike", "ema_model alike", "model other shape", "ema.ema_model = a copy"]
        which = data.draw(st.sampled_from(kinds), label="replace")
        head = self.model.head
        if which == "ema_model alike":
            self.ema.ema_model.head = copy.deepcopy(self.ema.ema_model.head)
            for n, t in tensors(self.ema.ema_model.head).items():  # a copy: shared again at the EMA's next call
                if f"head.{n}" in self.allowed:
                    self.allowed[f"head.{n}"].append(t.detach().clone())
            return
        if which == "ema.ema_model = a copy":  # lifecycle.md: followed, it is the EMA model from then on
            model_before = clones(self.model)
            self.ema.ema_model = copy.deepcopy(self.ema.ema_model)
            self.assert_model_unchanged(model_before, "ema.ema_model = copy.deepcopy(ema.ema_model)")
            for n, t in tensors(self.ema.ema_model).items():
                if n in self.ref:
                    self.written(n, t)  # "the next update averages into it, from its own values"
                else:
                    self.allowed[n].append(t.detach().clone())
            return
        before = self.ema_state(data.draw(st.booleans(), label="snapshot the masters first"))
        self.remember_unselected()
        out = head.out_features + (which != "model alike")
        new = nn.Linear(5, out).to(head.weight.dtype)
        with torch.no_grad():
            for p in new.parameters():
                p.copy_(self.noise(p, 0.5))
        self.model.head = new
        if which == "model alike":
            return
        refused = not self.update(data, what="update() after a head of another shape", before=before)

        assert refused, "an update followed a head of another shape"
        if data.draw(st.booleans(), label="put the old head back"):
            self.model.head = head
            self.assert_ema_unchanged(self.refused_state, "a refused update (checked once the head is back)")
            return
        self.ema.ema_model.head = copy.deepcopy(self.model.head)  # the documented way: the EMA of a new head
        for n, t in tensors(self.ema.ema_model.head).items():
            name = f"head.{n}"
            if name in self.ref:
                self.written(name, t)
            else:
                self.allowed[name] = [t.detach().clone()]

    @rule(data=st.data())
    def assign_data(self, data: st.DataObject) -> None:
        """``p.data = ...`` by hand: followed where dtype and device stay; another dtype needs ``refresh()``."""
        kind = data.draw(st.sampled_from(["alike", "transposed view", "other dtype", "old storage held"]), label="how")
        name = "sq.weight" if kind == "transposed view" else data.draw(st.sampled_from(sorted(self.params)))
        p = tensors(self.model)[name]
        before = self.ema_state(data.draw(st.booleans(), label="snapshot the masters first"))
        self.remember_unselected()
        with torch.no_grad():
            if kind == "alike":
                p.data = p.data.clone() + self.noise(p, 0.1)
            elif kind == "transposed view":
                p.data = p.data.t()
            elif kind == "old storage held":
                self.held.append(p.data)
                p.data = p.data.clone() + self.noise(p, 0.1)
            else:
                p.data = p.data.to(F32 if p.dtype != F32 else F64)
        if kind != "other dtype":
            return
        if not self.update(data, what=f"update() after {name}.data changed dtype", before=before):
            self.ema.refresh()  # documented: another dtype needs ema.refresh()
            self.pending.clear()
            self.assert_ema_unchanged(self.refused_state, "a refused update (checked after refresh())")
            assert self.update(data, what="update() after refresh()"), "refused after refresh()"

    @rule(data=st.data())
    def load_into_the_model(self, data: st.DataObject) -> None:
        target = self.model if data.draw(st.booleans(), label="whole model") else self.model.sq
        assign = data.draw(st.booleans(), label="assign")
        sd = self.perturbed(target.state_dict())
        if assign:
            self.remember_unselected()
        target.load_state_dict(sd, assign=assign)

    # -- the user's writes to the EMA model --------------------------------------------------------------------
    @rule(kind=st.sampled_from(list(CONVERSIONS)))
    def convert_the_ema_model(self, kind: str) -> None:
        model_before = clones(self.model)
        ema = tensors(self.ema.ema_model)
        before = {n: ema[n].dtype for n in self.ref}
        self.CONVERSIONS[kind](self.ema.ema_model)
        self.assert_model_unchanged(model_before, f"ema_model.{kind}")
        ema = tensors(self.ema.ema_model)
        for n, old in before.items():
            acc = self.mode.acc_dtype(old)
            new = ema[n].dtype
            if acc in HOLDS[new]:
                # widening (a bf16 EMA model to float32): the average keeps its precision, and the EMA model
                # shows it from the EMA's next call on; until then it holds the converted old values
                if acc not in HOLDS[old]:
                    self.pending[n] = old
                continue
            # narrowing: the EMA may go on from the converted values (the user rounded the average)
            scale = self.ref[n].abs() + self.bound[n]
            # the old EMA model's own rounding, the conversion's, and that of its values going back into the accumulator
            slack = (0.0 if acc in HOLDS[old] else U[old]) + U[new] + (0.0 if new in HOLDS[acc] else U[acc])
            self.bound[n] = self.bound[n] + 1.01 * slack * scale + TINY[new] + TINY[old]
        for n in self.allowed:
            self.allowed[n].append(ema[n].detach().clone())

    def written(self, name: str, value: torch.Tensor) -> None:
        """The user wrote ``value`` into the EMA model's averaged tensor: it is the average now (rounded into
        the accumulator where that is narrower)."""
        acc = self.mode.acc_dtype(value.dtype)
        self.ref[name] = value.detach().double().clone()
        exact = value.dtype in HOLDS[acc]
        self.bound[name] = torch.zeros_like(self.ref[name]) if exact else U[acc] * self.ref[name].abs() + TINY[acc]
        self.pending.pop(name, None)
        self.pending_update.pop(name, None)

    def loaded_into_ema(self, prefix: str, sd: dict[str, torch.Tensor]) -> None:
        ema = tensors(self.ema.ema_model)
        for k in sd:
            name = prefix + k
            value = ema[name].detach()
            if name in self.ref:
                self.written(name, value)
            else:
                self.allowed[name].append(value.clone())

    @rule(data=st.data())
    def load_into_the_ema_model(self, data: st.DataObject) -> None:
        """The loaded values are the average (lifecycle.md); the online model is not touched."""
        prefix = data.draw(st.sampled_from(["", "head.", "norm.", "sq."]), label="into")
        target = self.ema.ema_model.get_submodule(prefix.rstrip(".")) if prefix else self.ema.ema_model
        assign = data.draw(st.booleans(), label="assign")
        sd = self.perturbed(target.state_dict())
        model_before = clones(self.model)
        before = self.ema_state(False)
        what = f"ema.ema_model{'.' + prefix.rstrip('.') if prefix else ''}.load_state_dict(assign={assign})"
        try:
            target.load_state_dict(sd, assign=assign)
        except REFUSALS as e:  # a load that would write the model's own (shared) tensors may be refused
            self.assert_model_unchanged(model_before, f"a refused {what}")
            self.assert_refused(e, before, what)
            return
        self.assert_model_unchanged(model_before, what)
        self.loaded_into_ema(prefix, sd)

    @rule(data=st.data())
    def write_into_the_ema_model(self, data: st.DataObject) -> None:
        """An in-place write into an averaged tensor of the EMA model: the written values are the average."""
        name = data.draw(st.sampled_from(sorted(self.ref)), label="written")
        t = tensors(self.ema.ema_model)[name]
        model_before = clones(self.model)
        with torch.no_grad():
            t.mul_(0.5)
        self.assert_model_unchanged(model_before, f"an in-place write into ema_model's {name!r}")
        self.written(name, t)

    # -- using the EMA -----------------------------------------------------------------------------------------
    @rule(data=st.data())
    def evaluate_swapped(self, data: st.DataObject) -> None:
        before = self.ema_state(data.draw(st.booleans(), label="snapshot the masters"))
        online = clones(self.model)
        swapped = set(self.ref) | {n for n in self.allowed if n not in self.params}
        try_update = data.draw(st.booleans(), label="try an update inside")
        with self.ema.swapped() as inside:
            assert inside is self.model
            now = tensors(self.model)
            for n in swapped - before.pending:
                assert same_values(now[n], before.values[n]), f"inside swapped() the model's {n!r} is not the EMA's"
            for n in swapped & before.pending:  # the EMA's average, rounded into the model's dtype
                acc = self.mode.acc_dtype(tensors(self.ema.ema_model)[n].dtype)
                self.check_average(n, now[n], acc, "inside swapped() the model's", (before.values[n].dtype,))
            if try_update:
                with pytest.raises(RuntimeError, match=r"inside ema\.swapped\(\)"):
                    self.ema.update()
        self.pending.clear()
        self.assert_model_unchanged(online, "swapped() (on exit the online weights must be back bit for bit)")
        self.assert_ema_unchanged(before, "swapped()")

    @rule(data=st.data())
    def copy_to_another_model(self, data: st.DataObject) -> None:
        other = copy.deepcopy(self.model)
        with torch.no_grad():
            for t in tensors(other).values():
                t.fill_(7)
        before = self.ema_state(data.draw(st.booleans(), label="snapshot the masters"))
        online = clones(self.model)
        self.ema.copy_to(other)
        self.assert_model_unchanged(online, "copy_to(another module)")
        self.assert_ema_unchanged(before, "copy_to()")
        ema = tensors(self.ema.ema_model)
        for n, t in tensors(other).items():
            assert same_values(t, ema[n]), f"copy_to(): the copy's {n!r} is not the EMA model's"

    @rule(data=st.data())
    def refresh(self, data: st.DataObject) -> None:
        before = self.ema_state(False)
        online = clones(self.model)
        try:
            self.ema.refresh()
        except REFUSALS as e:
            self.assert_refused(e, before, "refresh()")
            raise AssertionError(f"refresh() refused a state every update accepts: {e}") from e
        self.pending.clear()
        self.assert_model_unchanged(online, "refresh()")
        self.assert_ema_unchanged(before, "refresh()")

    @rule()
    def look_at_the_state_dict(self) -> None:
        online = clones(self.model)
        self.check_masters()
        self.assert_model_unchanged(online, "state_dict()")

    @rule(data=st.data())
    def checkpoint_and_resume(self, data: st.DataObject) -> None:
        online = clones(self.model)
        state = self.ema.state_dict()
        self.pending.clear()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        where = data.draw(st.sampled_from(["itself", "a fresh EMA", "a fresh EMA of another mode"]), label="into")
        if where == "itself":
            before = self.ema_state(True)
            # where the EMA model is not its own accumulator, it may show values the master is not rounded to
            # (converted since the last update: rounded twice; or, wider than the accumulator, loaded into):
            # loading the state writes the master rounded (F13; the invariant checks them, and the masters stay
            # bit for bit); all else must stay bit for bit
            ema = tensors(self.ema.ema_model)
            before.pending = before.pending | {n for n in self.ref if self.mode.acc_dtype(ema[n].dtype) != ema[n].dtype}
            self.ema.load_state_dict(loaded)
            self.assert_ema_unchanged(before, "ema.load_state_dict(ema.state_dict()) (through torch.save)")
            self.assert_model_unchanged(online, "load_state_dict()")
            return
        mode = self.mode
        if where == "a fresh EMA of another mode":
            mode = data.draw(modes(large=st.just(self.mode.large)), label="other mode")
        note(f"resumed into {mode}")
        self.remember_unselected()  # a flat EMA lays the model's tensors out anew: shared ones show the old data
        fresh = EMA(self.model, **mode.kwargs())
        fresh_before = clones(fresh.ema_model)
        try:
            fresh.load_state_dict(loaded)
        except REFUSALS as e:  # across modes a state may not fit (say, masters of other tensors): said clearly
            event("resume into another mode: refused")
            names = set(tensors(self.model))
            alike = all(t.dtype == fresh_before[n].dtype for n, t in tensors(self.ema.ema_model).items())
            assert where != "a fresh EMA" or not alike, f"a fresh EMA of the same mode refused its checkpoint: {e}"
            assert names_tensor(str(e), names), f"load_state_dict() refused without naming a tensor: {e}"
            for n, v in clones(fresh.ema_model).items():
                assert identical(v, fresh_before[n]), f"a refused load_state_dict() changed {n!r}"
            self.assert_model_unchanged(online, "a fresh EMA of the model")
            return
        self.assert_model_unchanged(online, "a fresh EMA of the model, resumed")
        event(f"resumed into {where}")
        self.resumed(mode, fresh, loaded)

    def resumed(self, mode: Mode, fresh: EMA, loaded: dict[str, Any]) -> None:
        saved, saved_masters = loaded["ema_model"], loaded.get("master", {})
        old_ref, old_bound = self.ref, self.bound
        if mode == self.mode and all(
            saved[n].dtype == t.dtype for n, t in tensors(fresh.ema_model).items() if n in saved
        ):
            for n, t in tensors(fresh.ema_model).items():
                # (parameters shared with the model are not saved: the model holds them; an EMA model that is not
                # its own accumulator shows the loaded master rounded: the invariant checks it)
                if n in saved and (n not in self.averaged_names or mode.acc_dtype(t.dtype) == t.dtype):
                    assert identical(t, saved[n]), f"a resumed EMA of the same mode differs in {n!r}"
        self.start(mode, fresh)
        ema = tensors(fresh.ema_model)
        # the EMA model holds the saved EMA model's values until the next update writes the (loaded) masters into it
        self.pending, self.pending_update = {}, {}
        for n, t in ema.items():
            lossy = n in saved and saved[n].is_floating_point() and mode.acc_dtype(t.dtype) not in HOLDS[saved[n].dtype]
            if n in self.averaged_names and lossy:
                self.pending_update[n] = saved[n].dtype
        self.ref, self.bound = {}, {}
        allowed = self.allowed
        self.allowed = {}
        for n, t in ema.items():
            acc = mode.acc_dtype(t.dtype)
            if n in self.averaged_names:
                if n in old_ref:
                    value_dtype = saved_masters[n].dtype if n in saved_masters else saved[n].dtype
                    self.ref[n], self.bound[n] = old_ref[n], old_bound[n]
                    if value_dtype not in HOLDS[acc]:
                        scale = old_ref[n].abs() + old_bound[n]
                        self.bound[n] = old_bound[n] + 1.01 * U[acc] * scale + TINY[acc]
                else:
                    v = saved[n]
                    self.ref[n] = v.double().clone()
                    exact = v.dtype in HOLDS[acc]
                    self.bound[n] = torch.zeros_like(self.ref[n]) if exact else U[acc] * v.double().abs() + TINY[acc]
            else:
                self.allowed[n] = allowed.get(n, []) + [saved[n].clone()] if n in saved else allowed.get(n, [])
                if not self.allowed[n]:
                    self.allowed[n] = [t.detach().clone()]
        self.num_updates, self.num_skipped = loaded["num_updates"], loaded["num_skipped"]


EMAContract.TestCase.settings = SETTINGS
TestEMAContract = EMAContract.TestCase


# -- compile=True: slow to compile, so a few fixed modes and short runs --------------------------------------------
class CompiledEMAContract(EMAContract):
    """The same contract for ``compile=True`` (flat, a bf16 model, either master); each example starts with a
    compiled update, so that the few examples CI affords all run the generated kernels."""

    fixed_modes = st.builds(
        Mode,
        precision=st.sampled_from(["bf16-master", "bf16-split"]),
        flat=st.just(True),
        compile=st.just(True),
        skip=st.booleans(),
        copy_first=st.integers(0, 1),
        large=st.just(False),
    )

    @initialize(data=st.data())
    def build(self, data: st.DataObject) -> None:
        super().build(data)
        self.optimizer_step(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # "could not compile": the eager update is tested above
            assert self.update(data, what="the first compiled update()")


CompiledEMAContract.TestCase.settings = settings(
    SETTINGS,
    max_examples=2 if PROFILE == "ci" else 100,
    stateful_step_count=6 if PROFILE == "ci" else 30,
)
TestCompiledEMAContract = CompiledEMAContract.TestCase


# -- fixed tests of what the machine cannot say --------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased() -> None:
    """Small updates move a bf16 average on average: the mean over many elements tracks the float64 EMA."""
    model = nn.Linear(256, 256, bias=False).to(BF16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, momentum=2e-3, dtype=BF16, stochastic_rounding=True, seed=3)
    with torch.no_grad():
        model.weight.fill_(1.25)
    ref = 1.0
    for _ in range(200):
        m = ema.update()
        ref = (1 - m) * ref + m * 1.25
    mean = ema.ema_model.weight.double().mean().item()
    # each element's error has mean 0 and a deviation under one ulp (2**-7) per update, damped by (1 - m):
    # the mean of 65536 elements is off by far less than 1e-3 unless the rounding is biased
    assert abs(mean - ref) < 1e-3, (mean, ref)
    assert ref - 1.0 > 0.08  # and the average moved: plain bf16 rounding would have kept it at 1.0


def test_mode_helpers_match_what_the_ema_builds() -> None:
    """The test's reading of the docs (which tensors are averaged, the accumulator) agrees with the EMA."""
    for select in SELECTIONS:
        mode = Mode(precision="bf16-master", select=select)
        model = Net().to(mode.model_dtype)
        ema = EMA(model, **mode.kwargs())
        masters = set(ema.state_dict().get("master", {}))
        averaged = {n for n, p in model.named_parameters() if mode.averaged(n, p)}
        assert masters == averaged, (select, masters ^ averaged)
