"""Build the embedded CLIP track: a small CLIP, pretrained on a captioned mix, 8 task experts.

Mirrors the task-arithmetic protocol of the paper's vision tables: a CLIP model is pretrained
contrastively on a broad captioned mixture; each expert fine-tunes the *vision tower only* against
the frozen zero-shot head of its task (class-name prompts through the frozen text tower and
projection). The outputs load with FusionBench's ``CLIPVisionModelPool`` and
``CLIPVisionModelTaskPool`` from local paths:

- ``clip/``: the full ``CLIPModel`` and its ``CLIPProcessor`` (tokenizer built here);
- ``pretrained/`` and ``experts/<task>/``: ``CLIPVisionModel`` checkpoints;
- ``data/<task>/``: test sets (``datasets`` on disk, ``image`` + ``label``);
- ``tasks.json``: class names and prompt templates per task.

All numbers come from ``config/mini/clip.yaml``. Deterministic given the seed. No FusionBench
import: the loaders FusionBench calls are in :mod:`fusion_bench_ace.mini.loaders`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import Counter
from copy import deepcopy
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .determinism import deterministic_torch, stage_seed
from .vision_tasks import DigitSource, draw_captioned, draw_split, vision_tasks

TASK_ORDER = (
    "shapes", "colors", "position", "sizes", "counting", "orientation", "textures", "digits",
)
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


# --- tokenizer ------------------------------------------------------------------------------------


def train_bpe(texts: List[str], vocab_size: int) -> Tuple[Dict[str, int], List[str]]:
    """Classic BPE training (Sennrich et al.) with a deterministic tie-break.

    Words carry CLIP's word-final ``</w>`` suffix. Each round merges the most frequent adjacent
    pair (ties broken by the pair itself, so the result never depends on hashing or threads) until
    the vocabulary reaches ``vocab_size`` or every word is one symbol. Base symbols are all
    printable ASCII characters, alone and word-final, so no text maps to unknown.
    """
    words: Counter = Counter()
    for text in texts:
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
            words[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
    printable = [chr(c) for c in range(33, 127)]
    vocab = {symbol: i for i, symbol in enumerate(printable + [c + "</w>" for c in printable])}
    merges: List[str] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(f"{best[0]} {best[1]}")
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def _merge_pair(word: Tuple[str, ...], pair: Tuple[str, str]) -> Tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def make_clip_tokenizer(texts: List[str], work_dir: Path, vocab_size: int):
    """A ``CLIPTokenizerFast`` over :func:`train_bpe`'s vocabulary and merges."""
    from transformers import CLIPTokenizerFast

    vocab, merges = train_bpe(texts, vocab_size)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "vocab.json").write_text(json.dumps(vocab))
    (work_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizerFast(
        vocab_file=str(work_dir / "vocab.json"), merges_file=str(work_dir / "merges.txt")
    )


# --- tensors --------------------------------------------------------------------------------------


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), as the saved CLIPImageProcessor does."""
    x = torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _tokenize(tokenizer, texts: List[str], max_length: int) -> Dict[str, torch.Tensor]:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")


def _cosine_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


# --- model ----------------------------------------------------------------------------------------


def make_clip(settings: dict, vocab_size: int, eos_token_id: int, bos_token_id: int):
    from transformers import CLIPConfig, CLIPModel

    v, t = settings["vision"], settings["text"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=t["hidden_size"],
            intermediate_size=4 * t["hidden_size"], num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"], max_position_embeddings=t["max_length"],
            eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=eos_token_id,
        ),
        vision_config=dict(
            image_size=settings["image_size"], patch_size=v["patch_size"],
            hidden_size=v["hidden_size"], intermediate_size=4 * v["hidden_size"],
            num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
        ),
        projection_dim=settings["projection_dim"],
    )
    return CLIPModel(config)


def image_features(vision_model, visual_projection, pixels: torch.Tensor) -> torch.Tensor:
    pooled = vision_model(pixel_values=pixels).pooler_output
    return F.normalize(visual_projection(pooled), dim=-1)


def text_features(model, tokens: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Projected, normalised text embeddings (EOS-pooled), as FusionBench's classifier computes."""
    pooled = model.text_model(**tokens).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


@torch.no_grad()
def zero_shot_head(model, tokenizer, classnames, templates, max_length: int) -> torch.Tensor:
    """Class embeddings as FusionBench's HFCLIPClassifier builds them (mean over templates)."""
    rows = []
    for name in classnames:
        tokens = _tokenize(tokenizer, [t.format(name) for t in templates], max_length)
        embeds = text_features(model, tokens)
        rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(rows)


# --- training -------------------------------------------------------------------------------------


