"""The paper-scale benchmarks, verified without their weights.

(a) every paper benchmark's ``fusion_bench`` command composes (``--cfg job --resolve``) for each of
    its default methods, every ``_target_`` imports, and ``${ace_hf:...}`` turns every hub id into
    the local copy under ``FUSION_BENCH_ACE_HF_ROOT`` when one is there;
(b) our GLUE task pool's pieces (an expert's own backbone reproduces it; GPT-2 GLUE tokenized as
    FusionBench does) on the stand-ins of fusion_bench_ace.rehearsal (the benchmarks themselves run
    end to end in test_rehearsals.py);
(c) ``paper_numbers.yaml`` matches the benchmarks' task lists and the tables of docs/comparisons.md,
    and each printed average re-computes from its cells except the documented inconsistencies.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fusion_bench_ace.compare import (
    PAPER_NUMBERS,
    available_benchmarks,
    load_benchmark,
    paper_rows,
    resolve_methods,
)

from conftest import patched_environ

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
FUSION_BENCH = Path(sys.executable).with_name("fusion_bench")
PAPER_TABLES_MD = REPO / "docs" / "comparisons.md"
PAPER_BENCHMARKS = sorted(n for n in available_benchmarks() if load_benchmark(n).get("paper"))
RB_TASKS = ["cola", "sst2", "mrpc", "stsb", "qqp", "qnli", "mnli", "rte"]
# (benchmark key, method, source prefix) of the printed averages that do not re-compute from
# their cells
DOCUMENTED_INCONSISTENT = {
    ("clip_vit_b32_ta8", "TA + NAN", "NAN Table 1"),
    ("clip_vit_b32_ta8", "Traditional MTL", "NAN Table 1"),
    ("clip_vit_l14_ta8", "Traditional MTL", "NAN Table 1"),
    ("roberta_base_glue8", "Pre-trained", "ACE-Merging Table 3"),
    ("roberta_base_glue8", "Ties (w/ DARE)", "ACE-Merging Table 3"),
}
ACE_PRESET = {
    "clip": "method=ace_vit",
    "openclip": "method=ace_vit",
    "gpt2": "method=ace_gpt2",
    "roberta_base": "method=ace_roberta_base",
    "roberta_large": "method=ace_roberta_large",
    "llama": "method=ace_llama",
}
# the methods every paper benchmark runs; LLaMA2-13B + WizardMath (32001 embedding rows) is only
# mergeable with the embedding and head kept pretrained, which FusionBench's methods cannot do
BASELINES = {"pretrained", "individual", "simple_average", "task_arithmetic", "ties_merging",
             "tsv_m", "ace"}
REQUIRED_METHODS = {"llama2_13b_wizard2": {"pretrained", "individual", "task_arithmetic_nan",
                                           "ties_merging_nan", "ace"}}
# task pools that need the optional lm-eval package (FusionBench's LMEvalHarnessTaskPool)
LM_EVAL_TARGETS = {"fusion_bench_ace.taskpools.lm_eval.LMEvalReportTaskPool"}


def test_the_paper_benchmarks_are_all_there():
    expected = {
        f"clip_vit_{a}_{s}" for a in ("b32", "b16", "l14") for s in ("ta8", "tall14", "tall20")
    }
    expected |= {f"openclip_vit_{a}_ta8" for a in ("b32", "b16", "l14")}
    expected |= {"gpt2_glue7", "roberta_base_glue8", "roberta_large_glue8"}
    expected |= {"llama32_3b_mergebench3", "llama2_13b_wizard2"}
    assert set(PAPER_BENCHMARKS) == expected
    for name in PAPER_BENCHMARKS:
        spec = load_benchmark(name)
        family = next(k for k in sorted(ACE_PRESET, key=len, reverse=True) if name.startswith(k))
        assert spec["methods"]["ace"] == [ACE_PRESET[family], "method.device=auto"], name
        assert REQUIRED_METHODS.get(name, BASELINES) <= set(spec["default_methods"]), name
        assert spec["sweep"]["method"] == ACE_PRESET[family].split("=")[1]
        assert all(k.startswith("method.") and v for k, v in spec["sweep"]["grid"].items())
        for override in spec[
            "overrides"
        ]:  # our pools live under ace_paper/, away from FusionBench's names
            group, _, option = override.partition("=")
            assert group in ("modelpool", "taskpool") and option.startswith("ace_paper/")
            assert (CONFIG / group / f"{option}.yaml").is_file(), override


# --- (a) composition ------------------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    # Runs the fusion_bench script once per override list, in one interpreter (imports paid once).
    import json, runpy, sys
    from hydra.core.global_hydra import GlobalHydra
    script, jobs = sys.argv[1], json.loads(open(sys.argv[2]).read())
    for i, overrides in enumerate(jobs):
        GlobalHydra.instance().clear()
        sys.argv = [script, "--cfg", "job", "--resolve", *overrides]
        print(f"\\n@@@ begin {i}", flush=True)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        print(f"\\n@@@ end {i} {code}", flush=True)
""")


