"""What each hub repository of the paper benchmarks looks like, as FusionBench reads it, and where
each fact comes from.

The stand-ins (:mod:`fusion_bench_ace.rehearsal`) are built from these tables only. A fact is
either read off FusionBench 0.2.33 itself (its configs under ``fusion_bench_config/`` and the code
that consumes the repository; cited as ``FB:<path>``) or off the repository's public page on the
Hugging Face hub (its dataset card / file tree / viewer; cited by URL). Facts we could not confirm
are marked ``unconfirmed`` in their source and are kept to what FusionBench's code needs.

Conventions FusionBench's code imposes on every image dataset
(``FB:fusion_bench/dataset/image_dataset.py``): each row is a dict with an ``image`` (PIL image,
converted to RGB) and a ``label`` (``int``; a ``bool`` is turned into 0/1); labels must be smaller
than the number of class names FusionBench has for the task
(``FB:fusion_bench/tasks/clip_classification/<task>.py``, used as ``num_classes`` of its
accuracy metric in ``FB:fusion_bench/taskpool/clip_vision/taskpool.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subset:
    """One configuration ("subset") of a dataset repository."""

    splits: Tuple[str, ...]
    columns: Tuple[Tuple[str, str], ...]
    """(name, kind); kinds: ``image``, ``label`` (class label of ``num_labels`` classes),
    ``label:<n>`` (of n classes), ``bool``, ``int32``,
    ``float``, ``string``, ``jpg`` / ``cls`` (webdataset members)."""
    num_labels: Optional[int] = None
    """Classes of the ``label`` column (1 = a regression target, ``float``)."""


@dataclass(frozen=True)
class DatasetRepo:
    subsets: Dict[str, Subset]
    """Configuration name -> its splits and columns (``default`` for a repository with one)."""
    layout: str = "parquet"
    """``parquet``: ``<data_files>`` per split declared in README.md's ``configs``;
    ``webdataset``: ``<split>/<shard>.tar`` members ``<key>.<column>``."""
    data_files: str = "data/{split}-00000-of-00001.parquet"
    """Where a split's file lies in the repository (``{config}``, ``{split}``)."""
    image: Tuple[str, int] = ("RGB", 32)
    """PIL mode and side of the stand-in images (the real ones, where the card says)."""
    shards: int = 1
    """webdataset: tar shards per split."""
    extra_files: Tuple[str, ...] = ()
    """Other files at the repository root (they change how ``load_dataset`` reads a directory)."""
    source: str = ""


IMAGE_LABEL = (("image", "image"), ("label", "label"))


def _image_repo(num_labels: int, splits: Tuple[str, ...], source: str, *,
                subset: str = "default", columns=IMAGE_LABEL, **kwargs) -> DatasetRepo:
    """One configuration; its files under data/ (the default one) or under its own name."""
    folder = "data" if subset == "default" else "{config}"
    return DatasetRepo({subset: Subset(splits, columns, num_labels)},
                       data_files=folder + "/{split}-00000-of-00001.parquet", source=source,
                       **kwargs)


FB_TEST = "FB:fusion_bench_config/dataset/image_classification/test/{task}.yaml"
FB_TRAIN = "FB:fusion_bench_config/dataset/image_classification/train/{task}.yaml"
FB_CLASSES = "FB:fusion_bench/tasks/clip_classification ({task}: {n} class names)"
TANGANKE_LAYOUT = (
    "the tanganke/* image datasets were converted to parquet by the hub's converter (a default "
    "configuration, data/<split>-*.parquet, loading script deleted): "
    "https://huggingface.co/datasets/tanganke/sun397/tree/main, "
    "https://huggingface.co/datasets/tanganke/stanford_cars/commits/main")


def _fb(task: str, n: int, *more: str) -> str:
    return "; ".join([f"splits test/train: {FB_TEST.format(task=task)}, "
                      f"{FB_TRAIN.format(task=task)}", FB_CLASSES.format(task=task, n=n), *more])


def _tanganke(task: str, n: int, *more: str) -> DatasetRepo:
    return _image_repo(n, ("train", "test"), _fb(task, n, TANGANKE_LAYOUT, *more))


