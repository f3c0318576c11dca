"""One-off studies behind documented results; in the source checkout only, not in the wheel.

Each module is run as ``python -m fusion_bench_ace.studies.<name>`` from a checkout and says which
result it produced.
"""
