"""FusionBench adapters (the only modules that import FusionBench)."""