def pretrain(model, tokenizer, digits: DigitSource, settings: dict, progress: bool) -> List[float]:
    """Contrastive pretraining on the captioned mix; identical captions count as positives."""
    p, size = settings["pretrain"], settings["image_size"]
    rng = np.random.default_rng([settings["seed"], 99])
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    losses = []
    bar = tqdm(range(p["steps"]), desc="pretraining CLIP", disable=not progress)
    model.train()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = p["lr"] * _cosine_schedule(step, p["steps"], p["warmup"])
        batch = [draw_captioned(rng, size, digits, p["mix"]) for _ in range(p["batch_size"])]
        pixels = to_pixels(np.stack([b[0] for b in batch]))
        captions = [b[1] for b in batch]
        tokens = _tokenize(tokenizer, captions, settings["text"]["max_length"])
        img = image_features(model.vision_model, model.visual_projection, pixels)
        txt = text_features(model, tokens)
        logits = model.logit_scale.exp() * img @ txt.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


def finetune_expert(vision_model, projection, head, logit_scale, data, settings, task, progress):
    """Fine-tune a copy of the vision tower against the frozen zero-shot head of ``task``.

    The task-arithmetic recipe: AdamW with weight decay, warm-up then cosine decay, gradient
    norm clipped, a few hundred small batches.
    """
    f = settings["finetune"]
    images, labels = data
    expert = deepcopy(vision_model).train()
    optimizer = torch.optim.AdamW(expert.parameters(), lr=f["lr"], weight_decay=f["weight_decay"])
    generator = torch.Generator().manual_seed(settings["seed"] * 1000 + TASK_ORDER.index(task))
    pixels = to_pixels(images)
    targets = torch.from_numpy(labels)
    bar = tqdm(range(f["steps"]), desc=f"fine-tuning {task}", disable=not progress)
    losses = []
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = f["lr"] * _cosine_schedule(step, f["steps"], f["warmup"])
        index = torch.randint(len(targets), (f["batch_size"],), generator=generator)
        logits = logit_scale * image_features(expert, projection, pixels[index]) @ head.T
        loss = F.cross_entropy(logits, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expert.parameters(), f["max_grad_norm"])
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return expert.eval()


