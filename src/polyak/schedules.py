"""Momentum schedules: pure functions of the 1-based update index.

A schedule is any callable ``k -> momentum`` where ``k`` is the index of the update about to happen
(1 for the first) and the momentum is the weight of the online model in that update::

    ema_k = (1 - m_k) * ema_{k-1} + m_k * theta_k

Because a schedule depends on nothing but ``k``, and ``k`` is saved in every ``state_dict``, a resumed run
continues exactly where it stopped. Libraries that write ``decay = 1 - momentum`` (timm, diffusers,
ema-pytorch, ``torch.optim.swa_utils``) describe the same update from the other side.

Every function here validates its arguments and returns a small callable object with a readable ``repr``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch

__all__ = [
    "Schedule",
    "constant",
    "delayed",
    "gamma_from_sigma_rel",
    "inverse_gamma",
    "linear_warmup",
    "power_function",
    "ratio_warmup",
    "sigma_rel_from_gamma",
]

Schedule = Callable[[int], float]
"""Type of a schedule, a callable from the 1-based update index to the momentum of that update."""


def _scalar(value: object) -> object:
    """A one-element real tensor or numpy array as a Python number (configs pass them; ignite accepts them)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return value.item()
    elif type(value).__module__ == "numpy" and getattr(value, "size", None) == 1 and hasattr(value, "item"):
        item = value.item()  # a numpy scalar or 0-d array
        return item if not isinstance(item, (bool, complex)) else value
    return value


def _check_real(name: str, value: object) -> float:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_momentum(name: str, value: object, *, closed: bool = False) -> float:
    """``value`` in (0, 1), or in [0, 1] where ``closed``."""
    value = _check_real(name, value)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def _check_int(name: str, value: object, minimum: int) -> int:
    value = _scalar(value)
    if isinstance(value, float) and value.is_integer():  # 10.0 from a config: the int it means
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _index(k: int) -> int:
    """An update index: 1 for the first update (a schedule has nothing to say about update 0)."""
    if k < 1:
        raise ValueError(f"the update index k must be >= 1 (1 is the first update), got {k!r}")
    return k


class _Saved:
    """``state_dict()``/``load_state_dict()`` for a schedule: its parameters, as plain values.

    A schedule is fixed once built, so loading a state checks that it describes this very schedule and
    refuses another one (ignite's ``LambdaStateScheduler`` saves and loads its callable this way).
    """

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": type(self).__name__, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if dict(state_dict) != self.state_dict():
            raise ValueError(
                f"state_dict describes another schedule than this one: got {dict(state_dict)!r}, this one is "
                f"{self.state_dict()!r}; build it with the saved parameters to resume that run"
            )


@dataclass(frozen=True)
class _Constant(_Saved):
    momentum: float

    def __call__(self, k: int) -> float:
        return self.momentum


def constant(momentum: float) -> Schedule:
    """The same momentum for every update.

    Args:
        momentum: weight of the online model in each update, in (0, 1).

    Example:
        >>> from polyak.schedules import constant
        >>> s = constant(0.001)
        >>> s(1), s(10_000)
        (0.001, 0.001)
    """
    return _Constant(_check_momentum("momentum", momentum))


@dataclass(frozen=True)
class _LinearWarmup(_Saved):
    momentum_warmup: float
    momentum: float
    warmup_iters: int

    def __call__(self, k: int) -> float:
        return _warmup(self.momentum_warmup, self.momentum, self.warmup_iters, _index(k))


def _warmup(momentum_warmup: float, momentum: float, warmup_iters: float, k: int) -> float:
    """ignite's arithmetic, to the last bit: linear from ``momentum_warmup``, clamped so it never passes."""
    current = momentum_warmup + (momentum - momentum_warmup) * (k - 1) / max(1, warmup_iters - 1)
    if momentum >= momentum_warmup:
        return min(momentum, current)
    return max(momentum, current)