HUB_ID = r"\$\{ace_hf:([\w-][\w.-]*/[\w.-]+)\}"  # literal ids only (not comments' "${ace_hf:...}")


def hub_ids() -> set:
    """Every literal ``${ace_hf:<id>}`` id in our paper pool configs."""
    ids = set()
    for path in (CONFIG / "modelpool" / "ace_paper").glob("*.yaml"):
        ids |= set(re.findall(HUB_ID, path.read_text()))
    for path in (CONFIG / "taskpool" / "ace_paper").glob("*.yaml"):
        ids |= set(re.findall(HUB_ID, path.read_text()))
    return ids


def roberta_expert_ids() -> set:
    ids = set()
    for size in ("base", "large"):
        pool = yaml.safe_load(
            (CONFIG / "modelpool" / "ace_paper" / f"roberta-{size}_glue8.yaml").read_text()
        )
        ids |= {pool["expert_prefix"] + t for t in RB_TASKS}
    return ids


def strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from targets(value)


def locate(target: str):
    from hydra._internal.utils import _locate

    return _locate(target)


def test_every_target_is_named_one_way():
    """One ``_target_`` convention in config/: a literal dotted path (no interpolation), and an
    object of ours by the module that defines it (not a re-export). FusionBench's open_clip task
    pool is reached through taskpools.openclip, the module that makes it importable."""
    found = []
    for path in sorted(CONFIG.rglob("*.yaml")):
        found += [(path, t) for t in targets(yaml.safe_load(path.read_text()))]
    assert len(found) > 100
    for path, target in found:
        assert isinstance(target, str) and "${" not in target, (path, target)
        try:
            defined_in = getattr(locate(target), "__module__", "")
        except ImportError as error:  # an optional dependency (lm-eval) is missing: read the source
            assert "lm_eval" in repr(error.__cause__ or error), (path, target, error)
            defined_in = module_defining(target)
        if defined_in.split(".")[0] == "fusion_bench_ace":
            assert defined_in == target.rsplit(".", 1)[0], (path, target)


def module_defining(target: str) -> str:
    """The module of ours whose source defines ``target``'s class, found without importing it."""
    import ast
    import importlib.util

    module, _, name = target.rpartition(".")
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    assert any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body), target
    return module