@torch.no_grad()
def accuracy(vision_model, projection, head, logit_scale, data, batch_size=512) -> float:
    images, labels = data
    correct = 0
    for start in range(0, len(labels), batch_size):
        pixels = to_pixels(images[start:start + batch_size])
        logits = logit_scale * image_features(vision_model, projection, pixels) @ head.T
        correct += int((logits.argmax(dim=1).numpy() == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def average_of(models) -> torch.nn.Module:
    merged = deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return merged


# --- the build ------------------------------------------------------------------------------------


SPLITS = ("train", "validation", "test")
"""Drawn per task: ``train`` fine-tunes the expert; ``validation`` (for choosing hyper-parameters
such as Task Arithmetic's λ) and ``test`` are saved with the track."""


def draw_task_data(settings: dict, digits: DigitSource, progress: bool) -> dict:
    size, seed = settings["image_size"], settings["seed"]
    counts = {split: settings[f"{split}_per_task"] for split in SPLITS}
    return {
        task: {split: draw_split(task, counts[split], size, seed, split, digits)
               for split in SPLITS}
        for task in tqdm(TASK_ORDER, desc="drawing task data", disable=not progress)
    }


def pretrained_clip(settings: dict, digits: DigitSource, progress: bool):
    """A CLIP and its processor, the tokenizer trained on the mix's captions and the prompts."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    size, tasks = settings["image_size"], vision_tasks()
    caption_rng = np.random.default_rng([settings["seed"], 7])
    corpus = [draw_captioned(caption_rng, size, digits, settings["pretrain"]["mix"])[1]
              for _ in range(2000)]
    prompts = [t.format(c) for spec in tasks.values() for c in spec.classnames
               for t in spec.templates]
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_clip_tokenizer(corpus + prompts, Path(scratch),
                                        settings["text"]["vocab_size"])
    image_processor = CLIPImageProcessor(
        do_resize=False, do_center_crop=False, size={"shortest_edge": size},
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_convert_rgb=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(stage_seed(settings["seed"], "pretrain/init"))
    model = make_clip(settings, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    losses = pretrain(model, tokenizer, digits, settings, progress)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, processor, losses


def task_heads(model, tokenizer, settings: dict) -> Dict[str, torch.Tensor]:
    tasks, max_length = vision_tasks(), settings["text"]["max_length"]
    return {t: zero_shot_head(model, tokenizer, tasks[t].classnames, tasks[t].templates, max_length)
            for t in TASK_ORDER}


def vision_tower(model):
    """The pretrained ``CLIPVisionModel`` (the part FusionBench's CLIP pools merge)."""
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    return vision.eval()


def build(out_dir: Path, settings: dict, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    with deterministic_torch(settings["num_threads"]):
        digits = DigitSource(settings["seed"])
        splits = draw_task_data(settings, digits, progress)
        model, processor, pretrain_losses = pretrained_clip(settings, digits, progress)
        model.save_pretrained(out_dir / "clip")
        processor.save_pretrained(out_dir / "clip")
        vision = vision_tower(model)
        vision.save_pretrained(out_dir / "pretrained")

        projection, logit_scale = model.visual_projection, model.logit_scale.exp().item()
        heads = task_heads(model, processor.tokenizer, settings)
        experts = {}
        for task in TASK_ORDER:
            torch.manual_seed(stage_seed(settings["seed"], f"finetune/{task}"))
            experts[task] = finetune_expert(vision, projection, heads[task], logit_scale,
                                            splits[task]["train"], settings, task, progress)
            experts[task].save_pretrained(out_dir / "experts" / task)

        averaged = average_of([experts[t] for t in TASK_ORDER])
        metrics = {name: {} for name in ("pretrained", "expert", "simple_average")}
        for task in TASK_ORDER:
            test = splits[task]["test"]
            metrics["pretrained"][task] = accuracy(vision, projection, heads[task], logit_scale,
                                                   test)
            metrics["expert"][task] = accuracy(experts[task], projection, heads[task], logit_scale,
                                               test)
            metrics["simple_average"][task] = accuracy(averaged, projection, heads[task],
                                                       logit_scale, test)
    for row in metrics.values():
        row["average"] = float(np.mean([row[t] for t in TASK_ORDER]))

    _save_task_sets(out_dir, splits)
    tasks = vision_tasks()
    (out_dir / "tasks.json").write_text(json.dumps(
        {t: {"classnames": list(tasks[t].classnames), "templates": list(tasks[t].templates)}
         for t in TASK_ORDER}, indent=1))
    if progress:
        print(_metrics_table(metrics))
    return {
        "tasks": list(TASK_ORDER),
        "metrics": metrics,
        "pretrain_final_loss": float(np.mean(pretrain_losses[-50:])),
        "vision_parameters": sum(p.numel() for p in vision.parameters()),
    }


def _save_task_sets(out_dir: Path, splits) -> None:
    """``data/<task>`` (the test split, what the task pool evaluates) and
    ``validation/<task>``, as ``datasets`` on disk with ``image`` and ``label`` columns."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    tasks = vision_tasks()
    for task in TASK_ORDER:
        features = Features({"image": ImageFeature(),
                             "label": ClassLabel(names=list(tasks[task].classnames))})
        for split, directory in (("test", "data"), ("validation", "validation")):
            images, labels = splits[task][split]
            Dataset.from_dict(
                {"image": [Image.fromarray(im) for im in images], "label": labels.tolist()},
                features=features,
            ).save_to_disk(str(out_dir / directory / task))


def _metrics_table(metrics: Dict[str, Dict[str, float]]) -> str:
    header = "| model | " + " | ".join(TASK_ORDER) + " | avg |"
    lines = [header, "|" + "---|" * (len(TASK_ORDER) + 2)]
    for name, row in metrics.items():
        cells = " | ".join(f"{100 * row[t]:.1f}" for t in TASK_ORDER)
        lines.append(f"| {name} | {cells} | {100 * row['average']:.1f} |")
    return "\n".join(lines)


# --- regime statistics ----------------------------------------------------------------------------


def load_for_stats(directory: Path):
    """The built track as :class:`fusion_bench_ace.mini.stats.TrackModels`: vision towers and the
    zero-shot heads, evaluated on the test split as FusionBench's CLIP task pool does."""
    import datasets
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

    from .stats import TrackModels

    directory = Path(directory)
    model = CLIPModel.from_pretrained(directory / "clip").eval()
    tokenizer = CLIPProcessor.from_pretrained(directory / "clip").tokenizer
    described = json.loads((directory / "tasks.json").read_text())
    max_length = model.config.text_config.max_position_embeddings
    heads = {t: zero_shot_head(model, tokenizer, d["classnames"], d["templates"], max_length)
             for t, d in described.items()}
    tests = {}
    for task in described:
        data = datasets.load_from_disk(str(directory / "data" / task))
        tests[task] = (np.stack([np.asarray(im.convert("RGB")) for im in data["image"]]),
                       np.asarray(data["label"]))
    vision = CLIPVisionModel.from_pretrained(directory / "pretrained").eval()
    pretrained = {k: v.float().clone() for k, v in vision.state_dict().items()}
    experts = {t: {k: v.float() for k, v in
                   CLIPVisionModel.from_pretrained(directory / "experts" / t).state_dict().items()}
               for t in described}
    projection, logit_scale = model.visual_projection, model.logit_scale.exp().item()

    def evaluate(state, task):
        vision.load_state_dict(state)
        return accuracy(vision, projection, heads[task], logit_scale, tests[task])

    def block_of(name: str) -> str:
        match = re.search(r"layers\.(\d+)\.", name)
        return f"layer {match.group(1)}" if match else "embeddings and norms"

    return TrackModels(
        tasks=list(described), pretrained=pretrained, experts=experts, evaluate=evaluate,
        chance={t: 1 / len(d["classnames"]) for t, d in described.items()}, block_of=block_of,
    )
