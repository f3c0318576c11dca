"""Every paper benchmark end to end on stand-ins of its hub repositories.

``fusion_bench_ace.rehearsal`` writes, under a temporary ``FUSION_BENCH_ACE_HF_ROOT``, a tiny
random stand-in for every model and dataset id the benchmark's configs name (real classes, config
fields, tokenizer/processor files, dataset configurations, splits, columns and label counts; see
``fusion_bench_ace/rehearsal/facts.py`` for the sources). Then the real command,
``python -m fusion_bench_ace.compare run <benchmark>``, runs every default method through
``fusion_bench`` (and the lambda-tuned ones, which read every task's train split); every task
column of the table must be filled and no run may warn about a missing template, class or weight.

``make test`` runs one benchmark per model family with one or two methods
(``REPRESENTATIVE_METHODS``); ``pytest -m rehearsal`` (deselected by default, see conftest.py)
runs every paper benchmark with every default method.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from fusion_bench_ace.compare import available_benchmarks, load_benchmark
from fusion_bench_ace.rehearsal import NotRehearsable, requirements
from fusion_bench_ace.rehearsal.__main__ import main as rehearsal_main
from fusion_bench_ace.rehearsal.facts import DATASETS, dataset_repo, model_repo

from conftest import patched_environ

PAPER_BENCHMARKS = sorted(n for n in available_benchmarks() if load_benchmark(n).get("paper"))


def _rehearsable(name: str) -> bool:
    try:
        requirements(name, Path("unused-openclip-dir"))
    except NotRehearsable:  # evaluated through lm-eval, which fetches its own task data
        return False
    return True


REHEARSABLE = [n for n in PAPER_BENCHMARKS if _rehearsable(n)]
REPRESENTATIVE_METHODS = {
    # every CLIP dataset id, its templates and class counts; the HF CLIP model layout
    "clip_vit_b32_tall20": ["task_arithmetic"],
    # the task-vectors pickles, open_clip heads and our QuickGELU encoder
    "openclip_vit_b32_ta8": ["task_arithmetic"],
    "gpt2_glue7": ["task_arithmetic"],
    # our GLUE task pool (GLUE metrics), the normalised table, ACE's RoBERTa preset
    "roberta_base_glue8": ["individual", "ace"],
}
# What a run must never print: a task FusionBench has no template/class names for, weights left
# at their random initialisation, an activation or shape that does not fit the checkpoint.
FORBIDDEN = re.compile(
    r"(?i)unknown dataset|template|classnames|newly initialized|were not initialized|"
    r"quickgelu|size mismatch|missing key|traceback")
TUNED = ["task_arithmetic_tuned", "ties_merging_tuned"]


@pytest.fixture(scope="session")
def standin_root(tmp_path_factory) -> Path:
    """One stand-in tree for the session: benchmarks share repositories (built once)."""
    return tmp_path_factory.mktemp("standins")


def rehearse(benchmark: str, methods, root: Path, out: Path) -> Path:
    """The rehearsal command (stand-ins under ``root``, then ``compare run``), as a user runs it."""
    argv = [benchmark, "--root", str(root), "--out", str(out), "--methods", ",".join(methods)]
    with patched_environ({"OMP_NUM_THREADS": "1"}):
        assert rehearsal_main(argv) == 0
    return out / "latest"


def assert_complete(run_dir: Path, benchmark: str, methods) -> None:
    spec = load_benchmark(benchmark)
    measured = [r for r in csv.DictReader((run_dir / "table.csv").open())
                if r["source"] == "measured"]
    rows = [r for r in measured if r["scale"] == "raw"]
    assert [r["method"] for r in rows] == list(methods)
    for row in rows:
        empty = [t for t in spec["tasks"] if not row[t]]
        assert not empty, f"{benchmark}/{row['method']}: no score for {empty}"
        assert row["average"]
    normalised = [r["method"] for r in measured if r["scale"] == "normalised"]
    expected = list(methods) if spec.get("normalize") and "individual" in methods else []
    assert normalised == expected, benchmark
    for method in methods:
        log = (run_dir / "runs" / method / "fusion_bench.log").read_text(errors="replace")
        bad = [line for line in log.splitlines() if FORBIDDEN.search(line)]
        assert not bad, f"{benchmark}/{method}:\n" + "\n".join(bad[:10])


@pytest.mark.rehearsal
@pytest.mark.parametrize("benchmark", REHEARSABLE)
def test_rehearsal_every_default_method(benchmark, standin_root, tmp_path):
    """Every default method; for one benchmark per family (all data set ids among them) also
    lambda tuned on validation data, which reads every task's train split."""
    tuned = TUNED if benchmark in REPRESENTATIVE_METHODS else []
    methods = [*load_benchmark(benchmark)["default_methods"], *tuned]
    run_dir = rehearse(benchmark, methods, standin_root, tmp_path / benchmark)
    assert_complete(run_dir, benchmark, methods)
    for method in tuned:
        tuning = json.loads((run_dir / "runs" / method / "tuning.json").read_text())
        assert tuning["chosen"] in tuning["grid"], method