def linear_warmup(momentum_warmup: float, momentum: float, warmup_iters: int) -> Schedule:
    """Linear warm-up from ``momentum_warmup`` to ``momentum`` over the first ``warmup_iters`` updates.

    The warm-up of pytorch-ignite's ``EMAHandler``, computed as ignite computes it: at update ``k``::

        m_k = m_w + (m - m_w) * (k - 1) / max(1, W - 1)

    clamped so that it never passes ``m``: update 1 uses ``momentum_warmup``, and every update from
    ``max(2, warmup_iters)`` on uses ``momentum`` (up to ignite's rounding at update ``warmup_iters``).

    Args:
        momentum_warmup: momentum of the first update, in [0, 1].
        momentum: momentum after the warm-up, in (0, 1).
        warmup_iters: number of updates the warm-up spans, >= 0; as in ignite, 0, 1 and 2 all mean that
            update 1 uses ``momentum_warmup`` and every later one ``momentum``.

    Example:
        >>> from polyak.schedules import linear_warmup
        >>> s = linear_warmup(0.2, 0.002, warmup_iters=100)
        >>> round(s(1), 6), round(s(50), 6), round(s(100), 6), round(s(1000), 6)
        (0.2, 0.102, 0.002, 0.002)
    """
    return _LinearWarmup(
        _check_momentum("momentum_warmup", momentum_warmup, closed=True),
        _check_momentum("momentum", momentum),
        _check_int("warmup_iters", warmup_iters, 0),
    )


@dataclass(frozen=True)
class _InverseGamma(_Saved):
    gamma: float
    power: float
    max_decay: float
    min_decay: float

    def __call__(self, k: int) -> float:
        t = _index(k) - 1
        if t <= 0:  # the first update copies, min_decay or not, as in timm, ema-pytorch and diffusers
            return 1.0
        decay = 1.0 - (1.0 + t / self.gamma) ** -self.power
        return 1.0 - min(self.max_decay, max(self.min_decay, decay))


def inverse_gamma(
    gamma: float = 1.0, power: float = 2 / 3, max_decay: float = 0.9999, min_decay: float = 0.0
) -> Schedule:
    """The warm-up of timm, diffusers and ema-pytorch: the decay grows as an inverse power of the step.

    With ``t = k - 1``::

        m_k = 1                                                      if t <= 0
        m_k = 1 - clamp(1 - (1 + t / gamma) ** -power, min_decay, max_decay)  otherwise

    so the first update copies the online model, whatever ``min_decay`` (as in timm, ema-pytorch and
    diffusers, whose first warm-up step copies too). ``gamma=1, power=2/3`` suits
    runs of a million steps or more; ``power=3/4`` shorter ones (T. Karras' and @lucidrains' advice, as
    quoted by ema-pytorch).

    Args:
        gamma: time scale of the warm-up, > 0.
        power: exponent, > 0.
        max_decay: largest decay, so smallest momentum is ``1 - max_decay``; in [0, 1].
        min_decay: smallest decay; in [0, max_decay].

    Example:
        >>> from polyak.schedules import inverse_gamma
        >>> s = inverse_gamma(gamma=1.0, power=3 / 4, max_decay=0.999)
        >>> round(s(1), 6), round(s(2), 6), round(s(10_001), 6), round(s(10**7), 6)
        (1.0, 0.594604, 0.001, 0.001)
    """
    gamma = _check_real("gamma", gamma)
    power = _check_real("power", power)
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power!r}")
    max_decay = _check_momentum("max_decay", max_decay, closed=True)
    min_decay = _check_momentum("min_decay", min_decay, closed=True)
    if min_decay > max_decay:
        raise ValueError(f"min_decay must be <= max_decay={max_decay!r}, got {min_decay!r}")
    return _InverseGamma(gamma, power, max_decay, min_decay)


@dataclass(frozen=True)
class _RatioWarmup(_Saved):
    max_decay: float
    min_decay: float

    def __call__(self, k: int) -> float:
        decay = (1 + _index(k)) / (10 + k)
        return 1.0 - max(min(decay, self.max_decay), self.min_decay)


