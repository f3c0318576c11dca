"""The analysis of issue 18's experiment (fusion_bench_ace.studies.ace_scale_free) on made-up
sweep outputs laid out as ``compare sweep`` writes them."""

import json

import pytest
import yaml

from fusion_bench_ace.compare import load_benchmark
from fusion_bench_ace.studies.ace_scale_free import analyse, layer_statistics, load_runs, main

LAYERS = ["a.weight", "b.weight", "c.weight"]
GRAM_EIGENVALUE = {"a.weight": 1e-4, "b.weight": 2e-3, "c.weight": 5e-3}  # s̄ / d_in per layer


def write_sweep(root, name, benchmark, jobs, validation=True):
    """``root/name/latest`` -> a sweep run; jobs: (eps_mode, value, gamma_mode, avg %, het)."""
    spec = load_benchmark(benchmark)
    run_dir = root / name / "2026-01-01_00-00-00"
    run_dir.mkdir(parents=True)
    (root / name / "latest").symlink_to(run_dir.name)
    (run_dir / "provenance.json").write_text(json.dumps(
        {"benchmark": spec, "command": f"python -m fusion_bench_ace.compare sweep {name}"}))
    for i, (mode, value, gamma, average, heterogeneous) in enumerate(jobs):
        job = run_dir / "jobs" / str(i)
        job.mkdir(parents=True)
        split = list(spec["validation"]) if validation else []
        (job / "overrides.yaml").write_text(yaml.safe_dump(
            [*spec["overrides"], *split, f"method.eps_mode={mode}"]))
        (job / "program_report.json").write_text(json.dumps(
            {t: {"accuracy": average / 100} for t in spec["tasks"]}))
        (job / "ace_diagnostics.json").write_text(json.dumps({
            "eps": value if mode == "absolute" else 1e-5, "eps_rel": value if mode == "relative"
            else 1e-2, "eps_mode": mode, "gamma_mode": gamma, "tau": 0.3, "tau_scale_free": 0.693,
            "k_frac": 0.3,
            "layers": [{"name": n, "heterogeneous": n in heterogeneous,
                        "gamma": (0.1 if gamma == "paper" else 1.0) * (1 + i),
                        "eps": value * (GRAM_EIGENVALUE[n] if mode == "relative" else 1)}
                       for i, n in enumerate(LAYERS)]}))


@pytest.fixture
def study(tmp_path):
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    clip_abs = [40.0, 50.0, 50.0, 45.0, 30.0]  # a tie at the best: the smaller eps wins
    gpt2_abs = [60.0, 61.0, 62.0, 63.0, 70.0]
    clip_rel = [45.0, 49.0, 51.0, 50.7, 40.0]
    gpt2_rel = [50.0, 60.0, 69.0, 69.6, 69.9]
    write_sweep(tmp_path, "clip_absolute", "mini_clip",
                [("absolute", v, "paper", a, ["a.weight"]) for v, a in zip(grid, clip_abs)])
    write_sweep(tmp_path, "gpt2_absolute", "mini_gpt2",
                [("absolute", v, "paper", a, []) for v, a in zip(grid, gpt2_abs)])
    write_sweep(tmp_path, "clip_relative", "mini_clip",
                [("relative", v, "paper", a, ["a.weight"]) for v, a in zip(grid, clip_rel)])
    write_sweep(tmp_path, "gpt2_relative", "mini_gpt2",
                [("relative", v, "paper", a, []) for v, a in zip(grid, gpt2_rel)])
    write_sweep(tmp_path, "clip_gamma", "mini_clip",
                [("relative", 1e-1, "scale_free", 50.2, ["b.weight"])])
    write_sweep(tmp_path, "clip_test", "mini_clip",
                [("relative", 1e-1, "paper", 48.0, ["a.weight"]),
                 ("absolute", 1e-3, "paper", 47.0, ["a.weight"])], validation=False)
    return tmp_path


def test_best_values_common_relative_eps_and_decades(study):
    result = analyse(load_runs(study), within=0.5)
    per_mode = result["per_mode"]
    assert per_mode["mini_clip/absolute"]["best_value"] == 1e-3  # tie with 1e-2
    assert per_mode["mini_clip/absolute"]["within_range"] == [1e-3, 1e-2]
    assert per_mode["mini_gpt2/absolute"]["best_value"] == 1.0
    assert per_mode["mini_clip/relative"]["best_value"] == 1e-2
    assert per_mode["mini_clip/relative"]["gap_to_track_best"] == pytest.approx(0.0)
    assert per_mode["mini_gpt2/relative"]["gap_to_track_best"] == pytest.approx(0.1)
    assert result["track_best"] == {"mini_clip": 51.0, "mini_gpt2": 70.0}
    common = result["common"]["relative"]
    # worst gaps: 1e-2 -> 1.0 (gpt2), 1e-1 -> 0.4 (gpt2 0.4, clip 0.3), 1 -> 11.0 (clip)
    assert common["value"] == 1e-1
    assert common["gaps"] == pytest.approx({"mini_clip": 0.3, "mini_gpt2": 0.4})
    assert common["holds"]
    assert not analyse(load_runs(study), within=0.35)["common"]["relative"]["holds"]
    # absolute worst gaps: 1e-4 -> 11, 1e-3 -> 9, 1e-2 -> 8, 1e-1 -> 7 (clip 6, gpt2 7), 1 -> 21
    absolute = result["common"]["absolute"]
    assert absolute["value"] == 1e-1 and absolute["worst_gap"] == pytest.approx(7.0)
    assert not absolute["holds"]
    assert result["absolute_best_decades_apart"]["mini_clip vs mini_gpt2"] == pytest.approx(3.0)


def test_gamma_pairs_and_test_rows(study):
    result = analyse(load_runs(study), within=0.5)
    (pair,) = result["gamma"]
    assert (pair["split"], pair["benchmark"], pair["value"]) == ("validation", "mini_clip", 1e-1)
    assert pair["changed"] == ["a.weight", "b.weight"]
    assert pair["delta"] == pytest.approx(50.2 - 50.7)
    test = {(t["eps_mode"], t["value"]): t for t in result["test"]}
    assert test[("relative", 1e-1)]["test"] == pytest.approx(48.0)
    assert test[("relative", 1e-1)]["validation"] == pytest.approx(50.7)
    assert test[("absolute", 1e-3)]["validation"] == pytest.approx(50.0)


def test_main_writes_summary_table_json_and_plot(study, capsys):
    assert main([str(study)]) == 0
    summary = (study / "summary.md").read_text()
    assert "Best common eps_rel = 0.1" in summary and "within 0.5 points" in summary
    assert "| mini_clip | absolute | 0.001 | 50.00 |" in summary
    assert json.loads((study / "summary.json").read_text())["common"]["relative"]["value"] == 0.1
    assert (study / "validation_vs_eps.png").stat().st_size > 0


def test_layer_statistics_recover_the_gram_scale_and_the_preset_as_eps_rel(study):
    stats = layer_statistics(load_runs(study), {"mini_clip": 1e-5})["mini_clip"]
    assert stats["layers"] == 3
    assert stats["mean_gram_eigenvalue"] == pytest.approx(
        {"min": 1e-4, "median": 2e-3, "max": 5e-3})
    assert stats["preset_as_eps_rel"] == pytest.approx({"min": 2e-3, "median": 5e-3, "max": 0.1})
    assert stats["paper"]["heterogeneous"] == 1 and stats["paper"]["max"] == pytest.approx(0.3)
    assert stats["scale_free"]["threshold"] == 0.693
