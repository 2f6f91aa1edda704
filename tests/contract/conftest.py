"""Hypothesis profiles of the contract suite: ``ci`` (the default: deterministic, about a minute on one core)
and ``deep`` (thousands of examples: ``make contract``, or ``POLYAK_CONTRACT=deep``)."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(  # CI: the same examples every run, no database; a failure is reported unshrunk
    # (shrinking a long sequence can take minutes: the deep profile shrinks, and test_found.py holds the minimal
    # reproductions)
    "polyak-contract-ci",
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=_QUIET,
    print_blob=True,
)
settings.register_profile(
    "polyak-contract-deep",
    max_examples=3000,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=_QUIET,
    print_blob=True,
)
settings.register_profile(  # for working on the suite: no shrinking, every distinct failure reported
    "polyak-contract-dev",
    max_examples=60,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=_QUIET,
    phases=[Phase.explicit, Phase.generate, Phase.target],
    report_multiple_bugs=True,
    print_blob=True,
)
