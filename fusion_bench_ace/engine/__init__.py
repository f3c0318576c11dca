"""The merge engine: which parameter is merged how, streaming the experts tensor by tensor,
writing the merged checkpoint as it is computed, splitting one merge across processes.

No FusionBench import. ``io/`` reads and writes safetensors checkpoints; ``driver`` walks the
parameters; ``distributed`` assigns them to torchrun ranks; ``selection`` picks names by regex.
"""
