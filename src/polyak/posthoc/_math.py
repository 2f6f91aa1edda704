"""The mathematics of post-hoc EMA (EDM2): inner products of power-function profiles, and the weights of the
snapshots that reconstruct a profile, in float64."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


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
