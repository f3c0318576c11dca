"""The comparison runner end to end on the reduced embedded CLIP benchmark."""

import csv
import io
import json
import statistics

import pytest

from fusion_bench_ace.compare import (
    available_benchmarks,
    load_benchmark,
    paper_rows,
    resolve_methods,
    run_comparison,
    run_sweep,
)
from fusion_bench_ace.compare.tables import (
    Row,
    csv_table,
    experts_of_tasks,
    markdown_table,
    scores_from_report,
)

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


def test_sweep_on_validation_data_uses_the_benchmark_validation_split(reduced_clip_env, tmp_path):
    import yaml

    grid = {"method.eps": ["1e-3"]}
    with patched_environ(reduced_clip_env):
        run_dir = run_sweep("mini_clip", grid, tmp_path / "sweep", ["sweep", "--validation"],
                            log=lambda *_: None, validation=True)
    (job,) = [r.parent for r in (run_dir / "jobs").glob("*/program_report.json")]
    assert yaml.safe_load((job / "config.yaml").read_text())["taskpool"]["_split"] == "validation"
    assert set(load_benchmark("mini_clip")["validation"]) <= set(
        yaml.safe_load((job / "overrides.yaml").read_text()))
    assert "validation data" in (run_dir / "table.md").read_text().splitlines()[0]


def test_sweep_on_validation_data_needs_a_benchmark_with_validation_data(tmp_path):
    spec = load_benchmark("llama2_13b_wizard2")
    assert spec.get("sweep") and not spec.get("validation")
    with pytest.raises(ValueError, match="no validation data"):
        run_sweep("llama2_13b_wizard2", {}, tmp_path, [], validation=True)
    assert not any(tmp_path.iterdir())  # refused before anything ran or was written


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
    table = (run_dir / "table.md").read_text()
    assert "±" in table
    # `compare spread` rewrites the same tables from the seeds' results, saying that it did
    from fusion_bench_ace.compare.seeds import rewrite_spread

    before = (run_dir / "table.csv").read_text()
    rewrite_spread(run_dir, ["spread", str(run_dir)])
    assert (run_dir / "table.csv").read_text() == before
    rewritten = (run_dir / "table.md").read_text()
    assert "tables rewritten from the seeds' results by `python -m fusion_bench_ace.compare " \
        f"spread {run_dir}`" in rewritten
    assert [x for x in rewritten.splitlines() if "rewritten" not in x] == table.splitlines()

    assert not any("is not the one" in str(m) for m in messages)
    # the seed-3 table, rerun on the seed-4 track, says the track changed
    messages.clear()
    with patched_environ({**env, "FUSION_BENCH_ACE_MINI_SEED": "4"}):
        run_comparison("mini_clip", ["pretrained"], run_dir / "seed_3", ["run"],
                       log=messages.append)
    assert any("is not the one" in str(m) for m in messages)


# --- the tables' own metrics: normalisation, seeds, tuning on validation --------------------------


def test_an_ordering_is_stated_only_where_the_paired_difference_exceeds_its_spread():
    from fusion_bench_ace.compare.seeds import paired_lines

    averages = {  # per seed; the seeds shift every method together
        "pretrained": [50, 40, 60], "individual": [90, 80, 100],
        "a": [71, 61, 81],   # a - b = +1 on every seed: ordered although the spread is 10
        "b": [70, 60, 80],   # b - c = +3, -1, +1: one sign fails
        "c": [67, 61, 79],
    }
    tables = {s: {m: {"average": str(v[i])} for m, v in averages.items()} for i, s in
              enumerate([0, 1, 2])}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in paired_lines(tables, list(averages)) if line.startswith("| ")}
    assert list(rows)[1:] == ["individual", "a", "b", "c", "pretrained"]
    assert rows["a"][4:] == ["71.0 ± 10.0", "52 ± 0 %", "+1.0 ± 0.0", "**ordered** |"]
    assert rows["b"][6:] == ["+1.0 ± 2.0", "no |"]
    assert rows["c"][5] == "48 ± 5 %"  # (67-50)/40, (61-40)/40, (79-60)/40


def test_normalised_row_divides_by_the_reference_per_task():
    from fusion_bench_ace.compare.tables import normalised_row, reference_scores

    individual = {"a": {"a": {"score": 0.8}, "b": {"score": 0.1}},
                  "b": {"a": {"score": 0.5}, "b": {"score": -0.2}}}
    reference = reference_scores(individual, ["a", "b"], "score")
    assert reference == {"a": pytest.approx(80.0), "b": pytest.approx(-20.0)}
    row = Row("ta", {"a": 40.0, "b": 10.0}, 25.0, merge_seconds=1.5, stds={"a": 4.0, "b": 1.0})
    normalised = normalised_row(row, reference, ["a", "b"])
    assert normalised.scale == "normalised" and normalised.merge_seconds == 1.5
    assert normalised.scores == {"a": pytest.approx(50.0), "b": None}  # no ratio to a score <= 0
    assert normalised.average is None and normalised.stds["a"] == pytest.approx(5.0)
    # ACE Table 9 style: task b normalised by expert a's score on b
    assert reference_scores(individual, ["b"], "score", {"b": "a"}) == {"b": pytest.approx(10.0)}


