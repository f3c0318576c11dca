"""GLUE evaluation of a merged backbone with each task's own classification head.

:class:`GLUESequenceClassificationTaskPool` is the RoBERTa counterpart of FusionBench's
``GPT2TextClassificationTaskPool``: the model pool holds the *backbones* of the fine-tuned
experts (``RobertaModel``, merged by any FusionBench method); for each task the pool loads that
task's fine-tuned ``*ForSequenceClassification`` checkpoint, swaps its backbone for the merged one
and evaluates it on the task's GLUE validation split with the GLUE metrics:

================  ========================================  =================================
task              metrics reported                          ``score`` (the task's GLUE score)
================  ========================================  =================================
cola              accuracy, matthews_correlation            matthews_correlation
sst2, qnli, rte,  accuracy                                  accuracy
mnli, wnli
mrpc, qqp         accuracy, f1 (positive class 1)           (accuracy + f1) / 2
stsb              pearson, spearmanr (regression head)      (pearson + spearmanr) / 2
================  ========================================  =================================

All values are fractions in [0, 1] (correlations in [-1, 1]), like FusionBench's ``accuracy``.
``score`` follows the convention of the DARE / Twin-Merging code base that the RoBERTa numbers
of the ACE paper (Table 3, via WUDI-Merging and Twin-Merging) come from; the paper's
*normalised* score is ``100 * score(merged) / score(individual expert)`` per task, computed by
the comparison from the ``individual`` run.

:func:`load_gpt2_glue` loads a GLUE split tokenized exactly as FusionBench's GPT-2 benchmark
does (FusionBench's own tokenize functions), but from ``${ace_hf:nyu-mll/glue}`` instead of a
hard-coded ``load_dataset("glue", ...)``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from fusion_bench.mixins import LightningFabricMixin
from fusion_bench.taskpool import BaseTaskPool
from fusion_bench.utils import instantiate
from omegaconf import DictConfig

from .data import load_hf_dataset, load_tokenizer

log = logging.getLogger(__name__)

GLUE_PATH = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    text_keys: Tuple[str, Optional[str]]
    num_labels: int  # 1 = regression
    score: str  # "accuracy", "matthews_correlation", "accuracy_f1", "pearson_spearmanr"
    validation_split: str = "validation"


GLUE_TASKS: Dict[str, GlueTask] = {
    "cola": GlueTask(("sentence", None), 2, "matthews_correlation"),
    "sst2": GlueTask(("sentence", None), 2, "accuracy"),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, "accuracy_f1"),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, "pearson_spearmanr"),
    "qqp": GlueTask(("question1", "question2"), 2, "accuracy_f1"),
    "mnli": GlueTask(("premise", "hypothesis"), 3, "accuracy", "validation_matched"),
    "qnli": GlueTask(("question", "sentence"), 2, "accuracy"),
    "rte": GlueTask(("sentence1", "sentence2"), 2, "accuracy"),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, "accuracy"),
}


def glue_task(name: str) -> GlueTask:
    try:
        return GLUE_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown GLUE task {name!r}; known: {', '.join(GLUE_TASKS)}") from None


# --- metrics --------------------------------------------------------------------------------------


def glue_metrics(task: str, predictions, labels) -> Dict[str, float]:
    """GLUE metrics of one task from raw head outputs (``[n, num_labels]``) and labels.

    The same functions as Hugging Face ``evaluate``'s ``glue`` metric (scikit-learn, SciPy).
    """
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    spec = glue_task(task)
    predictions = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(labels)
    if spec.num_labels == 1:
        values = predictions.reshape(-1)
        labels = labels.astype(np.float64)
        constant = np.ptp(values) == 0 or np.ptp(labels) == 0
        pearson = 0.0 if constant else float(pearsonr(values, labels)[0])
        spearman = 0.0 if constant else float(spearmanr(values, labels)[0])
        return {"pearson": pearson, "spearmanr": spearman, "score": (pearson + spearman) / 2}
    predicted = predictions.argmax(axis=-1)
    labels = labels.astype(np.int64)
    result = {"accuracy": float((predicted == labels).mean())}
    if spec.score == "matthews_correlation":
        result["matthews_correlation"] = float(matthews_corrcoef(labels, predicted))
        result["score"] = result["matthews_correlation"]
    elif spec.score == "accuracy_f1":
        result["f1"] = float(f1_score(labels, predicted, zero_division=0.0))
        result["score"] = (result["accuracy"] + result["f1"]) / 2
    else:
        result["score"] = result["accuracy"]
    return result


# --- data -----------------------------------------------------------------------------------------


def load_glue_split(name: str, split: Optional[str] = None, path: str = GLUE_PATH,
                    validation: Optional[Mapping] = None):
    """One split (default: the task's GLUE validation split, the benchmarks' test data) of GLUE
    task ``name``, raw text; with ``validation``, rows held out of the train split instead
    (``fusion_bench_ace.taskpools.data``), as DARE / Twin-Merging hold 10 % of GLUE train out."""
    return load_hf_dataset(path, split=split or glue_task(name).validation_split, name=name,
                           validation=validation)


@functools.lru_cache(maxsize=None)
def _gpt2_tokenizer(name_or_path: str):
    from fusion_bench.modelpool.huggingface_gpt2_classification import load_gpt2_tokenizer

    return load_gpt2_tokenizer(name_or_path)


def load_gpt2_glue(name: str, split: Optional[str] = None, path: str = GLUE_PATH,
                   tokenizer: str = "openai-community/gpt2", validation: Optional[Mapping] = None):
    """A GLUE split tokenized as FusionBench's GPT-2 benchmark (``fusion_bench.dataset.gpt2_glue``).

    Same tokenizer set-up (``load_gpt2_tokenizer``: pad = unk, ``model_max_length`` 512) and the
    same tokenize functions (pad to max length, truncate), so the numbers are comparable with
    FusionBench's GPT-2 table; only the source (``path``) is configurable.
    """
    from fusion_bench.dataset import gpt2_glue as fb

    functions = {
        "cola": fb.cola_tokenize_function,
        "sst2": fb.cola_tokenize_function,
        "mrpc": fb.mrpc_tokenize_function,
        "rte": fb.mrpc_tokenize_function,
        "mnli": fb.mnli_tokenize_function,
        "qnli": fb.qnli_tokenize_function,
        "qqp": fb.qqp_tokenize_function,
    }
    if name not in functions:
        raise KeyError(f"FusionBench's GPT-2 GLUE covers {sorted(functions)}, not {name!r}")
    dataset = load_glue_split(name, split, path, validation)
    columns = [c for c in glue_task(name).text_keys if c is not None]
    return dataset.map(
        functools.partial(functions[name], tokenizer=_gpt2_tokenizer(tokenizer)),
        batched=True,
        remove_columns=columns,
    )


def tokenize_glue(dataset, task: str, tokenizer, max_length: Optional[int] = None):
    """Tokenize a raw GLUE split for a ``*ForSequenceClassification`` model (no padding yet)."""
    first, second = glue_task(task).text_keys

    def encode(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        return tokenizer(*texts, truncation=True, max_length=max_length)

    keep = {"label"}
    encoded = dataset.map(
        encode, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep]
    )
    return encoded.rename_column("label", "labels")


# --- the task pool --------------------------------------------------------------------------------


class GLUESequenceClassificationTaskPool(BaseTaskPool, LightningFabricMixin):
    """Evaluate a backbone on GLUE tasks, each with that task's fine-tuned classification head.

    Args:
        test_datasets: task name (a GLUE configuration: cola, sst2, ...) -> dataset config
            (instantiated; raw GLUE columns ``sentence``/``premise``/... and ``label``).
        tokenizer: name or path for ``AutoTokenizer.from_pretrained``, or a config to instantiate.
        classifiers: optional task -> checkpoint (name/path or config) holding the task's head;
            by default the model pool's entry of the same name (its
            ``pretrained_model_name_or_path``).
        classifier_loader: how a checkpoint name/path is loaded.
        max_length: truncation length of the tokenized inputs (batches are padded dynamically).
        dataloader_kwargs: passed to ``torch.utils.data.DataLoader``.
        fast_dev_run: evaluate one batch per task only.
    """

    _config_mapping = BaseTaskPool._config_mapping | {
        "_test_datasets": "test_datasets",
        "_tokenizer": "tokenizer",
        "_classifiers": "classifiers",
        "classifier_loader": "classifier_loader",
        "max_length": "max_length",
        "dataloader_kwargs": "dataloader_kwargs",
        "fast_dev_run": "fast_dev_run",
    }

    def __init__(
        self,
        test_datasets: DictConfig,
        tokenizer: Union[str, DictConfig],
        classifiers: Optional[DictConfig] = None,
        classifier_loader: str = "transformers.AutoModelForSequenceClassification.from_pretrained",
        max_length: Optional[int] = 512,
        dataloader_kwargs: Optional[DictConfig] = None,
        fast_dev_run: bool = False,
        **kwargs,
    ):
        self._test_datasets = test_datasets
        self._tokenizer = tokenizer
        self._classifiers = classifiers
        self.classifier_loader = classifier_loader
        self.max_length = max_length
        self.dataloader_kwargs = dict(dataloader_kwargs or {})
        self.fast_dev_run = fast_dev_run
        super().__init__(**kwargs)
        for name in self._test_datasets:
            glue_task(name)  # fail early on a name we have no metric for
        self._tokenizer_instance = None
        self._tokenized_cache: Dict[str, object] = {}

    @property
    def tokenizer(self):
        if self._tokenizer_instance is None:
            self._tokenizer_instance = load_tokenizer(self._tokenizer)
        return self._tokenizer_instance

    # which checkpoint carries task `name`'s head
    def classifier_source(self, name: str):
        if self._classifiers is not None and name in self._classifiers:
            return self._classifiers[name]
        modelpool = getattr(self._program, "modelpool", None)
        if modelpool is None or name not in modelpool.model_names:
            raise ValueError(
                f"no classifier for task {name!r}: not in `classifiers` nor in the model pool"
            )
        config = modelpool.get_model_config(name)
        if isinstance(config, str):
            return config
        path = config.get("pretrained_model_name_or_path")
        if path is None:
            raise ValueError(
                f"the model pool's entry {name!r} names no pretrained_model_name_or_path"
            )
        return str(path)

    def load_classifier(self, name: str):
        source = self.classifier_source(name)
        if isinstance(source, str):
            return instantiate(
                {"_target_": self.classifier_loader, "pretrained_model_name_or_path": source}
            )
        return instantiate(source)

    def get_classifier(self, name: str, backbone: torch.nn.Module) -> torch.nn.Module:
        """Task ``name``'s fine-tuned classifier with its backbone replaced by ``backbone``."""
        classifier = self.load_classifier(name)
        prefix = classifier.base_model_prefix
        own = getattr(classifier, prefix)
        if not isinstance(backbone, type(own)):
            raise TypeError(
                f"task {name!r}: the classifier's backbone is {type(own).__name__}, "
                f"the model to evaluate a {type(backbone).__name__}"
            )
        setattr(classifier, prefix, backbone)
        expected = glue_task(name).num_labels
        if classifier.num_labels != expected:
            raise ValueError(
                f"task {name!r}: the classifier has {classifier.num_labels} labels, "
                f"GLUE {name} needs {expected}"
            )
        return classifier

    def _tokenized(self, name: str):
        if name not in self._tokenized_cache:
            dataset = instantiate(self._test_datasets[name])
            self._tokenized_cache[name] = tokenize_glue(
                dataset, name, self.tokenizer, self.max_length
            )
        return self._tokenized_cache[name]

    def get_test_dataloader(self, name: str):
        from torch.utils.data import DataLoader
        from transformers import DataCollatorWithPadding

        kwargs = {"batch_size": 32, "shuffle": False, **self.dataloader_kwargs}
        loader = DataLoader(
            self._tokenized(name), collate_fn=DataCollatorWithPadding(self.tokenizer), **kwargs
        )
        return self.fabric.setup_dataloaders(loader)

    @torch.no_grad()
    def evaluate_single_task(self, name: str, backbone: torch.nn.Module) -> Dict[str, float]:
        model = self.fabric.setup_module(self.get_classifier(name, backbone))
        model.eval()
        regression = glue_task(name).num_labels == 1
        outputs, labels, loss_sum, count = [], [], 0.0, 0
        batches = self.get_test_dataloader(name)
        if self.fast_dev_run:
            batches = itertools.islice(batches, 1)
        for batch in batches:
            targets = batch.pop("labels")
            logits = model(**batch).logits.float()
            if regression:
                loss = F.mse_loss(logits.view(-1), targets.float().view(-1), reduction="sum")
            else:
                loss = F.cross_entropy(logits, targets.long(), reduction="sum")
            loss_sum += loss.item()
            count += targets.shape[0]
            outputs.append(logits.cpu())
            labels.append(targets.cpu())
        result = glue_metrics(name, torch.cat(outputs).numpy(), torch.cat(labels).numpy())
        result["loss"] = loss_sum / max(count, 1)
        result["num_samples"] = count
        log.info("GLUE %s: %s", name, result)
        return result

    def evaluate(self, model: torch.nn.Module, name: Optional[str] = None, **kwargs):
        report = {} if name is None else {"name": name}
        for task in self._test_datasets:
            report[task] = self.evaluate_single_task(task, model)
        scores = [report[t]["score"] for t in self._test_datasets]
        report["average"] = {"score": sum(scores) / len(scores) if scores else math.nan}
        log.info("Evaluation result: %s", report)
        return report
