"""Experiments rather than measurements: ``python -m bench train`` (the
selector learns on synthetic clips; training throughput) and ``python -m
bench seeds`` (the seed methods' selections on synthetic clips). They use
the measuring tools of the package above."""
