"""Stand-in model repositories: the real model classes and config fields at tiny sizes.

Each builder writes one repository directory the way ``save_pretrained`` writes the real one
(config, ``model.safetensors``, tokenizer / processor files). Tokenizers are trained here on the
words the benchmark will feed them (no download). Fine-tuned experts are their base model's
weights plus a seeded perturbation of a different size per task, so task vectors are non-zero and
heterogeneous; every number is meaningless except that it is deterministic.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable, Dict, List

import torch

from .data import WORDS
from .facts import DATASETS

TINY = {"hidden": 16, "intermediate": 32, "layers": 2, "heads": 2, "projection": 8}
"""Sizes of every stand-in transformer (the real ones are 768-1024 wide, 12-24 layers)."""


def stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def perturbation_scale(task: str) -> float:
    """1e-3 .. 1e-1, different per task: ACE's heterogeneity statistic sees different energies."""
    return 10.0 ** (-3 + 2 * (stable_seed(task) % 1000) / 999)


def perturbed(state: Dict[str, torch.Tensor], task: str) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(stable_seed(task))
    scale = perturbation_scale(task)
    return {k: v + scale * torch.randn(v.shape, generator=generator, dtype=v.dtype)
            if v.is_floating_point() else v.clone() for k, v in state.items()}


class Context:
    """Where stand-ins go; builders ask it for the base models they derive from."""

    def __init__(self, hf_root: Path, build_model: Callable[[str], Path]):
        self.hf_root = Path(hf_root)
        self._build_model = build_model

    def model(self, repo_id: str) -> Path:
        """The directory of stand-in ``repo_id``, built first if it is not there yet."""
        return self._build_model(repo_id)


# --- tokenizers ------------------------------------------------------------------------------


def _byte_level_bpe(texts: List[str], special_tokens: List[str], directory: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=special_tokens)
    bpe.save_model(str(directory))


def _clip_prompts() -> List[str]:
    """Every zero-shot prompt of every benchmark's image tasks (FusionBench's class names in its
    templates), so one tokenizer serves all task lists."""
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

    from ..compare import available_benchmarks, load_benchmark

    known = set(CLIPTemplateFactory.get_available_datasets())
    tasks = sorted({t for b in available_benchmarks() for t in load_benchmark(b)["tasks"]} & known)
    prompts = []
    for task in tasks:
        classnames, templates = CLIPTemplateFactory.get_classnames_and_templates(task)
        prompts += [template(c) for c in classnames for template in templates]
    return prompts