def compose_jobs():
    """(benchmark, method) pairs: every benchmark with its ACE preset, and every default method once
    per model family (methods compose independently of the pools; one fusion_bench start each would
    take minutes)."""
    pairs, done = [], {}
    for name in PAPER_BENCHMARKS:
        family = (
            name.rsplit("_", 1)[0] if name.startswith(("gpt2", "roberta")) else name.split("_")[0]
        )
        seen = done.setdefault(family, set())
        for method in resolve_methods(load_benchmark(name), None):
            if method == "ace" or method not in seen:
                pairs.append((name, method))
                seen.add(method)
    return pairs


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """{(benchmark, method): resolved job config} for the pairs of :func:`compose_jobs`."""
    tmp = tmp_path_factory.mktemp("compose")
    hf_root, openclip_dir = tmp / "hf", tmp / "openclip"
    for repo_id in hub_ids() | roberta_expert_ids():
        (hf_root / repo_id).mkdir(parents=True, exist_ok=True)
    keys = compose_jobs()
    jobs = [[*load_benchmark(n)["overrides"], *load_benchmark(n)["methods"][m]] for n, m in keys]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "driver.py").write_text(DRIVER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "FUSION_BENCH_ACE_HF_ROOT": str(hf_root),
        "FUSION_BENCH_ACE_OPENCLIP_DIR": str(openclip_dir),
    }
    done = subprocess.run(
        [sys.executable, str(tmp / "driver.py"), str(FUSION_BENCH), str(tmp / "jobs.json")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {}
    for i, key in enumerate(keys):
        match = re.search(rf"@@@ begin {i}\n(.*?)\n@@@ end {i} (\S+)", done.stdout, re.S)
        assert match, f"no output for {key}:\n{done.stderr[-3000:]}"
        assert match.group(2) == "0", (
            f"{key} did not compose:\n{match.group(1)[-2000:]}\n{done.stderr[-2000:]}"
        )
        results[key] = yaml.safe_load(match.group(1))
    return {"configs": results, "hf_root": hf_root, "openclip_dir": openclip_dir}


def test_every_paper_command_composes_and_its_targets_import(composed):
    assert {n for n, m in composed["configs"] if m == "ace"} == set(PAPER_BENCHMARKS)
    for name in PAPER_BENCHMARKS:  # every default method composes in some benchmark of the family
        assert set(resolve_methods(load_benchmark(name), None)) <= {
            m for _, m in composed["configs"]
        }
    seen = set()
    for (name, method), config in composed["configs"].items():
        for group in ("method", "modelpool", "taskpool"):
            assert config.get(group) and "_target_" in config[group], (name, method, group)
        spec = load_benchmark(name)
        taskpool = config["taskpool"]
        assert list(taskpool.get("test_datasets") or taskpool["tasks"]) == spec["tasks"], name
        experts = [m for m in config["modelpool"]["models"] if m != "_pretrained_"]
        assert sorted(experts) == sorted(benchmark_experts(spec)), name
        if method == "ace":
            assert config["method"]["_target_"] == "fusion_bench_ace.algorithms.ace.ACEMerging"
        seen |= set(targets({g: config[g] for g in ("method", "modelpool", "taskpool")}))
    for target in sorted(seen - LM_EVAL_TARGETS):
        assert callable(locate(target)), target
    assert LM_EVAL_TARGETS <= seen


def test_the_lm_eval_task_pool_imports():
    pytest.importorskip("lm_eval", reason="lm-eval (optional: pip install lm-eval) is missing")
    for target in LM_EVAL_TARGETS:
        assert callable(locate(target)), target


def benchmark_experts(spec: dict) -> list:
    """The experts of a benchmark: ``experts``, else those ``normalize`` relates the tasks to
    (ACE Table 9: several tasks per expert), else one per task."""
    if spec.get("experts"):
        return list(spec["experts"])
    how = spec.get("normalize")
    if isinstance(how, dict):
        return list(dict.fromkeys(how["individual"].values()))
    return list(spec["tasks"])


def test_every_hub_id_resolves_to_its_local_copy(composed):
    hf_root, openclip_dir = str(composed["hf_root"]), str(composed["openclip_dir"])
    ids = hub_ids() | roberta_expert_ids()
    used = set()
    for (name, method), config in composed["configs"].items():
        for value in strings({g: config[g] for g in ("modelpool", "taskpool")}):
            assert value not in ids, f"{name}: {value} was not mapped to the local copy"
            if value.startswith(hf_root + "/"):
                assert os.path.isdir(value), value
                used.add(os.path.relpath(value, hf_root))
        if name.startswith("openclip_"):
            pool = config["modelpool"]
            assert pool["model_dir"] == openclip_dir
            paths = [m["pickle_path"] for m in pool["models"].values()] + list(
                pool["classification_heads"].values()
            )
            assert all(p.startswith(openclip_dir + "/") for p in paths), name
    assert used == ids  # every id of every config is used by some benchmark
    rb = composed["configs"][("roberta_base_glue8", "ace")]
    assert (
        rb["modelpool"]["models"]["stsb"]["pretrained_model_name_or_path"]
        == f"{hf_root}/PLACEHOLDER-twin-merging/roberta-base_stsb"
    )
    assert rb["method"]["eps"] == pytest.approx(2e-4)


def test_without_a_local_copy_the_hub_id_is_kept(tmp_path):
    from fusion_bench_ace.resolvers import hf_repo

    with patched_environ({"FUSION_BENCH_ACE_HF_ROOT": str(tmp_path)}):
        assert hf_repo("nyu-mll/glue") == "nyu-mll/glue"
        (tmp_path / "nyu-mll" / "glue").mkdir(parents=True)
        assert hf_repo("nyu-mll/glue") == str(tmp_path / "nyu-mll" / "glue")


# --- (b) our GLUE pieces on the RoBERTa / GPT-2 stand-ins ----------------------------------------
# (the benchmarks themselves run end to end in test_rehearsals.py)


@pytest.fixture(scope="module")
def glue_standins(tmp_path_factory):
    """Stand-ins of the RoBERTa and GPT-2 benchmarks' repositories (fusion_bench_ace.rehearsal)."""
    from fusion_bench_ace.rehearsal import build_standins

    root = tmp_path_factory.mktemp("standins")
    build_standins("gpt2_glue7", root)
    return Path(build_standins("roberta_base_glue8", root)["FUSION_BENCH_ACE_HF_ROOT"])


def test_an_experts_own_backbone_reproduces_the_fine_tuned_classifier(glue_standins):
    """The `individual` diagonal: expert t's backbone + task t's head = the fine-tuned model."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForSequenceClassification, RobertaModel

    from fusion_bench_ace.taskpools.glue import GLUESequenceClassificationTaskPool, load_glue_split

    root = glue_standins
    pool_config = yaml.safe_load(
        (CONFIG / "modelpool" / "ace_paper" / "roberta-base_glue8.yaml").read_text()
    )
    expert_dir = root / f"{pool_config['expert_prefix']}stsb"
    pool = GLUESequenceClassificationTaskPool(
        test_datasets=OmegaConf.create(
            {
                "stsb": {
                    "_target_": "fusion_bench_ace.taskpools.glue.load_glue_split",
                    "name": "stsb",
                    "path": str(root / "nyu-mll" / "glue"),
                }
            }
        ),
        tokenizer=str(root / "FacebookAI" / "roberta-base"),
        classifiers=OmegaConf.create({"stsb": str(expert_dir)}),
    )
    backbone = RobertaModel.from_pretrained(expert_dir, add_pooling_layer=False).eval()
    combined = pool.get_classifier("stsb", backbone).eval()
    reference = AutoModelForSequenceClassification.from_pretrained(expert_dir).eval()
    batch = pool.tokenizer(
        ["two men are playing guitar", "rain"],
        ["a man plays a guitar", "sun"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        torch.testing.assert_close(combined(**batch).logits, reference(**batch).logits)
    mnli = load_glue_split("mnli", path=str(root / "nyu-mll" / "glue"))  # validation_matched
    assert len(mnli) == 3 and set(mnli.column_names) == {"premise", "hypothesis", "label", "idx"}
    with pytest.raises(ValueError, match="3 labels"):
        pool._classifiers = OmegaConf.create(
            {"stsb": str(root / f"{pool_config['expert_prefix']}mnli")}
        )
        pool.get_classifier("stsb", backbone)


def test_glue_metrics():
    from fusion_bench_ace.taskpools.glue import glue_metrics

    logits = [[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]]  # predicts 0, 1, 1, 0
    cola = glue_metrics("cola", logits, [0, 1, 0, 0])
    assert cola["accuracy"] == 0.75 and cola["score"] == cola["matthews_correlation"]
    assert cola["matthews_correlation"] == pytest.approx(0.5773502691896258)
    mrpc = glue_metrics("mrpc", logits, [0, 1, 0, 0])
    assert mrpc["f1"] == pytest.approx(2 / 3) and mrpc["score"] == pytest.approx((0.75 + 2 / 3) / 2)
    stsb = glue_metrics("stsb", [[0.1], [0.2], [0.4], [0.3]], [1.0, 2.0, 3.0, 4.0])
    assert stsb["spearmanr"] == pytest.approx(0.8) and stsb["score"] == pytest.approx(
        (stsb["pearson"] + 0.8) / 2
    )
    assert "accuracy" not in stsb
    assert glue_metrics("mnli", [[0, 0, 1.0]], [2]) == {"accuracy": 1.0, "score": 1.0}


def test_validation_rows_are_held_out_of_train_as_fusion_bench_draws_them(glue_standins):
    from datasets import Dataset
    from fusion_bench.utils.data import train_validation_split

    from fusion_bench_ace.taskpools.data import holdout
    from fusion_bench_ace.taskpools.glue import load_glue_split

    data = Dataset.from_dict({"x": list(range(50))})
    theirs = train_validation_split(data, 0.1, None, 0, "val")  # FusionBench's val configs
    assert holdout(data, 0.1, 0)["x"] == [data[i]["x"] for i in theirs.indices] and len(theirs) == 5
    assert len(holdout(Dataset.from_dict({"x": [1, 2, 3]}), 0.1, 0)) == 1  # at least one row
    with pytest.raises(ValueError, match="fraction"):
        holdout(data, 1.5, 0)
    glue = str(glue_standins / "nyu-mll" / "glue")
    validation = {"split": "train", "fraction": 0.1, "seed": 0}
    held_out = load_glue_split("rte", path=glue, validation=validation)
    train = load_glue_split("rte", "train", path=glue)
    assert len(held_out) == 1 and held_out[0] in [train[i] for i in range(len(train))]
    with pytest.raises(ValueError, match="missing"):
        load_glue_split("rte", path=glue, validation={"split": "train"})


def test_gpt2_glue_is_tokenized_as_fusion_bench_does(glue_standins):
    from fusion_bench.dataset.gpt2_glue import mrpc_tokenize_function

    from fusion_bench_ace.taskpools.data import load_hf_dataset
    from fusion_bench_ace.taskpools.glue import _gpt2_tokenizer, load_gpt2_glue

    glue = str(glue_standins / "nyu-mll" / "glue")
    gpt2 = str(glue_standins / "openai-community" / "gpt2")
    ours = load_gpt2_glue("rte", "validation", path=glue, tokenizer=gpt2)
    raw = load_hf_dataset(glue, split="validation", name="rte")
    tokenizer = _gpt2_tokenizer(gpt2)
    theirs = raw.map(lambda b: mrpc_tokenize_function(b, tokenizer), batched=True,
                     remove_columns=["sentence1", "sentence2"])
    assert ours.column_names == theirs.column_names and "label" in ours.column_names
    assert ours["input_ids"] == theirs["input_ids"] and len(ours[0]["input_ids"]) == 512


# --- (c) the papers' numbers ----------------------------------------------------------------------


def paper_table() -> dict:
    return yaml.safe_load(PAPER_NUMBERS.read_text())


def test_paper_numbers_match_the_benchmarks():
    table = paper_table()
    for name in PAPER_BENCHMARKS:
        spec = load_benchmark(name)
        assert spec["paper"] == name and name in table, name
        entries = table[name]["rows"]
        assert entries and table[name]["source"]
        for entry in entries:
            assert (
                entry["source"] and entry["method"] and isinstance(entry["average"], (int, float))
            )
            if "scores" in entry:
                assert list(entry["scores"]) == spec["tasks"], (name, entry["method"])
        rows = paper_rows(spec)
        assert len(rows) == len(entries)
        # every paper table of ACE-Merging has its row; NAN's Table 2 has NAN's rows
        expected = "TA + NAN" if name == "llama2_13b_wizard2" else "ACE-Merging"
        assert any(r.name == expected for r in rows), name
    assert set(table) - set(PAPER_BENCHMARKS) == {"symerge_glue8_unnamed_model"}
    assert list(table["symerge_glue8_unnamed_model"]["rows"][0]["scores"]) == RB_TASKS


def test_paper_averages_recompute_except_the_documented_typos():
    inconsistent = set()
    for key, block in paper_table().items():
        for entry in block["rows"]:
            if "scores" not in entry:
                continue
            mean = sum(entry["scores"].values()) / len(entry["scores"])
            if abs(mean - entry["average"]) > 0.15:
                assert entry.get("average_inconsistent") is True, (key, entry["method"])
                inconsistent.add(
                    (
                        key.replace("openclip_", "clip_"),
                        entry["method"],
                        " ".join(entry["source"].split()[:3]),
                    )
                )
            else:
                assert "average_inconsistent" not in entry, (key, entry["method"])
    assert inconsistent == DOCUMENTED_INCONSISTENT


def _md_tables(text: str):
    """Markdown tables of a document as lists of cell rows (header first)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                current.append(
                    [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
                )
        elif current:
            tables.append(current)
            current = []
    return tables


def _value(cell: str) -> float:
    return float(cell.split("±")[0])


LLM_PAPER_TABLES_MD = REPO / "docs" / "llm.md"


def test_llm_paper_numbers_are_the_documented_tables():
    """ACE Tables 8-9 and NAN Table 2, as docs/llm.md prints them (copied from the papers)."""
    tables = _md_tables(LLM_PAPER_TABLES_MD.read_text())

    def pick(first_cell):
        (hit,) = [t for t in tables if t[0][0] == first_cell]
        return {row[0]: [_value(c) if c else None for c in row[1:]] for row in hit[1:]}

    table8, table9 = pick("ACE Table 8 (raw)"), pick("ACE Table 9 (normalised %)")
    nan2 = pick("NAN Table 2")
    names = {"Average": "Average", "Task Arithmetic": "Task Arithmetic",
             "ACE-Merging": "ACE (ours)"}
    for row in paper_table()["llama32_3b_mergebench3"]["rows"]:
        cells = list(row["scores"].values())
        if row["method"] == "Individual":  # Table 8's expert rows, each on its tasks
            experts = ["multilingual", "multilingual", "math", "coding", "coding"]
            assert cells == [table8[e][i] for i, e in enumerate(experts)]
        elif row.get("scale") == "normalised":
            assert table9[names[row["method"]]] == cells + [row["average"]]
        else:
            assert table8[names[row["method"]]] == cells
        if row.get("average_computed"):
            assert row["average"] == pytest.approx(sum(cells) / len(cells), abs=5e-4)
    for row in paper_table()["llama2_13b_wizard2"]["rows"]:
        assert nan2[row["method"]] == [*row["scores"].values(), row["average"]]


def test_paper_numbers_are_the_documented_tables():
    table = paper_table()
    tables = _md_tables(PAPER_TABLES_MD.read_text())

    def pick(*header):
        (hit,) = [t for t in tables if t[0][: len(header)] == list(header)]
        return hit

    def find(key, method, source):
        hits = [
            r
            for r in table[key]["rows"]
            if r["method"] == method and r["source"].startswith(source)
        ]
        assert len(hits) == 1, (key, method, source)
        return hits[0]

    settings = {
        "B/32-8": "b32_ta8",
        "B/32-14": "b32_tall14",
        "B/32-20": "b32_tall20",
        "B/16-8": "b16_ta8",
        "B/16-14": "b16_tall14",
        "B/16-20": "b16_tall20",
        "L/14-8": "l14_ta8",
        "L/14-14": "l14_tall14",
        "L/14-20": "l14_tall20",
    }
    checked = 0
    # ACE Table 1 and SyMerge's table: averages only
    for header, *rows in (
        pick("Method", "B/32-8", "B/32-14", "B/32-20", "B/16-8"),
        pick("Method", "B/32-8", "B/32-14", "B/32-20", "L/14-8"),
    ):
        source = "ACE-Merging Table 1" if "B/16-8" in header else "SyMerge"
        for row in rows:
            for col, cell in zip(header[1:], row[1:]):
                assert find(f"clip_vit_{settings[col]}", row[0], source)["average"] == _value(cell)
                checked += 1
    # per-task tables: NAN Table 1, ACE Tables 2 and 3
    key = "clip_vit_b32_ta8"
    per_task = []
    for row in pick("ViT-B/32", "SUN")[1:]:
        if row[0] == "ViT-L/14":
            key = "clip_vit_l14_ta8"
        else:
            per_task.append((key, row[0], "NAN Table 1", row[1:]))
    for row in pick("Method", "CoLA", "MNLI")[1:]:
        per_task.append(("gpt2_glue7", row[0], "ACE-Merging Table 2", row[1:]))
    for row in pick("Model / Method", "CoLA", "SST-2")[1:]:
        size, method = row[0].split(": ", 1)
        per_task.append((f"roberta_{size.lower()}_glue8", method, "ACE-Merging Table 3", row[1:]))
    for key, method, source, cells in per_task:
        entry = find(key, method, source)
        assert list(entry["scores"].values()) + [entry["average"]] == [_value(c) for c in cells]
        checked += 1
    assert checked == 9 * 10 + 6 * 15 + (12 + 5) + 10 + 16
    # Table 7's two-decimal ACE averages (text, not a table)
    text = PAPER_TABLES_MD.read_text()
    for key in settings.values():
        value = find(f"clip_vit_{key}", "ACE-Merging", "ACE-Merging Table 7")["average"]
        assert f"{value:.2f}" in text


# --- open_clip: FusionBench's pools, as our configs use them ------------------------------------


def test_openclip_pool_reads_the_task_vectors_layout(tmp_path, monkeypatch):
    """Our re-export imports on Python 3.11 and reads pickled encoders (torch >= 2.6) and heads.

    open_clip's OpenAI weights are not reachable here, so the encoder is built randomly initialised.
    """
    import open_clip
    import torch
    from fusion_bench.models.open_clip import ClassificationHead, ImageClassifier, ImageEncoder
    from fusion_bench.utils import instantiate
    from omegaconf import OmegaConf

    real = open_clip.create_model_and_transforms
    monkeypatch.setattr(
        open_clip,
        "create_model_and_transforms",
        lambda name, pretrained=None, **kw: real(name, pretrained=None, **kw),
    )
    torch.manual_seed(0)
    encoder = ImageEncoder("ViT-B-32")
    (tmp_path / "ViT-B-32" / "SUN397").mkdir(parents=True)
    torch.save(encoder, tmp_path / "ViT-B-32" / "SUN397" / "finetuned.pt")
    os.link(
        tmp_path / "ViT-B-32" / "SUN397" / "finetuned.pt", tmp_path / "ViT-B-32" / "zeroshot.pt"
    )
    torch.save(
        ClassificationHead(True, torch.randn(397, 512)), tmp_path / "ViT-B-32" / "head_SUN397.pt"
    )

    config = OmegaConf.load(CONFIG / "modelpool" / "ace_paper" / "openclip_ViT-B-32_TA8.yaml")
    with patched_environ({"FUSION_BENCH_ACE_OPENCLIP_DIR": str(tmp_path)}):
        OmegaConf.resolve(config)
    pool = instantiate(config, _recursive_=False)
    loaded = pool.load_model("sun397")
    assert type(pool).__module__ == "fusion_bench_ace.taskpools.openclip"
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert pool._test_processor is loaded.val_preprocess  # what the task pool will use
    # OpenAI's activation (the checkpoints are fine-tuned OpenAI CLIPs), not open_clip's GELU
    activations = {type(m).__name__ for m in loaded.modules() if type(m).__name__.endswith("GELU")}
    assert activations == {"QuickGELU"}
    head = pool.load_classification_head("sun397")
    logits = ImageClassifier(loaded, head)(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 397)
