"""The GPT-2 track of the embedded benchmark: a small GLUE-like classification pool from nothing.

``build(out_dir, settings, progress)`` writes, with no download and deterministically for a seed:

- ``tokenizer/``: a byte-level BPE (``vocab.json`` + ``merges.txt``) trained on the generated text,
  loadable by ``transformers.GPT2Tokenizer`` and FusionBench's ``load_gpt2_tokenizer``;
- ``pretrained/``: a small GPT-2 pretrained as a causal LM on a generated corpus that covers the
  vocabulary of every task (the stand-in for ``gpt2``);
- ``experts/<task>/``: one ``GPT2ForSequenceClassification`` per task of ``text_tasks.TASKS``,
  its whole backbone fine-tuned from ``pretrained/`` under a ``score`` head that stays at its
  seeded random initialisation unless ``train_score_head`` (the stand-ins for
  ``tanganke/gpt2_<glue task>``);
- ``data/<task>/{train,test,validation}/``: ``datasets`` saved with ``save_to_disk``
  (``input_ids``, ``attention_mask``, ``labels``; right-padded to a fixed length), plus the texts
  as ``<split>.jsonl`` for people to read; validation examples are in neither train nor test (they
  tune merging hyper-parameters, e.g. Task Arithmetic's lambda);
- ``tasks.json``: what each task is.

FusionBench's GPT-2 pool merges the ``GPT2Model`` backbones and its task pool re-attaches each
task's own ``score`` head, so the accuracies measured here at build time follow that protocol: the
"pretrained" row is the pretrained backbone under each expert's head. Every number comes from
``settings`` (``config/mini/gpt2.yaml``).
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import datasets
import torch
from datasets import Dataset
from tokenizers import ByteLevelBPETokenizer
from torch import Tensor
from tqdm.auto import tqdm
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2Tokenizer,
)

from .determinism import deterministic_torch, stage_seed
from .text_tasks import TASKS, Example, TextTask, make_splits, pretraining_corpus
from .training import Batch, quiet_datasets, train, trim_padding

END_OF_TEXT = "<|endoftext|>"
"""GPT-2's only special token: document separator in pretraining and, as FusionBench's
``load_gpt2_tokenizer`` makes the unknown token the pad token, the padding of every example."""


def say(message: str) -> None:
    tqdm.write(f"[fusion_bench_ace.mini gpt2] {message}")


def build(out_dir: Path, settings: dict, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    seed = settings["seed"]
    with deterministic_torch(settings["num_threads"]):
        say(f"generating {len(TASKS)} tasks and a pretraining corpus (seed {seed})")
        splits = {
            name: make_splits(task, seed, settings["train_size"], settings["test_size"],
                              settings["validation_size"])
            for name, task in TASKS.items()
        }
        corpus = pretraining_corpus(seed, settings["pretrain_documents"])
        training_texts = [e.text for train, _, _ in splits.values() for e in train]
        tokenizer = train_tokenizer(corpus + training_texts, out_dir / "tokenizer", settings)

        encoded = {}
        for name, (train, test, validation) in splits.items():
            texts = {"train": train, "test": test, "validation": validation}
            encoded[name] = {split: encode_examples(tokenizer, examples, settings["seq_len"])
                             for split, examples in texts.items()}
            save_task_data(out_dir / "data" / name, encoded[name], texts)

        config = model_config(settings, len(tokenizer), tokenizer.pad_token_id)
        language_model = pretrain(config, tokenizer, corpus, settings, progress)
        language_model.save_pretrained(out_dir / "pretrained")

        experts = {}
        for name, task in TASKS.items():
            experts[name] = finetune(task, language_model.transformer, encoded[name]["train"],
                                     config, settings, progress)
            experts[name].save_pretrained(out_dir / "experts" / name)

        metrics = measure(language_model.transformer, experts, encoded, settings)
    write_task_descriptions(out_dir / "tasks.json", splits)
    say("accuracies: " + json.dumps(metrics["summary"]))
    return {
        "tasks": list(TASKS),
        "num_parameters": sum(p.numel() for p in language_model.transformer.parameters()),
        "metrics": metrics,
    }


# --------------------------------------------------------------------------------------------
# tokenizer and data
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], directory: Path, settings: dict) -> GPT2Tokenizer:
    """Train a byte-level BPE on ``texts``, save it as GPT-2 files and load it the way FusionBench
    does (``load_gpt2_tokenizer``: the unknown token, ``<|endoftext|>``, pads)."""
    say(f"training a byte-level BPE tokenizer (vocabulary {settings['vocab_size']})")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=settings["vocab_size"], min_frequency=2,
                            special_tokens=[END_OF_TEXT], show_progress=False)
    directory.mkdir(parents=True)
    bpe.save_model(str(directory))
    tokenizer = GPT2Tokenizer.from_pretrained(str(directory))
    tokenizer.pad_token = tokenizer.unk_token
    assert tokenizer.pad_token == END_OF_TEXT
    return tokenizer


def encode_examples(tokenizer: GPT2Tokenizer, examples: Sequence[Example], seq_len: int) -> Batch:
    """``input_ids``/``attention_mask`` right-padded to ``seq_len``, and ``labels``."""
    encoded = tokenizer([e.text for e in examples], padding="max_length", max_length=seq_len,
                        truncation=False)
    longest = max(sum(mask) for mask in encoded["attention_mask"])
    if longest > seq_len:  # truncating could cut off what decides the label
        raise ValueError(f"an example has {longest} tokens: raise seq_len ({seq_len})")
    return {
        "input_ids": torch.tensor(encoded["input_ids"]),
        "attention_mask": torch.tensor(encoded["attention_mask"]),
        "labels": torch.tensor([e.label for e in examples]),
    }


def save_task_data(directory: Path, encoded: Dict[str, Batch], texts: Dict[str, List[Example]]
                   ) -> None:
    for split, columns in encoded.items():
        with quiet_datasets():
            Dataset.from_dict({k: v.tolist() for k, v in columns.items()}).save_to_disk(
                str(directory / split))
        with open(directory / f"{split}.jsonl", "w") as handle:
            for example in texts[split]:
                handle.write(json.dumps({"text": example.text, "label": example.label}) + "\n")



def write_task_descriptions(path: Path, splits: Dict[str, Tuple[list, list, list]]) -> None:
    described = {
        name: {"glue_task": task.glue_task, "description": task.description,
               "label_names": list(task.label_names), "train_size": len(splits[name][0]),
               "test_size": len(splits[name][1]), "validation_size": len(splits[name][2])}
        for name, task in TASKS.items()
    }
    path.write_text(json.dumps(described, indent=1))


def pack_corpus(tokenizer: GPT2Tokenizer, corpus: Sequence[str], block: int) -> Tensor:
    """The corpus as one token stream, documents separated by ``<|endoftext|>`` as in GPT-2's
    pretraining, cut into ``block``-token rows (the incomplete last row is dropped)."""
    stream: List[int] = []
    for ids in tokenizer(list(corpus))["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    rows = len(stream) // block
    return torch.tensor(stream[: rows * block]).view(rows, block)


# --------------------------------------------------------------------------------------------
# models and training
# --------------------------------------------------------------------------------------------


def model_config(settings: dict, vocab_size: int, pad_token_id: int) -> GPT2Config:
    if settings["seq_len"] > settings["n_positions"]:
        raise ValueError("seq_len must not exceed n_positions")
    dropout = settings["dropout"]
    return GPT2Config(
        vocab_size=vocab_size, n_positions=settings["n_positions"], n_embd=settings["n_embd"],
        n_layer=settings["n_layer"], n_head=settings["n_head"], resid_pdrop=dropout,
        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=pad_token_id,
        eos_token_id=pad_token_id, pad_token_id=pad_token_id,
    )


def pretrain(config: GPT2Config, tokenizer: GPT2Tokenizer, corpus: Sequence[str], settings: dict,
             progress: bool) -> GPT2LMHeadModel:
    blocks = pack_corpus(tokenizer, corpus, settings["seq_len"])
    torch.manual_seed(stage_seed(settings["seed"], "pretrain/init"))
    model = GPT2LMHeadModel(config)
    say(f"pretraining a GPT-2 ({sum(p.numel() for p in model.transformer.parameters()):,} "
        f"backbone parameters) as a causal LM on {blocks.numel():,} tokens")

    def next_token_loss(model, batch: Batch) -> Tensor:
        # packed blocks have no padding; the explicit mask says so (pad and eos are one token)
        ids = batch["input_ids"]
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss

    train(model, {"input_ids": blocks}, next_token_loss, steps=settings["pretrain_steps"],
          batch_size=settings["pretrain_batch_size"], lr=settings["pretrain_lr"],
          settings=settings, stage="pretrain", progress=progress, log=say)
    return model


def finetune(task: TextTask, backbone: GPT2Model, data: Batch, config: GPT2Config, settings: dict,
             progress: bool) -> GPT2ForSequenceClassification:
    """Fine-tune the whole backbone under a fresh ``score`` head (trained too if
    ``train_score_head``)."""
    torch.manual_seed(stage_seed(settings["seed"], f"finetune/{task.name}/init"))
    expert_config = GPT2Config(**{
        **config.to_dict(), "num_labels": task.num_labels,
        "id2label": dict(enumerate(task.label_names)),
        "label2id": {label: i for i, label in enumerate(task.label_names)},
    })
    model = GPT2ForSequenceClassification(expert_config)
    model.transformer.load_state_dict(backbone.state_dict())
    # A fixed random head puts what the expert learns into the backbone, the part FusionBench
    # merges; a trained head would also learn to read features the pretrained model already
    # has, so the pretrained row (pretrained backbone under this head) would not be a baseline.
    model.score.requires_grad_(settings["train_score_head"])

    def classification_loss(model, batch: Batch) -> Tensor:
        batch = trim_padding(batch)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    train(model, data, classification_loss, steps=settings["finetune_steps"],
          batch_size=settings["finetune_batch_size"], lr=settings["finetune_lr"],
          settings=settings, stage=f"finetune {task.name}", progress=progress, log=say)
    return model






# --------------------------------------------------------------------------------------------
# build-time measurements (FusionBench's protocol: backbone under each task's own head)
# --------------------------------------------------------------------------------------------


def measure(pretrained: GPT2Model, experts: Dict[str, GPT2ForSequenceClassification],
            encoded: Dict[str, Dict[str, Batch]], settings: dict) -> dict:
    say("measuring pretrained, experts and their simple average on every test set")
    average = simple_average([expert.transformer for expert in experts.values()])
    backbones = {"pretrained": pretrained, "simple_average": average}
    rows: Dict[str, Dict[str, float]] = {"pretrained": {}, "expert": {}, "simple_average": {}}
    for name, expert in experts.items():
        test = encoded[name]["test"]
        batch_size = settings["eval_batch_size"]
        rows["expert"][name] = accuracy(expert, test, batch_size)
        for row, backbone in backbones.items():
            rows[row][name] = accuracy(with_backbone(expert, backbone), test, batch_size)
    summary = {row: {**values, "average": sum(values.values()) / len(values)}
               for row, values in rows.items()}
    return {"accuracy": summary, "summary": {row: round(v["average"], 4)
                                            for row, v in summary.items()}}


def simple_average(backbones: Sequence[GPT2Model]) -> GPT2Model:
    merged = deepcopy(backbones[0])
    states = [b.state_dict() for b in backbones]
    merged.load_state_dict({k: torch.stack([s[k] for s in states]).mean(dim=0)
                            for k in states[0]})
    return merged


def with_backbone(classifier: GPT2ForSequenceClassification, backbone: GPT2Model
                  ) -> GPT2ForSequenceClassification:
    """``classifier``'s head on ``backbone``, as FusionBench's ``get_classifier`` does."""
    combined = deepcopy(classifier)
    combined.transformer = deepcopy(backbone)
    return combined.eval()


@torch.no_grad()
def accuracy(classifier: GPT2ForSequenceClassification, data: Batch, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(data["labels"]), batch_size):
        batch = trim_padding({k: v[start: start + batch_size] for k, v in data.items()})
        logits = classifier(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return correct / len(data["labels"])


# --------------------------------------------------------------------------------------------
# regime statistics
# --------------------------------------------------------------------------------------------


def load_for_stats(directory: Path):
    """The built track as :class:`fusion_bench_ace.mini.stats.TrackModels`: GPT-2 backbones,
    each evaluated under its task's own ``score`` head (FusionBench's GPT-2 protocol)."""
    import re

    from .stats import TrackModels

    directory = Path(directory)
    described = json.loads((directory / "tasks.json").read_text())
    pretrained = GPT2Model.from_pretrained(directory / "pretrained")
    experts = {t: GPT2ForSequenceClassification.from_pretrained(directory / "experts" / t).eval()
               for t in described}
    tests = {}
    for task in described:
        data = datasets.load_from_disk(str(directory / "data" / task / "test"))
        tests[task] = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}

    def evaluate(state, task):
        classifier = experts[task]
        saved = {k: v.clone() for k, v in classifier.transformer.state_dict().items()}
        classifier.transformer.load_state_dict(state)
        try:
            return accuracy(classifier, tests[task], batch_size=200)
        finally:
            classifier.transformer.load_state_dict(saved)

    def block_of(name: str) -> str:
        match = re.search(r"h\.(\d+)\.", name)
        return f"layer {match.group(1)}" if match else "embeddings and norms"

    return TrackModels(
        tasks=list(described),
        pretrained={k: v.float().clone() for k, v in pretrained.state_dict().items()},
        experts={t: {k: v.float().clone() for k, v in e.transformer.state_dict().items()}
                 for t, e in experts.items()},
        evaluate=evaluate,
        chance={t: 1 / len(d["label_names"]) for t, d in described.items()},
        block_of=block_of,
    )
