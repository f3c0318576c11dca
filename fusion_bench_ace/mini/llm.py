"""The LLM track of the embedded benchmark: a small Llama and three instruction-tuned experts.

``build(out_dir, settings, progress)`` writes, with no download and deterministically for a seed
(every number from ``config/mini/llm.yaml``):

- ``tokenizer/``: a word-level tokenizer (digits split one by one) trained on the generated text,
  saved as a ``PreTrainedTokenizerFast`` (``AutoTokenizer`` loads it);
- ``pretrained/``: a small ``LlamaForCausalLM`` pretrained on the corpus of
  :mod:`fusion_bench_ace.mini.llm_tasks` (English and two synthetic languages, equations, code):
  the stand-in for a base model such as Llama-3.2-3B;
- ``experts/<expert>/``: ``multilingual``, ``math`` and ``coding``, each the pretrained model
  fine-tuned whole (loss on the answers only; AdamW, weight decay, gradient clipping) on the
  training split of its tasks, as ACE Table 8's MergeBench experts;
- ``data/<task>/{train,validation,test}/``: ``datasets`` with ``prompt`` and ``answer`` columns
  (``save_to_disk``), plus ``.jsonl`` copies to read;
- ``tasks.json``: each task's description and expert.

The manifest's metrics: exact match (greedy generation, :mod:`fusion_bench_ace.taskpools.
generation`) of the pretrained model, each expert and their simple average on every test split.
The task vectors' statistics are ``python -m fusion_bench_ace.mini stats --track llm``'s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..taskpools.generation import encode_prompt, greedy_exact_match
from .determinism import deterministic_torch, stage_seed
from .llm_tasks import EXPERTS, TASKS, Example, make_splits, pretraining_corpus
from .training import Batch, quiet_datasets, train, trim_padding

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>"}
SPLITS = ("train", "validation", "test")
IGNORE = -100  # label of prompt and padding positions: no loss there


def say(message: str) -> None:
    tqdm.write(f"[fusion_bench_ace.mini llm] {message}")


def build(out_dir: Path, settings: dict, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    seed = settings["seed"]
    with deterministic_torch(settings["num_threads"]):
        say(f"generating {len(TASKS)} tasks and a pretraining corpus (seed {seed})")
        sizes = {split: settings[f"{split}_size"] for split in SPLITS}
        splits = {name: make_splits(task, seed, sizes) for name, task in TASKS.items()}
        prompts = {e.prompt for task_splits in splits.values() for examples in
                   task_splits.values() for e in examples}
        corpus = pretraining_corpus(seed, settings["pretrain_documents"],
                                    settings["pretrain_task_shares"], exclude=prompts)
        texts = corpus + [f"{e.prompt} {e.answer}" for s in splits.values() for e in s["train"]]
        tokenizer = train_tokenizer(texts, out_dir / "tokenizer")
        for name, task_splits in splits.items():
            save_task_data(out_dir / "data" / name, task_splits)

        config = model_config(settings, tokenizer)
        pretrained = pretrain(config, tokenizer, corpus, settings, progress)
        pretrained.save_pretrained(out_dir / "pretrained")
        tokenizer.save_pretrained(str(out_dir / "pretrained"))

        experts = {}
        for expert, tasks in EXPERTS.items():
            examples = [e for t in tasks for e in splits[t]["train"]]
            experts[expert] = finetune(expert, pretrained, examples, tokenizer, settings,
                                       progress)
            experts[expert].save_pretrained(out_dir / "experts" / expert)
            tokenizer.save_pretrained(str(out_dir / "experts" / expert))

        metrics = measure(pretrained, experts, tokenizer, splits, settings)
    write_task_descriptions(out_dir / "tasks.json", splits)
    say("exact match: " + json.dumps(metrics["summary"]))
    return {
        "tasks": list(TASKS),
        "experts": EXPERTS,
        "num_parameters": sum(p.numel() for p in pretrained.parameters()),
        "metrics": metrics,
    }


# --------------------------------------------------------------------------------------------
# tokenizer and data
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], directory: Path) -> PreTrainedTokenizerFast:
    """A word-level vocabulary of ``texts`` (every word of the generated world, each digit)."""
    say("training a word-level tokenizer")
    core = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    core.train_from_iterator(texts, trainers.WordLevelTrainer(
        special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    directory.mkdir(parents=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def save_task_data(directory: Path, splits: Dict[str, List[Example]]) -> None:
    for split, examples in splits.items():
        columns = {"prompt": [e.prompt for e in examples], "answer": [e.answer for e in examples]}
        with quiet_datasets():
            Dataset.from_dict(columns).save_to_disk(str(directory / split))
        with open(directory / f"{split}.jsonl", "w") as handle:
            for example in examples:
                handle.write(json.dumps({"prompt": example.prompt, "answer": example.answer})
                             + "\n")


def write_task_descriptions(path: Path, splits: Dict[str, Dict[str, list]]) -> None:
    described = {
        name: {"expert": task.expert, "description": task.description,
               **{f"{split}_size": len(splits[name][split]) for split in SPLITS}}
        for name, task in TASKS.items()
    }
    path.write_text(json.dumps(described, indent=1))


def pack_corpus(tokenizer, corpus: Sequence[str], block: int) -> Tensor:
    """The corpus as one token stream (each document ``<s> ... </s>``) cut into ``block``-token
    rows (the incomplete last row is dropped)."""
    stream: List[int] = []
    for ids in tokenizer(list(corpus), add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    rows = len(stream) // block
    return torch.tensor(stream[: rows * block]).view(rows, block)


def encode_instructions(tokenizer, examples: Sequence[Example], max_length: int) -> Batch:
    """``<s> prompt answer </s>``, right-padded; labels only on ``answer </s>``."""
    rows = []
    for example in examples:
        prompt = encode_prompt(tokenizer, example.prompt)
        answer = [*tokenizer.encode(example.answer, add_special_tokens=False),
                  tokenizer.eos_token_id]
        rows.append((prompt, answer))
    longest = max(len(p) + len(a) for p, a in rows)
    if longest > max_length:
        raise ValueError(f"an example has {longest} tokens: raise max_position_embeddings")
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE)
    for i, (prompt, answer) in enumerate(rows):
        ids = prompt + answer
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, len(prompt):len(ids)] = torch.tensor(answer)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------
# models and training
# --------------------------------------------------------------------------------------------


def model_config(settings: dict, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        num_key_value_heads=settings["num_key_value_heads"],
        max_position_embeddings=settings["max_position_embeddings"],
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def pretrain(config: LlamaConfig, tokenizer, corpus: Sequence[str], settings: dict,
             progress: bool) -> LlamaForCausalLM:
    blocks = pack_corpus(tokenizer, corpus, settings["seq_len"])
    torch.manual_seed(stage_seed(settings["seed"], "pretrain/init"))
    model = LlamaForCausalLM(config)
    say(f"pretraining a Llama ({sum(p.numel() for p in model.parameters()):,} parameters) as a "
        f"causal LM on {blocks.numel():,} tokens")

    def next_token_loss(model, batch: Batch) -> Tensor:
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids).loss

    train(model, {"input_ids": blocks}, next_token_loss, steps=settings["pretrain_steps"],
          batch_size=settings["pretrain_batch_size"], lr=settings["pretrain_lr"],
          settings={**settings, "weight_decay": settings["pretrain_weight_decay"]},
          stage="pretrain", progress=progress, log=say)
    return model


def finetune(expert: str, pretrained: LlamaForCausalLM, examples: Sequence[Example], tokenizer,
             settings: dict, progress: bool) -> LlamaForCausalLM:
    """The whole model fine-tuned on ``examples`` (loss on the answers)."""
    model = LlamaForCausalLM(pretrained.config)
    model.load_state_dict(pretrained.state_dict())
    data = encode_instructions(tokenizer, examples, settings["max_position_embeddings"])

    def answer_loss(model, batch: Batch) -> Tensor:
        batch = trim_padding(batch)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    train(model, data, answer_loss, steps=settings["finetune_steps"],
          batch_size=settings["finetune_batch_size"], lr=settings["finetune_lr"],
          settings=settings, stage=f"finetune {expert}", progress=progress, log=say)
    return model


# --------------------------------------------------------------------------------------------
# build-time measurements
# --------------------------------------------------------------------------------------------


def exact_match(model, tokenizer, examples: Sequence[Example], settings: dict) -> float:
    return greedy_exact_match(
        model, tokenizer, [e.prompt for e in examples], [e.answer for e in examples],
        max_new_tokens=settings["max_new_tokens"], batch_size=settings["eval_batch_size"],
    )["accuracy"]


def measure(pretrained: LlamaForCausalLM, experts: Dict[str, LlamaForCausalLM], tokenizer,
            splits: Dict[str, Dict[str, List[Example]]], settings: dict) -> dict:
    say("measuring pretrained, experts and their simple average on every test split")
    average = LlamaForCausalLM(pretrained.config)
    states = [e.state_dict() for e in experts.values()]
    average.load_state_dict({k: torch.stack([s[k] for s in states]).mean(dim=0)
                             for k in states[0]})
    models = {"pretrained": pretrained, **{f"expert/{n}": m for n, m in experts.items()},
              "simple_average": average}
    table = {row: {task: exact_match(model, tokenizer, splits[task]["test"], settings)
                   for task in TASKS}
             for row, model in models.items()}
    own = {task: table[f"expert/{TASKS[task].expert}"][task] for task in TASKS}
    summary = {
        "pretrained": _mean(table["pretrained"].values()),
        "expert (own tasks)": _mean(own.values()),
        "simple_average": _mean(table["simple_average"].values()),
        "expert gain min (points)": 100 * min(own[t] - table["pretrained"][t] for t in TASKS),
    }
    return {"exact_match": table, "expert_on_own_task": own,
            "summary": {k: round(v, 4) for k, v in summary.items()}}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------
# regime statistics (python -m fusion_bench_ace.mini stats --track llm)
# --------------------------------------------------------------------------------------------


def load_for_stats(directory: Path):
    """The built track as :class:`fusion_bench_ace.mini.stats.TrackModels`: one "task" per
    expert (its tasks' mean exact match on their test splits), the whole model merged."""
    import datasets

    from .stats import TrackModels

    directory = Path(directory)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer")
    model = LlamaForCausalLM.from_pretrained(directory / "pretrained").eval()
    pretrained = {k: v.float().clone() for k, v in model.state_dict().items()}
    experts = {n: {k: v.float() for k, v in LlamaForCausalLM.from_pretrained(
        directory / "experts" / n).state_dict().items()} for n in EXPERTS}
    tests = {t: datasets.load_from_disk(str(directory / "data" / t / "test")) for t in TASKS}
    settings = json.loads((directory / "manifest.json").read_text())["settings"]

    def evaluate(state, expert):
        model.load_state_dict(state)
        return _mean(greedy_exact_match(
            model, tokenizer, tests[t]["prompt"], tests[t]["answer"],
            max_new_tokens=settings["max_new_tokens"], batch_size=settings["eval_batch_size"],
        )["accuracy"] for t in EXPERTS[expert])

    def block_of(name: str) -> str:
        match = re.search(r"layers\.(\d+)\.", name)
        return f"layer {match.group(1)}" if match else "embeddings, head and final norm"

    return TrackModels(
        tasks=list(EXPERTS), pretrained=pretrained, experts=experts, evaluate=evaluate,
        chance={n: 0.0 for n in EXPERTS}, block_of=block_of,
    )