def ratio_warmup(max_decay: float = 0.9999, min_decay: float = 0.0) -> Schedule:
    """The warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``: the decay of update ``k`` is
    ``(1 + k) / (10 + k)`` until it reaches ``max_decay``::

        m_k = 1 - clamp((1 + k) / (10 + k), min_decay, max_decay)

    torch-ema's ``ExponentialMovingAverage`` uses it by default (``use_num_updates=True``), from its first
    update on; diffusers' ``EMAModel`` without ``use_ema_warmup`` uses it after its first step, which copies:
    ``EMA(model, schedule=ratio_warmup(decay), copy_first=1)``. The decay reaches 0.99 at update 890 and
    0.999 at update 8990.

    Args:
        max_decay: largest decay, so smallest momentum is ``1 - max_decay``; in [0, 1].
        min_decay: smallest decay; in [0, max_decay].

    Example:
        >>> from polyak.schedules import ratio_warmup
        >>> s = ratio_warmup(max_decay=0.99)
        >>> round(s(1), 6), round(s(10), 6), round(s(10_000), 6)
        (0.818182, 0.45, 0.01)
    """
    max_decay = _check_momentum("max_decay", max_decay, closed=True)
    min_decay = _check_momentum("min_decay", min_decay, closed=True)
    if min_decay > max_decay:
        raise ValueError(f"min_decay must be <= max_decay={max_decay!r}, got {min_decay!r}")
    return _RatioWarmup(max_decay, min_decay)


@dataclass(frozen=True)
class _PowerFunction(_Saved):
    gamma: float

    def __call__(self, k: int) -> float:
        return 1.0 - (1.0 - 1.0 / _index(k)) ** (self.gamma + 1.0)

    @property
    def sigma_rel(self) -> float:
        return sigma_rel_from_gamma(self.gamma)


_MAX_SIGMA_REL = 12**-0.5
# Narrower profiles need gamma > 1e8: an EMA of a few steps, whose float64 profiles no longer resolve
_MIN_SIGMA_REL = 1e-4


