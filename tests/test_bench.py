"""The benchmark runs end to end on tiny shapes; the reference-style ACE agrees with ours."""

import json

import pytest
import torch

from fusion_bench_ace.bench import main
from fusion_bench_ace.bench.layers import _floor
from fusion_bench_ace.bench.reference import reference_ace_layer, reference_ace_merge
from fusion_bench_ace.methods.ace import ace_merge_layer_with_info

from ace_reference import naive_ace


@pytest.mark.parametrize("shape", [(24, 24), (40, 12), (12, 40)])
@pytest.mark.parametrize("heterogeneous", [False, True])
def test_reference_style_agrees_with_ours(shape, heterogeneous):
    generator = torch.Generator().manual_seed(sum(shape) + heterogeneous)
    scales = torch.logspace(-3, -1, 6) if heterogeneous else torch.full((6,), 1e-2)
    stacked = torch.randn(6, *shape, generator=generator, dtype=torch.float64)
    stacked *= scales.double().view(-1, 1, 1)
    ours = ace_merge_layer_with_info(stacked, eps=1e-5)
    assert ours.heterogeneous == heterogeneous
    reference = reference_ace_layer(list(stacked), eps=1e-5)
    naive, _ = naive_ace(list(stacked), eps=1e-5)
    scale = torch.linalg.norm(ours.merged)
    assert torch.linalg.norm(reference - ours.merged) / scale < 1e-8
    assert torch.linalg.norm(naive - ours.merged) / scale < 1e-8
    # float32, as benchmarked
    ours32 = ace_merge_layer_with_info(stacked.float(), eps=1e-5).merged.double()
    ref32 = reference_ace_layer(list(stacked.float()), eps=1e-5).double()
    assert torch.linalg.norm(ref32 - ours32) / scale < 1e-4


def test_reference_merge_loops_over_layers():
    layers = {
        "a": [torch.randn(5, 4) for _ in range(3)],
        "b": [torch.randn(4, 6) for _ in range(3)],
    }
    merged = reference_ace_merge(layers, eps=1e-3)
    assert {k: tuple(v.shape) for k, v in merged.items()} == {"a": (5, 4), "b": (4, 6)}


def test_floor_runs_both_variants():
    stacked = torch.randn(3, 10, 30)
    for wsigma in (False, True):
        for het in (False, True):
            assert _floor(stacked, 1e-3, 0.3, 0.3, wsigma=wsigma, heterogeneous=het).shape == (
                10,
                30,
            )


def test_bench_end_to_end_tiny(tmp_path):
    report = main(["--tiny", "--repeats", "1", "--out", str(tmp_path)])
    md = (tmp_path / "ace_bench_tiny.md").read_text()
    saved = json.loads((tmp_path / "ace_bench_tiny.json").read_text())
    assert "command: `python -m fusion_bench_ace.bench --tiny --repeats 1" in md
    assert "git commit:" in md and "load average" in md and "torch thread" in md
    (run,) = saved["runs"]
    assert set(run["impls"]) == {"ours", "reference", "tsvm", "floor", "floor_wsigma"}
    assert run["branches"]["homogeneous"] > 0 and run["branches"]["heterogeneous"] > 0
    assert run["impls"]["reference"]["rel_diff"] < 1e-4
    assert all(row["seconds"] > 0 for row in run["impls"].values())
    # the memory curve ran ACEMerging in subprocesses, streaming and not, with equal results
    assert {(r["tasks"], r["streaming"]) for r in saved["memory"]} == {(2, "true"), (2, "false")}
    assert all(r["peak_rss"] >= r["baseline_rss"] > 0 for r in saved["memory"])
    assert report["header"]["mode"] == "tiny"