DATASETS: Dict[str, DatasetRepo] = {
    "tanganke/sun397": _tanganke("sun397", 397, "viewer: subset default, splits train/test "
                                 "(https://huggingface.co/datasets/tanganke/sun397/viewer/default/train)"),
    "tanganke/stanford_cars": _tanganke("stanford-cars", 196),
    "tanganke/resisc45": _tanganke("resisc45", 45),
    "tanganke/eurosat": _tanganke("eurosat", 10),
    "tanganke/gtsrb": _tanganke("gtsrb", 43),
    "tanganke/dtd": _tanganke("dtd", 47),
    "tanganke/stl10": _tanganke("stl10", 10),
    "tanganke/cifar100": _tanganke("cifar100", 100),
    "tanganke/cifar10": _tanganke("cifar10", 10),
    "tanganke/emnist_letters": _tanganke("emnist_letters", 26),
    "tanganke/kmnist": _tanganke("kmnist", 10),
    "ufldl-stanford/svhn": _image_repo(
        10, ("train", "test", "extra"), _fb(
            "svhn", 10, "FusionBench names it `svhn` with configuration cropped_digits; "
            "subsets cropped_digits and full_numbers, splits train/test/extra, data in "
            "cropped_digits/: https://huggingface.co/datasets/ufldl-stanford/svhn/viewer/"
            "cropped_digits/train, https://huggingface.co/datasets/ufldl-stanford/svhn/tree/"
            "b55c6fe12218700c222718dc080349a539767836/cropped_digits; full_numbers (digits with "
            "boxes) is not read by any benchmark and not built"),
        subset="cropped_digits"),
    "ylecun/mnist": _image_repo(
        10, ("train", "test"), _fb(
            "mnist", 10, "FusionBench names it `mnist` (the hub redirects to ylecun/mnist); "
            "one subset named mnist, splits train/test: "
            "https://huggingface.co/datasets/mnist/viewer/mnist/train; 28x28 grayscale "
            "(https://www.tensorflow.org/datasets/catalog/mnist)"),
        subset="mnist", image=("L", 28)),
    "zalando-datasets/fashion_mnist": _image_repo(
        10, ("train", "test"), _fb(
            "fashion_mnist", 10, "one subset named fashion_mnist, features image + label "
            "(10 classes): https://tensorflow.org/datasets/community_catalog/huggingface/"
            "fashion_mnist; 28x28 grayscale"),
        subset="fashion_mnist", image=("L", 28)),
    "dpdl-benchmark/oxford_flowers102": _image_repo(
        102, ("train", "test"), _fb("oxford_flowers102", 102, "repository card unconfirmed")),
    "1aurent/PatchCamelyon": _image_repo(
        2, ("train", "valid", "test"), _fb(
            "pcam", 2, "README: default subset, splits train/valid/test (data/<split>-*), "
            "features image + label (bool): https://huggingface.co/datasets/1aurent/"
            "PatchCamelyon/blob/e4bd149e7a868a9d811fdd9f9a9fb78c05c104ab/README.md; 96x96 RGB"),
        columns=(("image", "image"), ("label", "bool")), image=("RGB", 96)),
    "clip-benchmark/wds_fer2013": DatasetRepo(
        {"default": Subset(("train", "test"), (("__key__", "string"), ("__url__", "string"),
                                               ("cls", "cls"), ("jpg", "jpg")), 7)},
        layout="webdataset", image=("L", 48), shards=4,
        extra_files=("classnames.txt", "zeroshot_classification_templates.txt"),
        source=_fb("fer2013", 7, "FusionBench reads it with fusion_bench.dataset.fer2013."
                   "load_fer2013 (drops __key__/__url__, renames jpg/cls to image/label); "
                   "webdataset: {train,test}/{0..3}.tar + nshards.txt, classnames.txt and "
                   "zeroshot_classification_templates.txt at the root: "
                   "https://huggingface.co/datasets/clip-benchmark/wds_fer2013/tree/main, "
                   "https://huggingface.co/datasets/clip-benchmark/wds_fer2013/tree/main/test; "
                   "columns __key__ (s0000000), __url__, cls (int 0-6), jpg (48x48): "
                   "https://huggingface.co/datasets/clip-benchmark/wds_fer2013/viewer/default/"
                   "train?p=0")),
    "timm/oxford-iiit-pet": _image_repo(
        37, ("train", "test"), _fb(
            "oxford-iiit-pet", 37, "README: features image, label (37 classes), image_id "
            "(string), label_cat_dog (class label); splits data/train-*, data/test-*: "
            "https://huggingface.co/datasets/timm/oxford-iiit-pet/blob/"
            "10b688881011725fa2fa3d856a47536c9a7e6968/README.md, https://huggingface.co/"
            "datasets/timm/oxford-iiit-pet/commit/0b061922a132175141736196aef1136ae3c64c35"),
        columns=(("image", "image"), ("label", "label"), ("image_id", "string"),
                 ("label_cat_dog", "label:2"))),
    "ethz/food101": _image_repo(
        101, ("train", "validation"), "; ".join([
            "FusionBench evaluates on split validation: " + FB_TEST.format(task="food101"),
            FB_TRAIN.format(task="food101"), FB_CLASSES.format(task="food101", n=101),
            "viewer: subset default, splits train/validation: "
            "https://huggingface.co/datasets/ethz/food101/viewer/default/train"])),
    "nateraw/rendered-sst2": _image_repo(
        2, ("train", "test"), _fb("rendered-sst2", 2, "repository card unconfirmed")),
}

