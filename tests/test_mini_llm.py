"""The embedded LLM track: task generators, greedy exact match, a reduced build, FusionBench
loads, merges and scores it offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_bench_ace.mini import build, track_path
from fusion_bench_ace.mini.llm_tasks import (
    EXPERTS,
    LANGUAGES,
    PROMPT_END,
    TASKS,
    make_splits,
    pretraining_corpus,
)
from fusion_bench_ace.taskpools.generation import greedy_exact_match

from conftest import assert_same_safetensors, patched_environ

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))
SIZES = {"train": 40, "validation": 10, "test": 20}


def run_cli(args, env, cwd):
    return subprocess.run([FUSION_BENCH, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=900)


# --- generators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_deterministic_and_disjoint(name):
    splits = make_splits(TASKS[name], 0, SIZES)
    assert splits == make_splits(TASKS[name], 0, SIZES)
    assert splits != make_splits(TASKS[name], 1, SIZES)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    prompts = [{e.prompt for e in split} for split in splits.values()]
    assert sum(len(p) for p in prompts) == len(set().union(*prompts))
    assert all(e.prompt.endswith(PROMPT_END) and e.answer for s in splits.values() for e in s)


def test_answers_are_what_the_prompts_ask_for():
    import random

    rng = random.Random(3)
    for _ in range(50):
        example = TASKS["word_problems"].generate(rng)
        numbers = [int(w) for w in example.prompt.split() if w.isdigit()]
        sign = "+" if "+" in example.answer else "-"
        result = numbers[0] + numbers[1] if sign == "+" else numbers[0] - numbers[1]
        # two-digit numbers, digit by digit: no carrying, no borrowing
        first, second = divmod(numbers[0], 10), divmod(numbers[1], 10)  # (tens, units)
        assert all(10 <= n <= 99 for n in numbers) and 0 <= result <= 99
        for digit in (0, 1):
            if sign == "+":
                assert first[digit] + second[digit] <= 9
            else:
                assert first[digit] >= second[digit]
        assert example.answer == f"{numbers[0]} {sign} {numbers[1]} = {result} . the answer is " \
                                 f"{result}"
        language = LANGUAGES["lang_b"]
        qa = TASKS["qa_lang_b"].generate(rng)
        # the answer is a word of the context, in language B
        assert qa.answer in qa.prompt.split(" question :")[0].split()
        assert qa.answer in language.lexicon.values()


MARKERS = (PROMPT_END, "context :", "question :", "problem :")


def test_the_pretraining_corpus_holds_the_skills_in_raw_form():
    corpus = pretraining_corpus(0, 500)
    assert corpus == pretraining_corpus(0, 500) and corpus != pretraining_corpus(1, 500)
    assert not any(marker in doc for doc in corpus for marker in MARKERS)
    words = set(" ".join(corpus).split())
    assert set(LANGUAGES["lang_a"].lexicon.values()) <= words
    assert set(LANGUAGES["lang_b"].lexicon.values()) <= words


def test_a_share_of_the_corpus_is_formatted_task_examples_but_no_split_prompt():
    raw = pretraining_corpus(0, 2000)
    excluded = {e.prompt for t in TASKS.values() for s in make_splits(t, 0, SIZES).values()
                for e in s}
    shares = {"qa_lang_a": 0.02, "qa_lang_b": 0.02, "word_problems": 0.03,
              "code_completion": 0.03}
    corpus = pretraining_corpus(0, 2000, shares, exclude=excluded)
    formatted = [doc for doc in corpus if PROMPT_END in doc]
    assert 150 <= len(formatted) <= 250  # about 10 % of 2000
    # every other document is the raw corpus's, in its order (its own random stream)
    assert [doc for doc in corpus if PROMPT_END not in doc] == raw[:len(corpus) - len(formatted)]
    for doc in formatted:
        prompt, answer = doc.split(f" {PROMPT_END} ")
        assert f"{prompt} {PROMPT_END}" not in excluded and answer
    assert {doc.split()[0] for doc in formatted} == {"context", "problem", "#"}  # every kind


@pytest.mark.parametrize("shares", [{"qa_lang_c": 0.1}, {"qa_lang_a": -0.1},
                                    {"qa_lang_a": 0.6, "word_problems": 0.6}])
def test_bad_pretraining_shares_are_refused(shares):
    with pytest.raises(ValueError, match="shares"):
        pretraining_corpus(0, 10, shares)


def test_the_experts_mirror_ace_table_8():
    assert EXPERTS == {"multilingual": ["qa_lang_a", "qa_lang_b"], "math": ["word_problems"],
                       "coding": ["code_completion"]}


# --- greedy exact match --------------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Generates a fixed continuation per prompt length (stands in for a causal LM)."""

    def __init__(self, continuations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            assert bool(mask[-1]) and (mask.cumsum(0) > 0).sum() == mask.sum()  # left padded
            extra = self.continuations[int(mask.sum())][:max_new_tokens]
            rows.append(ids.tolist() + extra + [kwargs["pad_token_id"]] * (max_new_tokens
                                                                         - len(extra)))
        return torch.tensor(rows)


def test_exact_match_counts_whole_completions_cut_at_eos(tmp_path):
    from tiny_llama import save_tokenizer
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    prompts = ["tom", "tom has", "la casa es", "tom has 3 apples"]
    answers = ["3 apples", "apples", "grande", "( a , b )"]
    lengths = [1 + len(encode(p)) for p in prompts]
    assert len(set(lengths)) == len(lengths)
    continuations = {
        lengths[0]: encode("3 apples") + [eos] + encode("junk"),  # right, then stops
        lengths[1]: encode("apples and"),  # no eos: more than the answer
        lengths[2]: encode("grande") + [eos],  # right
        lengths[3]: encode("( a , b"),  # a prefix only
    }
    result = greedy_exact_match(ScriptedModel(continuations), tokenizer, prompts, answers,
                                max_new_tokens=8, batch_size=3)
    assert result == {"accuracy": 0.5, "num_samples": 4}


# --- build ---------------------------------------------------------------------------------------


def test_reduced_build_is_complete(reduced_llm_env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with patched_environ(reduced_llm_env):
        root = Path(track_path("llm"))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["size"] == "reduced" and manifest["tasks"] == list(TASKS)
    assert manifest["experts"] == EXPERTS
    metrics = manifest["metrics"]
    assert set(metrics["exact_match"]) == {"pretrained", "simple_average",
                                           *(f"expert/{e}" for e in EXPERTS)}
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    ids = tokenizer.encode("12 + 3", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["1", "2", "+", "3"]
    assert "<unk>" not in tokenizer.convert_ids_to_tokens(
        tokenizer.encode(TASKS["qa_lang_a"].generate(__import__("random").Random(0)).prompt))
    for part in ["pretrained", *(f"experts/{e}" for e in EXPERTS)]:
        model = AutoModelForCausalLM.from_pretrained(root / part)
        assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    for task in TASKS:
        for split in ("train", "validation", "test"):
            assert (root / "data" / task / split / "dataset_info.json").is_file()
    assert set(json.loads((root / "tasks.json").read_text())) == set(TASKS)


def test_build_is_deterministic(reduced_llm_env, tmp_path):
    with patched_environ({**reduced_llm_env, "FUSION_BENCH_ACE_CACHE": str(tmp_path)}):
        build(["llm"], progress=False)
        second = Path(track_path("llm"))
    with patched_environ(reduced_llm_env):
        first = Path(track_path("llm"))
    assert_same_safetensors(first, second, ["pretrained", *(f"experts/{e}" for e in EXPERTS)])
    assert (first / "tokenizer" / "tokenizer.json").read_bytes() == \
        (second / "tokenizer" / "tokenizer.json").read_bytes()


def test_regime_statistics_of_the_built_track(reduced_llm_env, tmp_path):
    """``mini stats --track llm`` measures the built track (one "task" per expert: its tasks'
    mean exact match) against config/mini/regime.yaml's llm ranges; numbers checked against the
    build's own measurements and the checkpoints."""
    from safetensors.torch import load_file

    from fusion_bench_ace.mini.__main__ import main

    with patched_environ(reduced_llm_env):
        assert main(["stats", "--track", "llm", "--out", str(tmp_path)]) == 0
        root = Path(track_path("llm"))
    stats = json.loads((tmp_path / "regime.json").read_text())
    manifest = json.loads((root / "manifest.json").read_text())
    assert stats["info"]["content_hash"] == manifest["content_hash"]
    assert stats["tasks"] == list(EXPERTS)
    measured = manifest["metrics"]["exact_match"]
    for expert, tasks in EXPERTS.items():
        mean = lambda row: sum(measured[row][t] for t in tasks) / len(tasks)  # noqa: E731
        assert stats["accuracy"]["zero_shot"][expert] == pytest.approx(mean("pretrained"))
        assert stats["accuracy"]["expert"][expert] == pytest.approx(mean(f"expert/{expert}"))
    theta = load_file(root / "pretrained" / "model.safetensors")
    tau = {k: v - theta[k] for k, v in load_file(root / "experts/math/model.safetensors").items()}
    norm = lambda sd: float(torch.cat([v.double().flatten() for v in sd.values()]).norm())  # noqa: E731
    assert stats["geometry"]["relative_norm"]["math"] == pytest.approx(norm(tau) / norm(theta))
    assert {row["target"] for row in stats["targets"]} >= {
        "expert gain over zero-shot (points)", "simple average / expert average"}
    assert "Against the real regime" in (tmp_path / "regime.md").read_text()


# --- through FusionBench -------------------------------------------------------------------------


def test_fusion_bench_pretrained_matches_the_build(reduced_llm_env, tmp_path):
    result = run_cli(["method=dummy", "modelpool=ace_mini_llm", "taskpool=ace_mini_llm",
                      f"path.log_dir={tmp_path}/dummy"], reduced_llm_env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "dummy" / "program_report.json").read_text())
    with patched_environ(reduced_llm_env):
        manifest = json.loads((Path(track_path("llm")) / "manifest.json").read_text())
    measured = manifest["metrics"]["exact_match"]["pretrained"]
    for task in TASKS:
        assert report[task]["accuracy"] == pytest.approx(measured[task], abs=1e-9)
        assert report[task]["num_samples"] == manifest["settings"]["test_size"]


def test_ace_llama_merges_and_scores_through_fusion_bench(reduced_llm_env, tmp_path):
    """The whole command (FusionBench's CausalLMPool, ACE, our task pool) scores the merged model
    as an in-process ACE merge scored directly does (streaming to disk: test_llm_streaming)."""
    import datasets
    from fusion_bench.modelpool import CausalLMPool
    from transformers import AutoTokenizer

    from fusion_bench_ace import ACEMerging

    result = run_cli(["method=ace_llama", "modelpool=ace_mini_llm", "taskpool=ace_mini_llm",
                      f"path.log_dir={tmp_path}/ace"], reduced_llm_env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "ace" / "program_report.json").read_text())

    with patched_environ(reduced_llm_env):
        root = Path(track_path("llm"))
    pool = CausalLMPool(models={"_pretrained_": str(root / "pretrained"),
                                **{e: str(root / "experts" / e) for e in EXPERTS}},
                        tokenizer=str(root / "tokenizer"))
    merged = ACEMerging(exclude_keys=[".*embed_tokens.*", ".*lm_head.*"], average_keys=[],
                        diagnostics=False, streaming="false").run(pool)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    settings = json.loads((root / "manifest.json").read_text())["settings"]
    for task in TASKS:
        test = datasets.load_from_disk(str(root / "data" / task / "test"))
        expected = greedy_exact_match(merged, tokenizer, test["prompt"], test["answer"],
                                      max_new_tokens=settings["max_new_tokens"],
                                      batch_size=settings["eval_batch_size"])
        assert report[task] == pytest.approx(expected, abs=1e-12)
