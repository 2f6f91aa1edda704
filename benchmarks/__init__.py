"""Benchmarks of one EMA update: polyak against ignite's ``EMAHandler`` and other EMA libraries.

Run ``python -m benchmarks`` from the repository root, or ``make bench`` (``--help`` lists the flags:
``--quick`` for a smoke run, ``--no-write`` to print only, ``--wait-quiet SECONDS`` on a shared machine,
``--render-only`` to rewrite ``BENCHMARKS.md`` from ``benchmarks/results.json`` without timing). The pieces:

* :mod:`benchmarks.shapes`: the registry of models to average (``SHAPES``);
* :mod:`benchmarks.impls`: the registry of EMA implementations (``IMPLS``), each turning a model into a
  zero-argument callable that performs one update, plus the floors and the "part" rows;
* :mod:`benchmarks.timing`: the adaptive, interleaved timer (median time per call);
* :mod:`benchmarks.targets`: the issue's performance targets, checked against a run;
* :mod:`benchmarks.iteration`: the EMA's share of an ignite training iteration of the demo model;
* :mod:`benchmarks.report`: the console table, ``BENCHMARKS.md`` and ``benchmarks/results.json``.

Adding a shape or an implementation is one decorated function in the matching module.
"""
