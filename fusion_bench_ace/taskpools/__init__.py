"""Task pools and dataset loaders for the paper-scale benchmarks (``config/taskpool/ace_paper/``).

- :mod:`.data`: dataset loaders that accept a hub id or a local copy (``${ace_hf:...}``).
- :mod:`.glue`: GLUE with each task's own classification head (RoBERTa; also GPT-2's data).

Submodules are imported on use (they import FusionBench and transformers).
"""
