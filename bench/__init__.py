"""corral's benchmarks: ``python -m corral.bench`` (see :mod:`corral.bench.run`).

Every figure is measured against a baseline taken in the same run, so the ratios hold
when the machine's speed drifts; p50/p99 absolute values are for this machine only.
"""
