"""One ACE merge split across processes (torchrun): the flop-balanced partition, the shared
shards, and the command under ``torchrun`` with 2 gloo CPU processes against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_llama import build_tiny_llama_pool

from fusion_bench_ace import ACEMerging
from fusion_bench_ace.algorithms.nan import TiesMergingNANAlgorithm
from fusion_bench_ace.engine.distributed import (
    balanced_owners,
    plan_costs,
    work_per_rank,
    world_from_env,
)
from fusion_bench_ace.engine.driver import ParameterPlan
from fusion_bench_ace.engine.io.writer import ShardedSafetensorsWriter, TensorSpec
from fusion_bench_ace.methods.ace import ACE, ACEOptions
from fusion_bench_ace.methods.nan import TiesMergingNAN

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))
LLM_EXCLUDES = [".*embed_tokens.*", ".*lm_head.*"]


# --- the partition --------------------------------------------------------------------------------


def test_costs_are_the_methods_estimates_for_merged_parameters_and_a_pass_for_the_rest():
    ace = ACE(ACEOptions())
    assert ace.cost((6, 4), 3) == 3 * 6 * 4 ** 2  # the T covariances
    assert ace.cost((2, 40), 3) == 3 * 2 * 40 * (3 * 2 + 2 * 2)  # solved in the row space
    shapes = [("w", (6, 4)), ("b", (6,)), ("e", (10, 4))]
    plan = ParameterPlan(merge=("w",), average=("b",), skip=("e",))
    assert plan_costs(shapes, plan, ace, 3) == [3 * 6 * 4 ** 2, 18.0, 40.0]
    # a method with statistics passes reads a merged parameter once per pass and once to merge
    ties = TiesMergingNAN(["a", "b", "c"], granularity="layer")
    assert plan_costs(shapes, plan, ties, 3)[0] == 3 * 24 * (ties.statistics_passes + 1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_balanced_owners_are_deterministic_complete_and_within_the_greedy_bound(world_size):
    generator = torch.Generator().manual_seed(world_size)
    costs = (torch.rand(40, generator=generator) ** 4 * 1e6).tolist()
    owners = balanced_owners(costs, world_size)
    assert owners == balanced_owners(costs, world_size)
    assert set(owners) <= set(range(world_size)) and len(owners) == len(costs)
    loads = work_per_rank(costs, owners, world_size)
    assert sum(loads) == pytest.approx(sum(costs))
    # longest-processing-time first: no rank exceeds the least loaded by more than one item
    assert max(loads) - min(loads) <= max(costs) + 1e-9
    if world_size == 2:  # far better than giving each rank half of the names
        halves = work_per_rank(costs, [i * 2 // len(costs) for i in range(len(costs))], 2)
        assert max(loads) / min(loads) < max(halves) / min(halves)


def test_balanced_owners_rejects_no_ranks_and_the_environment_says_the_world():
    with pytest.raises(ValueError, match="world_size"):
        balanced_owners([1.0], 0)
    assert world_from_env({}) == (0, 0, 1)
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 1, 4)


def test_writers_of_disjoint_shares_fill_the_one_writers_files_byte_for_byte(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3 + i, 5, generator=generator).to(dtype)
               for i, dtype in enumerate([torch.float32, torch.bfloat16] * 4)}
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    one, shared = tmp_path / "one", tmp_path / "shared"
    one.mkdir()
    shared.mkdir()
    writer = ShardedSafetensorsWriter(one, specs, max_shard_size=150)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    owners = balanced_owners([s.nbytes for s in specs], 2)
    ShardedSafetensorsWriter(shared, specs, 150, names=[]).finish(write_index=False)
    for rank in (1, 0):  # any order: each writes only its own bytes
        names = [s.name for s, owner in zip(specs, owners) if owner == rank]
        share = ShardedSafetensorsWriter(shared, specs, 150, names=names, create_files=False)
        for name in names:
            share.write(name, tensors[name])
        share.finish(write_index=rank == 0)
    files = sorted(p.name for p in one.iterdir())
    assert len(files) > 2 and files == sorted(p.name for p in shared.iterdir())
    for name in files:
        assert (one / name).read_bytes() == (shared / name).read_bytes(), name
    with pytest.raises(ValueError, match="not among the planned"):
        ShardedSafetensorsWriter(shared, specs, 150, names=["nope"], create_files=False)


# --- the command under torchrun ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    return build_tiny_llama_pool(tmp_path_factory.mktemp("llama"), dtype=torch.float32)


SINGLE = {  # the one-process merge of each method= config below
    "ace_llama": lambda: ACEMerging(exclude_keys=LLM_EXCLUDES, diagnostics=False),
    "ties_merging_nan": lambda: TiesMergingNANAlgorithm(),  # statistics passes across ranks
}


@pytest.mark.parametrize("method", list(SINGLE))
def test_torchrun_with_two_gloo_processes_writes_the_one_process_checkpoint(tiny_pool, tmp_path,
                                                                             method):
    from fusion_bench.modelpool import CausalLMPool

    single = SINGLE[method]()
    pool = CausalLMPool(**{k: v for k, v in OmegaConf.create(tiny_pool).items()
                           if k != "_target_"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process below: the same floating-point sums
    try:
        assert single.merge_to_checkpoint(pool, tmp_path / "one", max_shard_size="3KB")
    finally:
        torch.set_num_threads(threads)

    config_dir = tmp_path / "config" / "modelpool"
    config_dir.mkdir(parents=True)
    (config_dir / "tiny_llama_test.yaml").write_text(json.dumps(tiny_pool))
    target, log_dir = tmp_path / "two", tmp_path / "log"
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--no-python", FUSION_BENCH,
               "--config-name", "ace_model_fusion", "--config-dir", str(tmp_path / "config"),
               f"method={method}", "modelpool=tiny_llama_test", "~taskpool",
               f"path.log_dir={log_dir}", f"merged_model_save_path={target}",
               "+merged_model_save_kwargs.max_shard_size=3KB"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "rank 1 of 2" in output
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "model.safetensors.index.json" in files
    assert files == sorted(p.name for p in target.iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (target / name).read_bytes(), name
    if method == "ace_llama":  # rank 0 gathered every rank's layers, in one process's order
        layers = json.loads((log_dir / "ace_diagnostics.json").read_text())["layers"]
        assert layers == json.loads(json.dumps(single.layer_info))
    else:  # the statistics of both ranks gave the one process's coefficients and threshold
        data = json.loads((log_dir / "nan_coefficients.json").read_text())
        assert list(data["alpha"].values()) == single.coefficients.alpha.tolist()
    assert json.loads((log_dir / "merge_stats.json").read_text())["processes"] == 2


FAILING_RANK = """
import torch
from fusion_bench_ace.engine.distributed import Ranks