def test_seeded_row_is_mean_and_sample_std():
    from fusion_bench_ace.compare.tables import seeded_row

    values = ((0.5, 0.7), (0.6, 0.9), (0.7, 0.8))
    reports = [{"a": {"accuracy": v}, "b": {"accuracy": w}} for v, w in values]
    costs = ((1.0, 10.0), (2.0, 30.0), (3.0, 20.0))
    stats = [{"merge_seconds": s, "peak_rss_mib": m} for s, m in costs]
    row = seeded_row("symerge", reports, stats, ["a", "b"], setting="seeds 0,1,2")
    assert row.scores == {"a": pytest.approx(60.0), "b": pytest.approx(80.0)}
    assert row.stds == {"a": pytest.approx(10.0), "b": pytest.approx(10.0)}
    assert row.average == pytest.approx(70.0)
    assert row.average_std == pytest.approx(statistics.stdev([60.0, 75.0, 75.0]))
    assert row.merge_seconds == pytest.approx(2.0) and row.peak_rss_mib == 30.0
    table = markdown_table([row], ["a", "b"])
    assert "| symerge (seeds 0,1,2) | 60.0 ± 10.0 | 80.0 ± 10.0 | 70.0 ± 8.7 |" in table
    lines = list(csv.DictReader(io.StringIO(csv_table([row, Row("x", {"a": 1.0, "b": 2.0}, 1.5)],
                                                      ["a", "b"]))))
    assert lines[0]["std_a"] == "10.0000" and lines[1]["std_a"] == "" and lines[0]["scale"] == "raw"


def test_seeded_rows_are_read_from_the_multirun_jobs(tmp_path):
    from fusion_bench_ace.compare.variants import seeded_from_jobs

    jobs = []
    for i, accuracy in enumerate((0.25, 0.75)):
        job = tmp_path / str(i)
        job.mkdir()
        (job / "program_report.json").write_text(json.dumps({"a": {"accuracy": accuracy}}))
        (job / "merge_stats.json").write_text(json.dumps({"merge_seconds": 1.0 + i}))
        jobs.append(job)
    row = seeded_from_jobs("m", jobs, ["a"], "accuracy", "seeds")
    assert row.scores["a"] == pytest.approx(50.0) and row.stds["a"] == pytest.approx(35.355339)


def test_tuned_methods_need_validation_data():
    spec = load_benchmark("mini_clip")
    assert resolve_methods(spec, ["task_arithmetic_tuned"])
    del spec["validation"]
    with pytest.raises(ValueError, match="validation data"):
        resolve_methods(spec, ["task_arithmetic_tuned"])
    for name in available_benchmarks():  # every benchmark offers the tuned rows or says why not
        spec = load_benchmark(name)
        if spec.get("no_tuned"):
            with pytest.raises(ValueError, match="no \\*_tuned rows"):
                resolve_methods(spec, ["ties_merging_tuned"])
        else:
            assert resolve_methods(spec, ["ties_merging_tuned"])


def test_tuned_lambda_is_chosen_on_validation_data_only(reduced_gpt2_env, tmp_path):
    """Every validation job evaluates the track's validation split; the test run uses the best
    value; the table says which."""
    from fusion_bench_ace.compare.variants import run_tuned

    spec = load_benchmark("mini_gpt2")
    spec["tuned"]["task_arithmetic_tuned"]["grid"] = [0.1, 1.0]  # two jobs keep the test short
    with patched_environ(reduced_gpt2_env):
        result = run_tuned("task_arithmetic_tuned", spec, tmp_path / "tuned")
    assert result.ok
    tuning = json.loads((tmp_path / "tuned" / "tuning.json").read_text())
    averages = tuning["validation_average"]
    assert set(averages) == {"0.1", "1.0"} and all(v is not None for v in averages.values())
    assert averages[str(tuning["chosen"])] == max(averages.values())
    for job in (tmp_path / "tuned" / "validation" / "jobs").iterdir():
        if job.is_dir():
            assert "taskpool._split=validation" in (job / "overrides.yaml").read_text()
    command = (tmp_path / "tuned" / "command.txt").read_text()
    assert f"method.scaling_factor={tuning['chosen']}" in command and "_split" not in command
    assert result.row.setting == f"method.scaling_factor={tuning['chosen']}, tuned on validation"
    assert all(v is not None for v in result.row.scores.values())


def test_the_individual_row_reads_each_task_off_its_related_expert():
    """ACE Table 9 style (``normalize: {individual: {task: expert}}``): experts named otherwise
    than their tasks; without the mapping, expert t is task t's."""
    report = {"math": {"gsm": {"accuracy": 0.5}, "qa": {"accuracy": 0.1}},
              "lang": {"qa": {"accuracy": 0.4}, "gsm": {"accuracy": 0.0}}}
    mapping = {"qa": "lang", "gsm": "math"}
    assert scores_from_report("individual", report, ["qa", "gsm"], expert_of=mapping) == \
        {"qa": 40.0, "gsm": 50.0}
    assert scores_from_report("individual", report, ["qa", "gsm"]) == {"qa": None, "gsm": None}
    assert experts_of_tasks(load_benchmark("mini_llm"))["word_problems"] == "math"
    assert experts_of_tasks(load_benchmark("mini_clip")) is None
