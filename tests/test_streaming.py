"""Streaming the experts from safetensors gives the in-memory merge bit for bit."""

import json

import pytest
import torch
from fusion_bench import BaseModelPool
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2Model

from fusion_bench_ace import ACEMerging
from fusion_bench_ace.algorithms.common import load_pool_experts
from fusion_bench_ace.engine.driver import stacked_task_vectors
from fusion_bench_ace.engine.io.reader import (
    SafetensorsStateDict,
    match_keys,
    open_expert,
    safetensors_files,
)

from tiny_gpt2 import TASKS, build_tiny_gpt2_pool


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gpt2_stream")
    config_dir = build_tiny_gpt2_pool(root)
    config = json.loads((config_dir / "modelpool" / "tiny_gpt2_test.yaml").read_text())
    return root, config


def make_pool(config):
    # the backbones (GPT2Model) of GPT2ForSequenceClassification checkpoints: keys under
    # "transformer."
    return BaseModelPool(OmegaConf.create(config["models"]))


def merge(config, streaming, **kwargs):
    algorithm = ACEMerging(eps=4e-2, diagnostics=False, streaming=streaming, **kwargs)
    return algorithm.run(make_pool(config)).state_dict()


@pytest.mark.parametrize("transpose", [False, True])
def test_streaming_is_bit_identical(tiny_pool, transpose):
    _, config = tiny_pool
    streamed = merge(config, "true", transpose_conv1d=transpose)
    in_memory = merge(config, "false", transpose_conv1d=transpose)
    assert streamed.keys() == in_memory.keys()
    for name in in_memory:
        assert streamed[name].dtype == in_memory[name].dtype
        assert torch.equal(streamed[name], in_memory[name]), name


def test_auto_streams_checkpoints_and_reads_lazily(tiny_pool):
    _, config = tiny_pool
    pretrained_model, experts, streamed = load_pool_experts(make_pool(config), "auto")
    assert streamed
    assert set(experts) == set(TASKS)
    state = next(iter(experts.values()))
    assert isinstance(state, SafetensorsStateDict)
    assert state.reads == 0  # nothing read until asked
    name = "h.0.attn.c_attn.weight"
    assert torch.equal(
        state[name],
        GPT2Model.from_pretrained(
            config["models"]["alpha"]["pretrained_model_name_or_path"]
        ).state_dict()[name],
    )
    assert state.reads == 1


def test_auto_falls_back_for_models_built_in_memory(tiny_pool):
    _, config = tiny_pool
    models = {
        name: GPT2Model.from_pretrained(entry["pretrained_model_name_or_path"])
        for name, entry in config["models"].items()
    }
    pool = BaseModelPool(models)
    _, experts, streamed = load_pool_experts(pool, "auto")
    assert not streamed and all(isinstance(s, dict) for s in experts.values())
    with pytest.raises(ValueError, match="streaming=true"):
        load_pool_experts(BaseModelPool(models), "true")
    merged = ACEMerging(eps=4e-2, diagnostics=False).run(BaseModelPool(models)).state_dict()
    expected = merge(config, "true")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_bad_streaming_value():
    with pytest.raises(ValueError, match="streaming"):
        ACEMerging(streaming="sometimes")


def test_single_file_prefix_and_tied_weights(tmp_path):
    torch.manual_seed(0)
    reference = {"a.weight": torch.randn(3, 4), "b": torch.randn(5)}
    reference["tied.weight"] = reference["a.weight"]  # same storage, saved once
    stored = {
        "model.a.weight": torch.randn(3, 4).double(),
        "model.b": torch.randn(5).double(),
        "model.extra": torch.zeros(2),
    }
    path = tmp_path / "expert.safetensors"
    save_file(stored, str(path))
    assert set(safetensors_files(path)) == set(stored)
    mapping, unmatched = match_keys(reference, list(stored))
    assert unmatched == []
    assert mapping == {
        "a.weight": "model.a.weight",
        "b": "model.b",
        "tied.weight": "model.a.weight",
    }
    state, unmatched = open_expert(path, reference)
    assert unmatched == [] and len(state) == 3
    assert state["b"].dtype == torch.float32  # cast like a float32 model would
    assert torch.equal(state["b"], stored["model.b"].float())
    assert {k: tuple(v.shape) for k, v in state.meta().items()} == {
        "a.weight": (3, 4),
        "b": (5,),
        "tied.weight": (3, 4),
    }
    stacked = stacked_task_vectors(
        "b", reference["b"], {"e": state}, device=torch.device("cpu"), dtype=torch.float32
    )
    assert torch.equal(stacked[0], stored["model.b"].float() - reference["b"])
    assert safetensors_files(tmp_path / "nothing") is None


def test_sharded_checkpoint(tmp_path):
    config = GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = GPT2Model(config)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    state, unmatched = open_expert(tmp_path / "sharded", model.state_dict())
    assert unmatched == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
