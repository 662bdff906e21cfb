"""Benchmarks for lookwhen-kernels: ``python -m bench {ops,e2e,roofline,inspect}``."""


class BenchError(ValueError):
    """A bad argument or an impossible request: reported as one line, exit 2."""
