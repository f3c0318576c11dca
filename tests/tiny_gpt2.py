"""A tiny GPT-2 classification pool from random weights, written to a directory (no download).

Mirrors FusionBench's GPT-2 GLUE setup: each expert is a ``GPT2ForSequenceClassification``
checkpoint (backbone + its own ``score`` head), the pool merges the ``GPT2Model`` backbones, and
the task pool re-attaches each task's head. Experts differ from the pretrained weights by
random perturbations of different scales, so ACE's heterogeneous branch is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2ForSequenceClassification

TASKS = {"alpha": 2, "beta": 3, "gamma": 2}
SCALES = {"alpha": 1e-2, "beta": 1e-4, "gamma": 3e-3}
CORPUS = ["the quick brown fox jumps over the lazy dog", "merging models without data"] * 20


def build_tiny_gpt2_pool(root: Path, seed: int = 0) -> Path:
    """Write checkpoints, tokenizer, test sets and ``modelpool``/``taskpool`` configs in ``root``.

    Returns the config directory to pass to ``fusion_bench --config-dir``.
    """
    root = Path(root)
    torch.manual_seed(seed)
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False)
    bpe.save_model(str(tokenizer_dir))

    config = GPT2Config(
        vocab_size=bpe.get_vocab_size(),
        n_positions=32,
        n_embd=24,
        n_layer=2,
        n_head=2,
        pad_token_id=0,
    )
    pretrained = GPT2ForSequenceClassification(config).eval()
    pretrained.save_pretrained(root / "pretrained")
    for task, num_labels in TASKS.items():
        settings = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        expert = GPT2ForSequenceClassification(GPT2Config(**settings, num_labels=num_labels)).eval()
        state = {
            k: v + SCALES[task] * torch.randn_like(v) if k.startswith("transformer.") else v
            for k, v in pretrained.state_dict().items()
            if k in expert.state_dict() and expert.state_dict()[k].shape == v.shape
        }
        expert.load_state_dict(state, strict=False)
        expert.save_pretrained(root / task)

        rows = 12
        Dataset.from_dict(
            {
                "input_ids": torch.randint(1, config.vocab_size, (rows, 8)).tolist(),
                "attention_mask": [[1] * 8] * rows,
                "labels": torch.randint(0, num_labels, (rows,)).tolist(),
            }
        ).save_to_disk(str(root / "data" / task))

    config_dir = root / "config"
    (config_dir / "modelpool").mkdir(parents=True)
    (config_dir / "taskpool").mkdir(parents=True)
    loader = "transformers.GPT2Model.from_pretrained"
    models = {"_pretrained_": str(root / "pretrained"), **{t: str(root / t) for t in TASKS}}
    tokenizer = {
        "_target_": "fusion_bench.modelpool.huggingface_gpt2_classification.load_gpt2_tokenizer",
        "pretrained_model_name_or_path": str(tokenizer_dir),
    }
    modelpool = {
        "_target_": "fusion_bench.modelpool.GPT2ForSequenceClassificationPool",
        "models": {
            name: {"_target_": loader, "pretrained_model_name_or_path": path}
            for name, path in models.items()
        },
        "tokenizer": tokenizer,
    }
    taskpool = {
        "_target_": "fusion_bench.taskpool.GPT2TextClassificationTaskPool",
        "test_datasets": {
            t: {"_target_": "datasets.load_from_disk", "dataset_path": str(root / "data" / t)}
            for t in TASKS
        },
        "tokenizer": tokenizer,
        "dataloader_kwargs": {"batch_size": 4, "num_workers": 0},
        "fast_dev_run": False,
    }
    # JSON is valid YAML
    (config_dir / "modelpool" / "tiny_gpt2_test.yaml").write_text(json.dumps(modelpool, indent=1))
    (config_dir / "taskpool" / "tiny_gpt2_test.yaml").write_text(json.dumps(taskpool, indent=1))
    return config_dir
