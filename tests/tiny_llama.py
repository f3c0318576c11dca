"""A tiny Llama causal-LM pool from random weights, written as checkpoints (no download).

The layout FusionBench's ``CausalLMPool`` reads: one ``save_pretrained`` directory per model (the
pretrained one with a locally trained tokenizer), and a pool config naming them by path with
``model_kwargs.torch_dtype``. Experts differ from the pretrained weights by random perturbations
of different scales (both ACE branches occur).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EXPERTS = {"multilingual": 1e-2, "math": 1e-3, "coding": 3e-3}
CORPUS = ["def add ( a , b ) : return a + b", "tom has 3 apples and 4 pears",
          "la casa es grande"] * 10


def tiny_config(vocab_size: int = 64, tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def save_tokenizer(directory: Path) -> None:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>", unk_token="<unk>").save_pretrained(str(directory))


def build_tiny_llama_pool(
    root: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    tie: bool = False,
    seed: int = 0,
    expert_vocab: Optional[Dict[str, int]] = None,
    max_shard_size: str = "20KB",
) -> dict:
    """Write ``pretrained/`` and one directory per expert under ``root`` (sharded by
    ``max_shard_size``); returns a ``CausalLMPool`` config (a plain dict).

    ``expert_vocab``: experts whose embedding and head get that many rows instead (an expert
    with added tokens).
    """
    root = Path(root)
    torch.manual_seed(seed)
    pretrained = LlamaForCausalLM(tiny_config(tie=tie)).to(dtype).eval()
    pretrained.save_pretrained(root / "pretrained", max_shard_size=max_shard_size)
    save_tokenizer(root / "pretrained")
    generator = torch.Generator().manual_seed(seed + 1)
    for name, scale in EXPERTS.items():
        rows = (expert_vocab or {}).get(name)
        expert = LlamaForCausalLM(tiny_config(vocab_size=rows or 64, tie=tie)).to(dtype).eval()
        state = expert.state_dict()
        with torch.no_grad():
            for key, value in pretrained.state_dict().items():
                noise = scale * torch.randn(value.shape, generator=generator)
                if state[key].shape == value.shape:
                    state[key].copy_(value.float() + noise)
                else:  # added tokens: the pretrained rows, then new ones
                    state[key][: value.shape[0]].copy_(value.float() + noise)
        expert.save_pretrained(root / name, max_shard_size=max_shard_size)
    return {
        "_target_": "fusion_bench.modelpool.CausalLMPool",
        "models": {"_pretrained_": str(root / "pretrained"),
                   **{name: str(root / name) for name in EXPERTS}},
        "model_kwargs": {"torch_dtype": str(dtype).replace("torch.", "")},
        "tokenizer": str(root / "pretrained"),
    }