def _clip_tokenizer(texts: List[str], directory: Path):
    """A CLIP BPE (lower-cased, ``</w>`` word ends, byte-level alphabet) trained on ``texts``:
    the same normalisation and pre-tokenisation as transformers' conversion of OpenAI's CLIP
    tokenizer, so every prompt word is one token and prompts stay within 77 tokens."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="",
                                     unk_token="<|endoftext|>"))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(directory))
    return CLIPTokenizerFast(vocab_file=str(directory / "vocab.json"),
                             merges_file=str(directory / "merges.txt"), model_max_length=77)


# --- HF CLIP ---------------------------------------------------------------------------------


def build_hf_clip(ctx: Context, directory: Path, size: str, patch: str) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer(_clip_prompts(), directory)
    text = dict(vocab_size=len(tokenizer), hidden_size=TINY["hidden"],
                intermediate_size=TINY["intermediate"], num_hidden_layers=TINY["layers"],
                num_attention_heads=TINY["heads"], max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=TINY["hidden"], intermediate_size=TINY["intermediate"],
                  num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                  image_size=224, patch_size=int(patch))
    config = CLIPConfig(text_config=text, vision_config=vision,
                        projection_dim=TINY["projection"])
    torch.manual_seed(stable_seed(f"clip-{size}-{patch}"))
    CLIPModel(config).eval().save_pretrained(directory)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer
                  ).save_pretrained(directory)


def build_hf_clip_vision(ctx: Context, directory: Path, size: str, patch: str, task: str) -> None:
    from transformers import CLIPVisionModel

    base = CLIPVisionModel.from_pretrained(ctx.model(f"openai/clip-vit-{size}-patch{patch}"))
    base.load_state_dict(perturbed(base.state_dict(), task))
    base.save_pretrained(directory)


# --- GLUE models -----------------------------------------------------------------------------

GPT2_END = "<|endoftext|>"


def glue_num_labels(task: str) -> int:
    return DATASETS["nyu-mll/glue"].subsets[task].num_labels


def build_gpt2(ctx: Context, directory: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    _byte_level_bpe([" ".join(WORDS)] * 4, [GPT2_END], directory)
    tokenizer = GPT2TokenizerFast(vocab_file=str(directory / "vocab.json"),
                                  merges_file=str(directory / "merges.txt"),
                                  unk_token=GPT2_END, bos_token=GPT2_END, eos_token=GPT2_END,
                                  model_max_length=1024)
    tokenizer.save_pretrained(directory)
    end = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=TINY["hidden"],
                        n_layer=TINY["layers"], n_head=TINY["heads"], bos_token_id=end,
                        eos_token_id=end)
    torch.manual_seed(stable_seed("gpt2"))
    GPT2LMHeadModel(config).eval().save_pretrained(directory)


def build_gpt2_classifier(ctx: Context, directory: Path, task: str) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

    base_dir = ctx.model("openai-community/gpt2")
    backbone = GPT2Model.from_pretrained(base_dir)
    settings = {k: v for k, v in backbone.config.to_dict().items()
                if k not in ("id2label", "label2id", "architectures")}
    config = GPT2Config(**{**settings, "num_labels": glue_num_labels(task),
                           "pad_token_id": backbone.config.eos_token_id})
    torch.manual_seed(stable_seed(f"gpt2_{task}/head"))
    classifier = GPT2ForSequenceClassification(config).eval()
    classifier.transformer.load_state_dict(perturbed(backbone.state_dict(), task))
    classifier.save_pretrained(directory)
    _copy_tokenizer(base_dir, directory)


ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def build_roberta(ctx: Context, directory: Path, size: str) -> None:
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    _byte_level_bpe([" ".join(WORDS)] * 4, ROBERTA_SPECIALS, directory)
    tokenizer = RobertaTokenizerFast(vocab_file=str(directory / "vocab.json"),
                                     merges_file=str(directory / "merges.txt"),
                                     model_max_length=512)
    tokenizer.save_pretrained(directory)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=TINY["hidden"],
                           num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                           intermediate_size=TINY["intermediate"], max_position_embeddings=514,
                           type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(stable_seed(f"roberta-{size}"))
    RobertaForMaskedLM(config).eval().save_pretrained(directory)


def build_roberta_classifier(ctx: Context, directory: Path, size: str, task: str) -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    backbone = RobertaModel.from_pretrained(ctx.model(f"FacebookAI/roberta-{size}"),
                                            add_pooling_layer=False)
    settings = {k: v for k, v in backbone.config.to_dict().items()
                if k not in ("id2label", "label2id", "architectures")}
    torch.manual_seed(stable_seed(f"roberta-{size}_{task}/head"))
    classifier = RobertaForSequenceClassification(
        RobertaConfig(**settings, num_labels=glue_num_labels(task))).eval()
    classifier.roberta.load_state_dict(perturbed(backbone.state_dict(), task))
    classifier.save_pretrained(directory)


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


MODEL_BUILDERS: Dict[str, Callable[..., None]] = {
    "hf_clip": build_hf_clip,
    "hf_clip_vision": build_hf_clip_vision,
    "gpt2": build_gpt2,
    "gpt2_classifier": build_gpt2_classifier,
    "roberta": build_roberta,
    "roberta_classifier": build_roberta_classifier,
}
"""facts.ModelRepo.kind -> builder(ctx, directory, **the id pattern's named groups)."""