# GLUE: one subset per task; columns, label names and splits from the card
GLUE_SOURCE = (
    "nyu-mll/glue README configs: <task>/<split>-*.parquet per subset; mnli's splits train, "
    "validation_matched, validation_mismatched, test_matched, test_mismatched: "
    "https://huggingface.co/datasets/nyu-mll/glue/commit/4c50f6d2c71ecad30a90f5da22d5392673f3ab05, "
    "https://huggingface.co/datasets/nyu-mll/glue/commit/c234b36c1609cbe2b00dc63c26e1b196145b07d1; "
    "text columns as FusionBench's tokenize functions read them "
    "(FB:fusion_bench/dataset/gpt2_glue.py); every subset has label and idx (int32); stsb's "
    "label is a float score, mnli has 3 classes, the others 2")
_TVT = ("train", "validation", "test")


def _glue(text: Tuple[str, ...], num_labels: int, splits=_TVT) -> Subset:
    kind = "float" if num_labels == 1 else "label"
    return Subset(splits, (*((c, "string") for c in text), ("label", kind), ("idx", "int32")),
                  num_labels)


DATASETS["nyu-mll/glue"] = DatasetRepo(
    {
        "cola": _glue(("sentence",), 2),
        "sst2": _glue(("sentence",), 2),
        "mrpc": _glue(("sentence1", "sentence2"), 2),
        "qqp": _glue(("question1", "question2"), 2),
        "stsb": _glue(("sentence1", "sentence2"), 1),
        "mnli": _glue(("premise", "hypothesis"), 3,
                      ("train", "validation_matched", "validation_mismatched", "test_matched",
                       "test_mismatched")),
        "qnli": _glue(("question", "sentence"), 2),
        "rte": _glue(("sentence1", "sentence2"), 2),
    },
    data_files="{config}/{split}-00000-of-00001.parquet",
    source=GLUE_SOURCE,
)

# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRepo:
    """A family of model repositories, matched by ``pattern`` (named groups feed the builder)."""

    pattern: str
    kind: str
    """The builder (``fusion_bench_ace.rehearsal.MODEL_BUILDERS``) that writes it."""
    files: Tuple[str, ...]
    """Files the stand-in holds (those of the real repository FusionBench's loaders read)."""
    source: str
    settings: Dict[str, object] = field(default_factory=dict)