def test_lazy_read_workers_read_every_parameter(tmp_path):
    from fusion_bench_ace.studies import lazy_read as lazy

    spec = {"tasks": [2], "n_embd": 16, "n_layer": 1, "vocab_size": 64, "n_positions": 16}
    lazy.write_memory_pool(tmp_path, 2, spec, seed=0)
    rows = [lazy.read_worker(str(tmp_path), 2, reader) for reader in lazy._readers()]
    assert [r["reader"] for r in rows] == [
        "streaming", "lazy_state_dict", "lazy_state_dict_cached", "loaded"
    ]
    # the largest stack is the same whoever reads: 2 x the 64 x 16 float32 embedding
    assert {r["stacked_bytes"] for r in rows} == {2 * 64 * 16 * 4}
    assert all(r["peak_rss"] >= r["baseline_rss"] > 0 for r in rows)
    with pytest.raises(ValueError, match="unknown reader"):
        lazy.read_worker(str(tmp_path), 2, "mmap")
    for row in rows:
        row["model_file_bytes"] = 1
    text = lazy.render(lazy.provenance.collect("bench lazy", "cpu"), spec, rows)
    assert "command: `bench lazy`" in text and "| 2 | lazy_state_dict_cached |" in text


def test_track_precision_reports_every_merged_layer(reduced_gpt2_env, tmp_path):
    """float32 against float64, per layer, on a built track's real experts (the reduced GPT-2)."""
    from fusion_bench_ace.bench.report import tracks_section
    from fusion_bench_ace.bench.tracks import method_settings, track_precision

    from conftest import patched_environ

    with patched_environ(reduced_gpt2_env):
        result = track_precision("gpt2", "ace_gpt2", torch.device("cpu"), log=lambda *_: None)
        missing = track_precision("clip", "ace_vit", torch.device("cpu"), log=lambda *_: None)
    assert result["built"] and not missing["built"]
    assert result["options"]["eps"] == method_settings("ace_gpt2")["eps"] == 4e-2
    names = [layer["name"] for layer in result["layers"]]
    assert names and all("score" not in name for name in names)  # the preset excludes the head
    assert result["max_rel_err"] == max(layer["rel_err"] for layer in result["layers"])
    for layer in result["layers"]:  # one float32 pass, within its estimate; float64 is exact
        assert layer["computed_in"] == "float32" and layer["float64_option_equal"], layer
        assert layer["rel_err"] <= layer["estimate"], layer
    assert result["seconds_float32_pass"] > 0 and result["seconds_float64"] > 0
    text = "\n".join(tracks_section([result, missing]))
    assert "| gpt2 | ace_gpt2 (eps=0.04, tau=0.3, k_frac=0.3) |" in text
    assert "default / pass" in text
    assert f"| gpt2 | {names[0]} |" in text
    assert "| clip | ace_vit | not built" in text


def test_llm_bench_end_to_end_tiny(tmp_path):
    """Synthetic Llama experts; the floor and the streamed merge each in a process whose memory
    is sampled from outside; results only in a new folder."""
    from fusion_bench_ace.bench.llm import main as llm_main

    out = tmp_path / "llm"
    report = llm_main(["--mode", "tiny", "--out", str(out)])
    md = (out / "llm_bench.md").read_text()
    assert "command: `python -m fusion_bench_ace.bench.llm --mode tiny" in md
    (model,) = json.loads((out / "llm_bench.json").read_text())["models"]
    assert list(model["rows"]) == ["floor", "stream"]
    floor, stream = model["rows"]["floor"], model["rows"]["stream"]
    assert floor["matrices"] == model["ace_matrices"] == 14  # 7 per layer, embeddings kept
    assert stream["merge_seconds"] > 0 and stream["peak_anon_mib"] > 0
    assert stream["peak_rss_mib"] >= stream["peak_anon_mib"]
    assert stream["merge_peak_anon_mib"] >= stream["merge_start_anon_mib"] > 0
    assert report["header"]["mode"] == "tiny"
    with pytest.raises(FileExistsError, match="does not overwrite"):
        llm_main(["--mode", "tiny", "--out", str(out)])


@pytest.mark.slow
def test_distributed_bench_tiny_one_and_two_processes(tmp_path):
    from fusion_bench_ace.bench.distributed import main as distributed_main

    out = tmp_path / "distributed"
    report = distributed_main(["--tiny", "--processes", "1", "2", "--out", str(out)])
    one, two = report["result"]["runs"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["digests"] == two["digests"]  # the same bytes
    assert [r["rank"] for r in two["ranks"]] == [0, 1]
    assert all(r["peak_anon_mib"] > 0 for r in two["ranks"])
    assert "| 2 |" in (out / "distributed_tiny_T8.md").read_text()
