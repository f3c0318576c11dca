"""The merge methods' math: pure functions on tensors (ACE-Merging, NAN, SyMerge's pieces).

No FusionBench import and no I/O; the engine (:mod:`fusion_bench_ace.engine`) feeds them one
parameter at a time, the adapters (:mod:`fusion_bench_ace.algorithms`) expose them to FusionBench.
"""
