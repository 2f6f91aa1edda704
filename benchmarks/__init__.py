"""Benchmarks of one EMA update: polyak against ignite's ``EMAHandler`` and other EMA libraries.

Run ``python -m benchmarks`` from the repository root (``--help`` lists the flags). The pieces:

* :mod:`benchmarks.shapes`: the registry of models to average (``SHAPES``);
* :mod:`benchmarks.impls`: the registry of EMA implementations (``IMPLS``), each turning a model into a
  zero-argument callable that performs one update;
* :mod:`benchmarks.timing`: the adaptive timer (median time per call);
* :mod:`benchmarks.report`: the console table, ``BENCHMARKS.md`` and ``benchmarks/results.json``.

Adding a shape or an implementation is one decorated function in the matching module.
"""
