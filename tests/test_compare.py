"""The comparison runner end to end on the reduced embedded CLIP benchmark."""

import csv
import json

import pytest

from fusion_bench_ace.compare import (
    available_benchmarks,
    load_benchmark,
    paper_rows,
    resolve_methods,
    run_comparison,
    run_sweep,
)
from fusion_bench_ace.compare.tables import Row, markdown_table, scores_from_report

from conftest import patched_environ

TASKS = load_benchmark("mini_clip")["tasks"]


def test_two_methods_write_table_csv_plot_and_keep_earlier_runs(reduced_clip_env, tmp_path):
    out = tmp_path / "mini_clip"
    with patched_environ(reduced_clip_env):
        first = run_comparison(
            "mini_clip", ["pretrained", "ace"], out, ["run"], log=lambda *_: None
        )
    for name in ("table.md", "table.csv", "bars.png", "provenance.json"):
        assert (first / name).is_file(), name
    rows = list(csv.DictReader((first / "table.csv").open()))
    assert [r["method"] for r in rows] == ["pretrained", "ace"]
    report = json.loads((first / "runs" / "ace" / "program_report.json").read_text())
    assert float(rows[1]["shapes"]) == pytest.approx(100 * report["shapes"]["accuracy"], abs=1e-3)
    assert float(rows[1]["merge_seconds"]) > 0
    assert (out / "latest").resolve() == first.resolve()
    provenance = json.loads((first / "provenance.json").read_text())
    assert provenance["track_manifest"]["size"] == "reduced"
    assert provenance["benchmark"]["methods"]["ace"][0] == "method=ace_vit"
    # the benchmark's ACE run records spectra, and the runner plots its diagnostics
    for name in ("diagnostics.md", "gamma.png", "spectra.png"):
        assert (first / "diagnostics" / "ace" / name).is_file(), name

    with patched_environ(reduced_clip_env):
        second = run_comparison("mini_clip", ["pretrained"], out, ["run"], log=lambda *_: None)
    assert second != first and (first / "table.md").is_file()  # nothing overwritten
    assert (out / "latest").resolve() == second.resolve()
    # deterministic evaluation: the same method gives the same numbers again
    again = list(csv.DictReader((second / "table.csv").open()))[0]
    assert {t: again[t] for t in TASKS} == {t: rows[0][t] for t in TASKS}


def test_sweep_keeps_every_job_and_draws_a_heatmap(reduced_clip_env, tmp_path):
    grid = {"method.eps": ["1e-5", "1e-1"], "method.k_frac": ["0.1", "0.5"], "method.tau": ["0.0"]}
    with patched_environ(reduced_clip_env):
        run_dir = run_sweep("mini_clip", grid, tmp_path / "sweep", ["sweep"], log=lambda *_: None)
    reports = sorted((run_dir / "jobs").glob("*/program_report.json"))
    assert len(reports) == 4
    eps = sorted(
        json.loads((r.parent / "ace_diagnostics.json").read_text())["eps"] for r in reports
    )
    assert eps == [1e-5, 1e-5, 1e-1, 1e-1]
    rows = list(csv.DictReader((run_dir / "table.csv").open()))
    assert len({r["method"] for r in rows}) == 4
    assert (run_dir / "heatmap.png").is_file()


def test_individual_reads_the_diagonal():
    report = {
        "a": {"a": {"accuracy": 0.9}, "b": {"accuracy": 0.1}},
        "b": {"a": {"accuracy": 0.2}, "b": {"accuracy": 0.8}},
    }
    assert scores_from_report("individual", report, ["a", "b"]) == {"a": 90.0, "b": 80.0}
    flat = {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.25}}
    assert scores_from_report("ace", flat, ["a", "b"]) == {"a": 50.0, "b": 25.0}


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['magic'\]"):
        resolve_methods(load_benchmark("mini_clip"), ["ace", "magic"])


def test_missing_scores_render_as_dashes():
    table = markdown_table([Row("x", {"a": None, "b": 50.0}, None)], ["a", "b"])
    assert "| x | – | 50.0 | – |" in table


def test_every_benchmark_definition_is_complete():
    for name in available_benchmarks():
        spec = load_benchmark(name)
        assert spec["tasks"] and spec["overrides"], name
        resolve_methods(spec, None)
        for row in paper_rows(spec):
            assert set(row.scores) == set(spec["tasks"])


def test_seeds_give_one_comparison_each_and_their_spread(reduced_clip_env, tmp_path):
    """Two track seeds: two builds (different hashes), per-seed tables, mean ± std recomputed
    here from the per-seed CSVs; rerunning on another track warns that the table differs."""
    import statistics

    from fusion_bench_ace.compare.seeds import run_over_seeds

    env = {**reduced_clip_env, "FUSION_BENCH_ACE_CACHE": str(tmp_path / "cache")}
    messages = []
    with patched_environ(env):
        run_dir = run_over_seeds("mini_clip", ["pretrained", "simple_average"], [3, 4],
                                 tmp_path / "out", ["run"], log=messages.append)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    hashes = {s: v["track_content_hash"] for s, v in provenance["seeds"].items()}
    assert set(hashes) == {"3", "4"} and hashes["3"] != hashes["4"]
    per_seed = {s: {r["method"]: r for r in csv.DictReader(
        (run_dir / f"seed_{s}" / "latest" / "table.csv").open())} for s in (3, 4)}
    spread = {r["method"]: r for r in csv.DictReader((run_dir / "table.csv").open())}
    for method in ("pretrained", "simple_average"):
        values = [float(per_seed[s][method]["average"]) for s in (3, 4)]
        assert float(spread[method]["average_mean"]) == pytest.approx(statistics.fmean(values),
                                                                       abs=1e-3)
        assert float(spread[method]["average_std"]) == pytest.approx(statistics.stdev(values),
                                                                      abs=1e-3)
    assert "±" in (run_dir / "table.md").read_text()

    assert not any("is not the one" in str(m) for m in messages)
    # the seed-3 table, rerun on the seed-4 track, says the track changed
    messages.clear()
    with patched_environ({**env, "FUSION_BENCH_ACE_MINI_SEED": "4"}):
        run_comparison("mini_clip", ["pretrained"], run_dir / "seed_3", ["run"],
                       log=messages.append)
    assert any("is not the one" in str(m) for m in messages)