MODELS: Tuple[ModelRepo, ...] = (
    ModelRepo(
        r"openai/clip-vit-(?P<size>base|large)-patch(?P<patch>\d+)", "hf_clip",
        ("config.json", "model.safetensors", "preprocessor_config.json", "vocab.json",
         "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
        "a transformers CLIPModel + CLIPProcessor repository: FusionBench loads "
        "CLIPVisionModel.from_pretrained on it as the pool's _pretrained_ and CLIPModel / "
        "CLIPProcessor.from_pretrained in its task pool (FB:fusion_bench/modelpool/clip_vision/"
        "modelpool.py, FB:fusion_bench/taskpool/clip_vision/taskpool.py); patch size from the "
        "name; image size 224 and a 77-token text context as in open_clip's ViT configs "
        "(open_clip/model_configs/ViT-B-32.json); the processor's 224 crop and CLIP "
        "normalisation are transformers' CLIPImageProcessor defaults"),
    ModelRepo(
        r"tanganke/clip-vit-(?P<size>base|large)-patch(?P<patch>\d+)_(?P<task>.+)",
        "hf_clip_vision",
        ("config.json", "model.safetensors"),
        "a fine-tuned vision tower FusionBench loads with transformers.CLIPVisionModel."
        "from_pretrained (FB:fusion_bench/modelpool/clip_vision/modelpool.py load_model); same "
        "ids as FB:fusion_bench_config/modelpool/CLIPVisionModelPool/"
        "clip-vit-base-patch32_TALL20_model_only.yaml"),
    ModelRepo(
        r"openai-community/gpt2", "gpt2",
        ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json"),
        "GPT-2 (GPT2LMHeadModel) with its byte-level BPE: FusionBench loads GPT2Model."
        "from_pretrained and GPT2Tokenizer.from_pretrained (pad = unk, model_max_length 512) "
        "(FB:fusion_bench/modelpool/huggingface_gpt2_classification.py; "
        "FB:fusion_bench_config/modelpool/gpt-2_glue.yaml names it `gpt2`); n_positions 1024 "
        "as GPT-2's, since FusionBench pads every input to 512 tokens"),
    ModelRepo(
        r"tanganke/gpt2_(?P<task>\w+)", "gpt2_classifier",
        ("config.json", "model.safetensors", "vocab.json", "merges.txt",
         "tokenizer_config.json", "special_tokens_map.json"),
        "a GPT2ForSequenceClassification checkpoint (FusionBench loads its backbone with "
        "GPT2Model.from_pretrained and the whole classifier with GPT2ForSequenceClassification."
        "from_pretrained; num_labels = the task's classes, FB:fusion_bench/taskpool/"
        "gpt2_text_classification.py); files: https://huggingface.co/tanganke/gpt2_cola/tree/"
        "main; pad_token_id set (FusionBench classifies batches of 32)"),
    ModelRepo(
        r"FacebookAI/roberta-(?P<size>base|large)", "roberta",
        ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json"),
        "RoBERTa with its byte-level BPE tokenizer (<s>, <pad>, </s>, <unk>, <mask>); our GLUE "
        "task pool loads AutoTokenizer and the experts' RobertaModel "
        "(fusion_bench_ace/taskpools/glue.py); max_position_embeddings 514 as RoBERTa's"),
    ModelRepo(
        r"PLACEHOLDER-twin-merging/roberta-(?P<size>base|large)_(?P<task>\w+)",
        "roberta_classifier",
        ("config.json", "model.safetensors"),
        "the layout config/modelpool/ace_paper/roberta-*_glue8.yaml documents for the "
        "Twin-Merging experts (their hub ids are unknown): a RobertaForSequenceClassification "
        "directory with num_labels 1 for stsb, 3 for mnli, else 2"),
)


def model_repo(repo_id: str) -> Tuple[ModelRepo, Dict[str, str]]:
    """The :class:`ModelRepo` matching ``repo_id`` and the named groups of the match."""
    for repo in MODELS:
        match = re.fullmatch(repo.pattern, repo_id)
        if match:
            return repo, match.groupdict()
    raise KeyError(f"no stand-in facts for the model repository {repo_id!r}: add a ModelRepo "
                   "to fusion_bench_ace/rehearsal/facts.py")


def dataset_repo(repo_id: str) -> DatasetRepo:
    try:
        return DATASETS[repo_id]
    except KeyError:
        raise KeyError(f"no stand-in facts for the dataset repository {repo_id!r}: add it to "
                       "fusion_bench_ace/rehearsal/facts.py") from None


# --------------------------------------------------------------------------------------------
# open_clip (the task-vectors checkpoints)
# --------------------------------------------------------------------------------------------

OPENCLIP_SOURCE = (
    "layout <model_dir>/<model>/zeroshot.pt, <model>/<Task>/finetuned.pt, <model>/head_<Task>.pt: "
    "FB:fusion_bench_config/modelpool/OpenCLIPVisionModelPool/ViT-B-32_TA8.yaml; the files are "
    "pickled modules of the task-vectors code's src.modeling.ImageEncoder / ClassificationHead, "
    "which FusionBench redirects to fusion_bench.models.open_clip.modeling "
    "(FB:fusion_bench/modelpool/openclip_vision/modelpool.py _check_and_redirect_open_clip_"
    "modeling); FusionBench builds ImageEncoder(<model>) = open_clip.create_model_and_transforms"
    "(<model>, pretrained='openai', cache_dir=~/openclip-cachedir/open_clip) "
    "(FB:fusion_bench/models/open_clip/modeling.py, variables_and_paths.py); open_clip fetches "
    "OpenAI's weights from the hub repository its pretrained table names "
    "(open_clip/pretrained.py: ViT-B-32 openai -> timm/vit_base_patch32_clip_224.openai/)")
OPENCLIP_MODULE = "src.modeling"
