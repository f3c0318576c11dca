"""Reading experts' safetensors checkpoints tensor by tensor (``reader``) and writing sharded
Hugging Face checkpoints tensor by tensor (``writer``)."""