def sigma_rel_from_gamma(gamma: float) -> float:
    """Relative standard deviation of a power-function EMA's averaging profile (EDM2, eq. 3).

    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``

    Example:
        >>> from polyak.schedules import sigma_rel_from_gamma
        >>> round(sigma_rel_from_gamma(6.9372039376), 6)
        0.1
    """
    gamma = _check_real("gamma", gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function EMA with relative width ``sigma_rel`` (EDM2).

    The largest real root of ``g**3 + 7 g**2 + (16 - T) g + (12 - T) = 0`` with ``T = sigma_rel**-2``;
    defined for ``0 < sigma_rel < 1/sqrt(12)`` (the widest profile, gamma = 0, is the running mean); polyak
    takes ``1e-4 <= sigma_rel`` (narrower ones need ``gamma > 1e8``, beyond float64's resolution of profiles).

    Example:
        >>> from polyak.schedules import gamma_from_sigma_rel
        >>> round(gamma_from_sigma_rel(0.05), 10), round(gamma_from_sigma_rel(0.10), 10)
        (16.9721986023, 6.9372039376)
    """
    sigma_rel = _check_real("sigma_rel", sigma_rel)
    if not _MIN_SIGMA_REL <= sigma_rel < _MAX_SIGMA_REL:
        raise ValueError(
            f"sigma_rel must be in [{_MIN_SIGMA_REL}, 1/sqrt(12) ~ {_MAX_SIGMA_REL:.6f}), got {sigma_rel!r}"
        )
    t = sigma_rel**-2
    # The cubic is increasing past its largest root, and sigma_rel_from_gamma is decreasing in gamma:
    # bisect between 0 (where the cubic is 12 - T < 0) and a bound where it is positive, then polish.
    f = lambda g: ((g + 7.0) * g + (16.0 - t)) * g + (12.0 - t)  # noqa: E731
    lo, hi = 0.0, max(1.0, math.sqrt(t))
    while f(hi) <= 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def power_function(gamma: float | None = None, sigma_rel: float | None = None) -> Schedule:
    """The power-function EMA of EDM2 (Karras et al., arXiv 2312.02696): its average never forgets its start.

    At update ``k``: ``beta_k = (1 - 1/k) ** (gamma + 1)`` and ``m_k = 1 - beta_k``. The first update copies
    the online weights; ``gamma = 0`` is the plain running mean. The averaging profile has a relative width
    ``sigma_rel`` that stays fixed as training goes on; give exactly one of ``gamma`` or ``sigma_rel``.

    Args:
        gamma: exponent of the profile, >= 0.
        sigma_rel: relative width, in (0, 1/sqrt(12)); EDM2 uses 0.05 and 0.10.

    Example:
        >>> from polyak.schedules import power_function
        >>> mean = power_function(gamma=0)
        >>> mean(1), mean(2), mean(4)
        (1.0, 0.5, 0.25)
        >>> s = power_function(sigma_rel=0.10)
        >>> round(s.gamma, 6), round(s(100), 6)
        (6.937204, 0.076673)
    """
    if (gamma is None) == (sigma_rel is None):
        raise ValueError(f"give exactly one of gamma or sigma_rel, got gamma={gamma!r}, sigma_rel={sigma_rel!r}")
    if sigma_rel is not None:
        return _PowerFunction(gamma_from_sigma_rel(sigma_rel))
    gamma = _check_real("gamma", gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    return _PowerFunction(gamma)


@dataclass(frozen=True)
class _Delayed(_Saved):
    schedule: Schedule
    start: int

    def __call__(self, k: int) -> float:
        k = _index(k)
        return 1.0 if k <= self.start else self.schedule(k - self.start)  # checked by its user

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": type(self).__name__, "start": self.start, "inner": _describe(self.schedule)}


def _describe(schedule: Schedule) -> Any:
    """A schedule as plain values: its own ``state_dict()``, else its qualified name (never its ``repr``, which
    holds a function's address: the same code in a resumed process would not match it)."""
    if hasattr(schedule, "state_dict"):
        return schedule.state_dict()
    kind = schedule if hasattr(schedule, "__qualname__") else type(schedule)
    return f"{getattr(kind, '__module__', None)}.{getattr(kind, '__qualname__', type(schedule).__name__)}"


def delayed(schedule: Schedule, start: int = 1) -> Schedule:
    """Copy the online model for the first ``start`` updates, then follow ``schedule`` from its first update.

    The delayed start of ema-pytorch and diffusers (``update_after_step``), and with ``start=1`` the "first
    update copies" of ``torch.optim.swa_utils.AveragedModel``, timm without warm-up and Lightning's
    ``EMAWeightAveraging``: update ``k`` uses momentum 1 (a copy) for ``k <= start``, else
    ``schedule(k - start)``.

    Args:
        schedule: the schedule after the delay (``k = 1`` is the first update that averages).
        start: how many updates copy, >= 0 (0: no delay).

    Example:
        >>> from polyak.schedules import constant, delayed
        >>> s = delayed(constant(0.001), start=2)
        >>> s(1), s(2), s(3), s(100)
        (1.0, 1.0, 0.001, 0.001)
    """
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable k -> momentum, got {schedule!r}")
    return _Delayed(schedule, _check_int("start", start, 0))


def _callback_schedule(
    momentum: object, decay: object, schedule: Schedule | None, copy_first: object, copy_first_default: int
) -> tuple[Schedule, int]:
    """The schedule of a callback that takes ``momentum``, ``decay = 1 - momentum`` or ``schedule`` (one of
    them; none: ``decay=0.999``), delayed by ``copy_first`` updates (None: ``copy_first_default`` without a
    schedule, 0 with one); and that ``copy_first``."""
    given = [n for n, v in (("momentum", momentum), ("decay", decay), ("schedule", schedule)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of momentum, decay or schedule, got {', '.join(given)}")
    if schedule is None:
        if momentum is None:
            momentum = 1.0 - _check_momentum("decay", 0.999 if decay is None else decay)
        schedule = constant(_check_momentum("momentum", momentum))
        copy_first = copy_first_default if copy_first is None else copy_first
    elif not callable(schedule):
        raise TypeError(f"schedule must be a callable k -> momentum, got {schedule!r}")
    copy_first = _check_int("copy_first", 0 if copy_first is None else copy_first, 0)
    return (delayed(schedule, copy_first) if copy_first else schedule), copy_first
