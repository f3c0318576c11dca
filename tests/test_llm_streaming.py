"""Causal LMs: the merge written tensor by tensor into a checkpoint directory equals the in-memory
merge bit for bit, loads with ``from_pretrained``, and bad input fails clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_llama import build_tiny_llama_pool
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_bench_ace import ACEMerging
from fusion_bench_ace.algorithms.nan import TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm
from fusion_bench_ace.engine.io.writer import ShardedSafetensorsWriter, TensorSpec, parse_size

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))
LLM_EXCLUDES = [".*embed_tokens.*", ".*lm_head.*"]


def causal_lm_pool(config: dict):
    from fusion_bench.modelpool import CausalLMPool

    return CausalLMPool(**{k: v for k, v in OmegaConf.create(config).items() if k != "_target_"})


def ace(**kwargs) -> ACEMerging:
    return ACEMerging(diagnostics=False, **kwargs)


def checkpoint_tensors(directory: Path) -> dict:
    files = sorted(directory.glob("*.safetensors"))
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def bf16_pool(tmp_path_factory):
    return build_tiny_llama_pool(tmp_path_factory.mktemp("llama_bf16"), max_shard_size="4KB")


@pytest.fixture(scope="module")
def tied_pool(tmp_path_factory):
    return build_tiny_llama_pool(tmp_path_factory.mktemp("llama_tied"), dtype=torch.float32,
                                 tie=True)


METHODS = {  # every per-tensor method of the plugin, as configured for an LLM
    "ace": lambda **kw: ace(**kw),
    "ace_llama": lambda **kw: ace(exclude_keys=LLM_EXCLUDES, **kw),
    "task_arithmetic_nan": lambda **kw: TaskArithmeticNANAlgorithm(**kw),
    "task_arithmetic_nan_layer": lambda **kw: TaskArithmeticNANAlgorithm(
        granularity="layer", **kw),
    "ties_merging_nan": lambda **kw: TiesMergingNANAlgorithm(**kw),
    "ties_merging_nan_layer_mean": lambda **kw: TiesMergingNANAlgorithm(
        granularity="layer", merge_func="mean", remove_keys=LLM_EXCLUDES, **kw),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_checkpoint_is_the_in_memory_merge_bit_for_bit(bf16_pool, tmp_path, method):
    assert (Path(bf16_pool["models"]["math"]) / "model.safetensors.index.json").is_file()
    target = tmp_path / "merged"
    streamed = METHODS[method](streaming="true")
    assert streamed.merge_to_checkpoint(causal_lm_pool(bf16_pool), target, max_shard_size="3KB")
    algorithm = METHODS[method](streaming="false")
    in_memory = algorithm.run(causal_lm_pool(bf16_pool))
    expected = in_memory.state_dict()
    assert next(in_memory.parameters()).dtype == torch.bfloat16
    if method.startswith("ace"):  # same layers, same branches (visited in each one's order)
        assert sorted(streamed.layer_info, key=lambda r: r["name"]) == \
            sorted(algorithm.layer_info, key=lambda r: r["name"])
    else:  # the same coefficients, whatever order the parameters were read in
        assert streamed.coefficients.to_dict()["alpha"] == algorithm.coefficients.to_dict()["alpha"]

    written = checkpoint_tensors(target)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == torch.bfloat16, name
        assert torch.equal(written[name], tensor), name


def test_sharded_output_loads_with_from_pretrained(bf16_pool, tmp_path):
    target = tmp_path / "merged"
    assert ace(exclude_keys=LLM_EXCLUDES).merge_to_checkpoint(
        causal_lm_pool(bf16_pool), target, max_shard_size="3KB")
    names = sorted(p.name for p in target.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(n.startswith("model-000") for n in shards)
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json",
            "generation_config.json"} <= set(names)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    sizes = [os.path.getsize(target / s) for s in shards]
    assert index["metadata"]["total_size"] < sum(sizes)  # headers come on top
    for shard in shards:  # every shard within the limit, except a tensor larger than it
        with safe_open(target / shard, "pt") as handle:
            keys = list(handle.keys())
            data = sum(handle.get_tensor(k).numel() * 2 for k in keys)
        assert data <= parse_size("3KB") or len(keys) == 1

    model = AutoModelForCausalLM.from_pretrained(target, torch_dtype="auto")
    assert model.dtype == torch.bfloat16
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    written = checkpoint_tensors(target)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in written.items())
    tokenizer = AutoTokenizer.from_pretrained(target)
    ids = tokenizer("tom has 3 apples", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits.float()).all()
    # excluded tensors are the pretrained ones, untouched
    pretrained = AutoModelForCausalLM.from_pretrained(bf16_pool["models"]["_pretrained_"],
                                                      torch_dtype=torch.bfloat16)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(written[name], pretrained.state_dict()[name])


@pytest.mark.parametrize("torch_dtype, expected", [(None, torch.float32),
                                                    ("float16", torch.float16)])
def test_the_checkpoint_has_the_dtype_the_pool_loads_models_in(bf16_pool, tmp_path, torch_dtype,
                                                               expected):
    config = {**bf16_pool, "model_kwargs": {} if torch_dtype is None else
              {"torch_dtype": torch_dtype}}
    assert ace().merge_to_checkpoint(causal_lm_pool(config), tmp_path / "merged")
    written = checkpoint_tensors(tmp_path / "merged")
    assert {t.dtype for t in written.values()} == {expected}
    # as from_pretrained with that torch_dtype, then merged in memory
    in_memory = ace(streaming="false").run(causal_lm_pool(config)).state_dict()
    assert all(torch.equal(written[k], in_memory[k]) for k in written)


def test_torch_dtype_auto_is_the_checkpoints_own(bf16_pool):
    from fusion_bench import BaseModelPool

    from fusion_bench_ace.algorithms.common import pool_torch_dtype

    path = bf16_pool["models"]["_pretrained_"]
    entry = {"_target_": "transformers.AutoModelForCausalLM.from_pretrained",
             "pretrained_model_name_or_path": path, "torch_dtype": "auto"}
    pool = BaseModelPool(OmegaConf.create({"_pretrained_": entry}))
    assert pool_torch_dtype(pool, "_pretrained_", path) == torch.bfloat16


def test_tied_embeddings_stay_tied(tied_pool, tmp_path):
    target = tmp_path / "merged"
    assert ace(streaming="true").merge_to_checkpoint(causal_lm_pool(tied_pool), target)
    written = checkpoint_tensors(target)
    assert "lm_head.weight" not in written  # stored once, as save_pretrained does
    in_memory = ace(streaming="false").run(causal_lm_pool(tied_pool))
    assert in_memory.lm_head.weight is in_memory.model.embed_tokens.weight
    for name, tensor in written.items():
        assert torch.equal(tensor, in_memory.state_dict()[name]), name
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(loaded.lm_head.weight, in_memory.lm_head.weight)


def test_tied_weights_planned_differently_are_an_error(tied_pool):
    with pytest.raises(ValueError, match="tied"):
        ace(streaming="false", exclude_keys=[".*lm_head.*"]).run(causal_lm_pool(tied_pool))


def test_the_merge_is_written_into_the_pretrained_models_own_tensors(bf16_pool):
    pool = causal_lm_pool(bf16_pool)
    original = pool.load_pretrained_model()
    pointers = {}

    class Pool(type(pool)):
        def load_pretrained_model(self, *args, **kwargs):
            model = super().load_pretrained_model(*args, **kwargs)
            pointers.update({k: v.data_ptr() for k, v in model.state_dict().items()})
            return model

    pool.__class__ = Pool
    merged = ace(exclude_keys=LLM_EXCLUDES).run(pool)
    assert {k: v.data_ptr() for k, v in merged.state_dict().items()} == pointers
    changed = [k for k, v in merged.state_dict().items()
               if not torch.equal(v, original.state_dict()[k])]
    assert "model.layers.0.mlp.up_proj.weight" in changed
    assert "model.embed_tokens.weight" not in changed


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def added_tokens_pool(tmp_path_factory):
    return build_tiny_llama_pool(tmp_path_factory.mktemp("llama_vocab"),
                                 expert_vocab={"coding": 72})


@pytest.mark.parametrize("streaming", ["true", "false"])
def test_vocabulary_mismatch_names_the_tensor_unless_excluded(added_tokens_pool, tmp_path,
                                                              streaming):
    pool = causal_lm_pool(added_tokens_pool)
    merge = (lambda a: a.merge_to_checkpoint(pool, tmp_path / "out")) if streaming == "true" \
        else (lambda a: a.run(pool))
    with pytest.raises(ValueError) as error:
        merge(ace(streaming=streaming))
    message = str(error.value)
    assert "expert 'coding'" in message and "model.embed_tokens.weight" in message
    assert "(72, 16) vs pretrained (64, 16)" in message and "exclude" in message
    assert not (tmp_path / "out").exists()
    assert merge(ace(streaming=streaming, exclude_keys=LLM_EXCLUDES))


@pytest.mark.parametrize("cls", [TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm])
def test_nan_merges_experts_with_added_tokens_when_those_are_removed(added_tokens_pool, cls):
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        cls().run(causal_lm_pool(added_tokens_pool))
    merged = cls(remove_keys=["model.embed_tokens.weight", "lm_head.weight"]).run(
        causal_lm_pool(added_tokens_pool))
    assert merged.model.embed_tokens.weight.shape == (64, 16)


def test_an_existing_target_directory_is_refused(bf16_pool, tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        ace().merge_to_checkpoint(causal_lm_pool(bf16_pool), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_an_interrupted_write_leaves_nothing_from_pretrained_accepts(bf16_pool, tmp_path,
                                                                     monkeypatch):
    written = []
    real_write = ShardedSafetensorsWriter.write

    def write_then_die(self, name, tensor):
        real_write(self, name, tensor)
        written.append(name)
        if len(written) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ace().merge_to_checkpoint(causal_lm_pool(bf16_pool), tmp_path / "merged",
                                  max_shard_size="3KB")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_write_leaves_no_config(bf16_pool, tmp_path, monkeypatch):
    """Killed mid-write (no cleanup runs), the staged directory has shards but no config.json."""
    import fusion_bench_ace.algorithms.base as base_adapter

    monkeypatch.setattr(base_adapter, "write_model_files", lambda *a: (_ for _ in ()).throw(
        SystemExit("killed")))
    monkeypatch.setattr("fusion_bench_ace.atomic._remove", lambda path: None)
    with pytest.raises(SystemExit):
        ace().merge_to_checkpoint(causal_lm_pool(bf16_pool), tmp_path / "merged")
    (staging,) = tmp_path.iterdir()
    assert staging.name.startswith(".merged.saving-")
    partial = staging / "merged"
    assert list(partial.glob("*.safetensors")) and not (partial / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # no config.json: not a checkpoint
        AutoModelForCausalLM.from_pretrained(partial)


def test_the_writer_checks_order_shapes_and_completeness(tmp_path):
    specs = [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.bfloat16)]
    writer = ShardedSafetensorsWriter(tmp_path, specs)
    with pytest.raises(ValueError, match="expected tensor 'a' next"):
        writer.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(3, 2))
    writer.write("a", torch.arange(6.0).view(2, 3))
    with pytest.raises(ValueError, match="not written"):
        writer.finish()
    writer.write("b", torch.ones(4, dtype=torch.bfloat16))
    assert writer.finish() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["a"], torch.arange(6.0).view(2, 3))
    assert torch.equal(loaded["b"], torch.ones(4, dtype=torch.bfloat16))
    for bad in ("", "5XB", 0, -1, True):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20


# --- NAN on a CausalLMPool, in memory ----------------------------------------------------------


@pytest.mark.parametrize("cls", [TaskArithmeticNANAlgorithm, TiesMergingNANAlgorithm])
def test_nan_methods_merge_a_causal_lm_pool(bf16_pool, cls):
    merged = cls().run(causal_lm_pool(bf16_pool))
    assert next(merged.parameters()).dtype == torch.bfloat16
    pretrained = causal_lm_pool(bf16_pool).load_pretrained_model()
    changed = sum(not torch.equal(v, pretrained.state_dict()[k])
                  for k, v in merged.state_dict().items())
    assert changed > 0
    assert all(torch.isfinite(v.float()).all() for v in merged.state_dict().values())


# --- the command -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ace_llama", "task_arithmetic_nan", "ties_merging_nan"])
def test_fusion_bench_streams_the_merge_to_disk_without_a_task_pool(bf16_pool, tmp_path, method):
    config_dir = tmp_path / "config" / "modelpool"
    config_dir.mkdir(parents=True)
    (config_dir / "tiny_llama_test.yaml").write_text(json.dumps(bf16_pool))
    target = tmp_path / "out" / "merged"
    command = [FUSION_BENCH, "--config-name", "ace_model_fusion", "--config-dir",
               str(tmp_path / "config"), f"method={method}", "modelpool=tiny_llama_test",
               "~taskpool", f"path.log_dir={tmp_path / 'log'}", f"merged_model_save_path={target}",
               "+merged_model_save_kwargs.max_shard_size=3KB"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "wrote the merged model to" in done.stdout + done.stderr
    assert (target / "model.safetensors.index.json").is_file()
    expected = METHODS[method]().run(causal_lm_pool(bf16_pool)).state_dict()
    written = checkpoint_tensors(target)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    stats = json.loads((tmp_path / "log" / "merge_stats.json").read_text())
    assert stats["merge_seconds"] > 0
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr


def test_the_checkpoint_io_imports_neither_fusion_bench_nor_transformers():
    code = ("import json, sys; import fusion_bench_ace.engine.io.writer, "
            "fusion_bench_ace.engine.io.reader, fusion_bench_ace.engine.driver; "
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "fusion_bench" not in loaded and "transformers" not in loaded
