"""The benchmark's pytest-benchmark suite (``pytest bench_tests --benchmark-only``):
beside the ``bench`` package, not inside what installs as ``lookwhen_bench``."""