ranks = Ranks.join(torch.device("cpu"))
assert ranks.broadcast(ranks.rank + 7) == 7

def step():
    if ranks.rank == 1:
        raise ValueError("rank one cannot")
    return "fine"

try:
    ranks.together(step)
except Exception as error:
    print(f"rank {ranks.rank}: {type(error).__name__}: {error}", flush=True)
    raise SystemExit(3)
"""


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--no-python", sys.executable,
               "-c", FAILING_RANK]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rank 1: ValueError: rank one cannot" in output
    assert "rank 0: RuntimeError: rank(s) [1] of the merge failed" in output


class RecordingCheckpoint(dict):
    """A state dict that records which names are read (a lazy checkpoint's reads)."""

    def __init__(self, state, reads):
        super().__init__(state)
        self.reads = reads

    def __getitem__(self, name):
        self.reads.add(name)
        return super().__getitem__(name)


@pytest.mark.parametrize("method", ["ace", "ties_merging_nan"])
def test_a_rank_reads_only_the_tensors_it_merges(tiny_pool, tmp_path, method):
    from fusion_bench_ace.engine.distributed import Ranks
    from fusion_bench_ace.engine.driver import (
        compute_statistics,
        create_checkpoint_files,
        plan_parameters,
        share_of,
        write_merged_checkpoint,
    )
    from fusion_bench_ace.engine.io.reader import open_checkpoint
    from fusion_bench_ace.engine.selection import NamePatterns

    def load(path):
        lazy = open_checkpoint(path)
        return {name: lazy[name] for name in lazy}

    reads = set()
    pretrained = RecordingCheckpoint(load(tiny_pool["models"]["_pretrained_"]), reads)
    experts = {name: RecordingCheckpoint(load(path), reads)
               for name, path in tiny_pool["models"].items() if name != "_pretrained_"}
    unit = (ACE(ACEOptions(), exclude=NamePatterns.compile(LLM_EXCLUDES, "exclude_keys"))
            if method == "ace" else TiesMergingNAN(list(experts)))
    plan = plan_parameters(pretrained, unit)
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in pretrained.items()]
    share = share_of(Ranks(rank=1, world_size=2), specs, plan, unit, len(experts))
    assert 0 < len(share.names) < len(specs)
    reads.clear()
    create_checkpoint_files(tmp_path, specs, "3KB")
    # in one process the share's own totals stand in for those gathered from every rank
    compute_statistics(unit, pretrained, experts, plan, names=share.names)
    write_merged_checkpoint(tmp_path, pretrained, experts, unit, plan, specs=specs,
                            max_shard_size="3KB", names=share.names, create_files=False,
                            write_index=False)
    assert reads == set(share.names)
