"""``python -m fusion_bench_ace.bench``: see :mod:`fusion_bench_ace.bench.cli`."""

from .cli import main

main()