@pytest.mark.parametrize("benchmark", sorted(REPRESENTATIVE_METHODS))
def test_rehearsal_representative(benchmark, standin_root, tmp_path):
    methods = REPRESENTATIVE_METHODS[benchmark]
    run_dir = rehearse(benchmark, methods, standin_root, tmp_path / benchmark)
    assert_complete(run_dir, benchmark, methods)
    if benchmark == "roberta_base_glue8":
        assert_roberta_details(run_dir)


def assert_roberta_details(run_dir: Path) -> None:
    """Our GLUE task pool's metrics per task, the normalised table (individual = 100 where its
    score is positive), and ACE's RoBERTa preset on the encoder only."""
    tasks = load_benchmark("roberta_base_glue8")["tasks"]
    metric_keys = {"cola": {"accuracy", "matthews_correlation"}, "stsb": {"pearson", "spearmanr"},
                   "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"}}
    report = json.loads((run_dir / "runs" / "ace" / "program_report.json").read_text())
    for task in tasks:
        expected = metric_keys.get(task, {"accuracy"}) | {"score", "loss", "num_samples"}
        assert expected <= set(report[task]), (task, report[task])
        assert -1.0 <= report[task]["score"] <= 1.0
    rows = {(r["method"], r["scale"]): r for r in csv.DictReader((run_dir / "table.csv").open())
            if r["source"] == "measured"}
    raw, normalised = rows[("individual", "raw")], rows[("individual", "normalised")]
    for task in tasks:
        if float(raw[task]) > 0:
            assert float(normalised[task]) == pytest.approx(100.0), task
        else:
            assert normalised[task] == "", task  # undefined against a non-positive reference
    command = (run_dir / "runs" / "ace" / "command.txt").read_text()
    assert "method=ace_roberta_base method.device=auto" in command
    layers = json.loads((run_dir / "runs" / "ace" / "ace_diagnostics.json").read_text())["layers"]
    assert layers and all(re.match(r"encoder\.layer\.\d+\..*weight$", r["name"]) for r in layers)
    table = (run_dir / "table.md").read_text()
    normalised_part = table[table.index("## Normalised"):]
    assert "ACE-Merging *(ACE-Merging Table 3 (normalised %))*" in normalised_part


# --- the facts behind the stand-ins -----------------------------------------------------------


def test_every_id_of_every_paper_config_has_stand_in_facts(tmp_path):
    lm_eval = {n for n in PAPER_BENCHMARKS if n.startswith("llama")}
    assert lm_eval and set(REHEARSABLE) == set(PAPER_BENCHMARKS) - lm_eval
    for name in sorted(lm_eval):  # lm-eval fetches its own data: refused, with the reason
        with pytest.raises(NotRehearsable, match="lm-eval"):
            requirements(name, tmp_path / "openclip")
    for name in REHEARSABLE:
        needed = requirements(name, tmp_path / "openclip")
        assert needed.datasets and (needed.models or needed.openclip_encoders), name
        for repo_id in needed.datasets:
            dataset_repo(repo_id)
        for repo_id in needed.models:
            model_repo(repo_id)
        if name.startswith("openclip_"):
            assert len(needed.openclip_encoders) == 1 + len(load_benchmark(name)["tasks"])
            assert len(needed.openclip_heads) == len(load_benchmark(name)["tasks"])
    with pytest.raises(KeyError, match="no stand-in facts"):
        model_repo("someone/unknown-model")


def test_image_label_counts_are_fusion_benchs_class_counts(tmp_path):
    """Each image dataset's classes = the class names FusionBench has for the task reading it."""
    from fusion_bench.tasks.clip_classification import get_num_classes
    from omegaconf import OmegaConf

    from fusion_bench_ace.paths import config_dir

    checked = set()
    pool = OmegaConf.to_container(OmegaConf.load(
        config_dir() / "taskpool" / "ace_paper" / "clip-vit-base-patch32_TALL20.yaml"))
    for task, entry in pool["test_datasets"].items():
        repo_id = re.search(r"\$\{ace_hf:([^}]+)\}", entry["path"]).group(1)
        facts = dataset_repo(repo_id)
        # FusionBench passes no configuration name where the repository has a single one
        subset = facts.subsets[entry.get("name") or next(iter(facts.subsets))]
        assert subset.num_labels == get_num_classes(task), task
        assert entry["split"] in subset.splits and "train" in subset.splits, task
        checked.add(repo_id)
    assert len(checked) == 20


def test_glue_facts_match_the_glue_task_pool():
    from fusion_bench_ace.taskpools.glue import GLUE_TASKS

    glue = DATASETS["nyu-mll/glue"]
    for task, subset in glue.subsets.items():
        spec = GLUE_TASKS[task]
        assert subset.num_labels == spec.num_labels, task
        assert spec.validation_split in subset.splits, task
        columns = dict(subset.columns)
        assert all(c in columns for c in spec.text_keys if c), task
