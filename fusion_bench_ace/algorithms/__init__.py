"""FusionBench adapters: the ``BaseAlgorithm`` classes that run the pure math of ``ace.py``,
``nan.py`` and ``symerge.py`` on a model pool.

FusionBench is imported here, and also by the task pools (``taskpools/``), the program
(``program.py``), the embedded benchmark's loaders (``mini/loaders.py``) and the speed benchmark's
TSV-M and memory runs (``bench/``); never by the merge math (``tests/test_imports.py``).
"""
