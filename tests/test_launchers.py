"""Launchers of the comparison runner: local (sequential, parallel), SLURM via submitit (run here
through submitit's local executor), Ray; resuming, and failed jobs as rows."""

import csv
import json
import operator
import os
import stat

import pytest

from fusion_bench_ace.compare import load_benchmark, run_comparison
from fusion_bench_ace.compare import runner as runner_module
from fusion_bench_ace.compare.jobs import run_entries
from fusion_bench_ace.compare.launchers import (
    JobFailure,
    Launcher,
    LocalLauncher,
    available_launchers,
    load_launcher,
)

from conftest import patched_environ

METHODS = ["pretrained", "ace"]  # two jobs: the least that can run in parallel
TASKS = load_benchmark("mini_gpt2")["tasks"]
SCORE_COLUMNS = ["method", "source", *TASKS, "average"]


def quiet(*_):
    pass


def scores(run_dir):
    """The table's cells that do not depend on timing (merge time and memory do)."""
    rows = list(csv.DictReader((run_dir / "table.csv").open()))
    return [{c: row[c] for c in SCORE_COLUMNS} for row in rows]


@pytest.fixture(scope="module")
def sequential(reduced_gpt2_env, tmp_path_factory):
    """The reduced GPT-2 comparison run one job after another (the default launcher)."""
    out = tmp_path_factory.mktemp("sequential")
    with patched_environ(reduced_gpt2_env):
        run_dir = run_comparison("mini_gpt2", METHODS, out, ["run"], log=quiet)
    return out, run_dir


# --- the launchers on their own -------------------------------------------------------------------


def test_every_launcher_config_loads_and_unknown_options_are_errors():
    assert {"local", "local_parallel", "slurm", "ray"} <= set(available_launchers())
    for name in available_launchers():
        assert load_launcher(name).config["name"] == name
    assert load_launcher("local_parallel", ["workers=3"]).workers == 3
    with pytest.raises(ValueError, match="has no option 'partitio'"):
        load_launcher("slurm", ["partitio=gpu"])
    with pytest.raises(ValueError, match="unknown launcher 'nope'"):
        load_launcher("nope")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        load_launcher("local", ["workers=0"])


def map_division(launcher, folder):
    """``a / b`` per job: the first job raises (ZeroDivisionError), the others return."""
    ended = []
    results = launcher.map(operator.truediv, [(1, 0), (6, 3), (8, 2)], folder,
                           lambda i, r: ended.append(i))
    assert sorted(ended) == [0, 1, 2]
    assert isinstance(results[0], JobFailure) and "ZeroDivisionError" in results[0].error
    assert results[1:] == [2.0, 4.0]
    return results


@pytest.mark.parametrize("workers", [1, 2])
def test_local_launcher_keeps_order_and_turns_exceptions_into_failures(workers, tmp_path):
    map_division(LocalLauncher(workers), tmp_path)


def test_submitit_launcher_runs_jobs_and_points_to_the_logs_of_a_failed_one(tmp_path):
    launcher = load_launcher("slurm", ["cluster=local", "gpus_per_node=0", "poll_s=0.5",
                                       "timeout_min=10"])
    failure = map_division(launcher, tmp_path)[0]
    assert failure.logs and all(str(tmp_path) in log for log in failure.logs)
    assert "ZeroDivisionError" in open(failure.logs[1]).read()  # the job's stderr


def test_slurm_jobs_are_built_with_the_configured_options(tmp_path, monkeypatch):
    """submitit's SLURM executor (found through an ``srun`` on PATH, as on a login node) writes
    the sbatch script of our launcher's options; nothing is submitted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launcher = load_launcher("slurm", [
        "partition=gpu", "account=proj", "timeout_min=30", "gpus_per_node=1", "cpus_per_task=4",
        "mem_gb=32", "array_parallelism=8", "additional_parameters.exclusive=true",
        "setup=[source .venv/bin/activate]",
    ])
    executor = launcher.executor(tmp_path / "submitit")
    assert executor.cluster == "slurm"
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=30",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=32GB",
                 "#SBATCH --exclusive", "#SBATCH --job-name=fusion_bench_ace",
                 "source .venv/bin/activate"):
        assert line in script, line
    assert executor._executor.parameters["array_parallelism"] == 8


def test_ray_launcher_runs_tasks_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    launcher = load_launcher("ray", ["init.num_cpus=2", "init.log_to_driver=false"])
    map_division(launcher, tmp_path)


# --- the comparison runner through them -----------------------------------------------------------


def test_local_parallel_gives_the_sequential_table_cell_for_cell(sequential, reduced_gpt2_env,
                                                                 tmp_path):
    _, sequential_dir = sequential
    with patched_environ(reduced_gpt2_env):
        run_dir = run_comparison("mini_gpt2", METHODS, tmp_path / "out", ["run"],
                                 launcher=load_launcher("local_parallel"), log=quiet)
    assert scores(run_dir) == scores(sequential_dir)
    assert [r["method"] for r in scores(run_dir)] == METHODS
    # every job wrote its own report in its own directory, linked from the table's runs/
    reports = {m: (run_dir / "runs" / m / "program_report.json").resolve() for m in METHODS}
    assert all(p.is_file() for p in reports.values())
    assert len({p.parent for p in reports.values()}) == len(METHODS)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["launcher"]["name"] == "local_parallel"
    assert provenance["launcher"]["workers"] == 2


def test_rerunning_the_same_command_reuses_finished_jobs(sequential, reduced_gpt2_env):
    out, first = sequential
    messages = []
    with patched_environ(reduced_gpt2_env):
        again = run_comparison("mini_gpt2", METHODS, out, ["run"], log=messages.append)
    assert again != first and scores(again) == scores(first)
    jobs = json.loads((again / "provenance.json").read_text())["jobs"]
    assert all(job["reused"] for job in jobs.values())
    assert not any("job(s) on launcher" in str(m) for m in messages)  # nothing launched
    assert (again / "runs" / "ace").resolve() == (first / "runs" / "ace").resolve()

    # --rerun runs (here: one of) them again, into the same directory
    report = (first / "runs" / "pretrained" / "program_report.json").resolve()
    before = report.stat().st_mtime_ns
    with patched_environ(reduced_gpt2_env):
        rerun = run_comparison("mini_gpt2", ["pretrained"], out, ["run"], rerun=True, log=quiet)
    assert report.stat().st_mtime_ns != before
    assert scores(rerun) == scores(first)[:1]
    assert not json.loads((rerun / "provenance.json").read_text())["jobs"]["pretrained"]["reused"]


def test_slurm_path_through_submitit_gives_the_same_rows_and_a_failed_job_as_a_row(
        sequential, reduced_gpt2_env, tmp_path, monkeypatch):
    """The SLURM launcher with submitit's local executor (the code that builds the job array,
    run as local processes): the measured row equals the sequential one, and a job that fails is
    a row naming its log while the other row stays."""
    _, sequential_dir = sequential
    spec = load_benchmark("mini_gpt2")
    spec["methods"]["broken"] = ["method=no_such_method"]
    monkeypatch.setattr(runner_module, "load_benchmark", lambda name: spec)
    launcher = load_launcher("slurm", ["cluster=local", "gpus_per_node=0", "poll_s=1",
                                       "timeout_min=20", "partition=gpu"])
    with patched_environ(reduced_gpt2_env), pytest.raises(RuntimeError, match="1 method"):
        run_comparison("mini_gpt2", ["broken", "ace"], tmp_path / "out", ["run"],
                       launcher=launcher, log=quiet)
    run_dir = (tmp_path / "out" / "latest").resolve()
    assert len(list((run_dir / "launcher").glob("*/*_result.pkl"))) == 2  # submitit's own files
    expected = [r for r in scores(sequential_dir) if r["method"] == "ace"]
    assert scores(run_dir)[1:] == expected
    rows = {r["method"]: r for r in csv.DictReader((run_dir / "table.csv").open())}
    assert list(rows) == ["broken", "ace"]
    assert rows["broken"]["source"] == "failed" and rows["broken"]["average"] == ""
    assert rows["broken"]["notes"] == "exit 1; log: runs/broken/fusion_bench.log"
    assert "no_such_method" in (run_dir / "runs" / "broken" / "fusion_bench.log").read_text()
    assert ("| broken *(failed)*: exit 1; log: runs/broken/fusion_bench.log |"
            in (run_dir / "table.md").read_text())


def test_a_finished_entry_is_read_back_with_its_row(tmp_path, monkeypatch):
    """What a reused job gives the table: the row its first run saved (a tuned row's setting
    included), its report, and no second run."""
    from fusion_bench_ace.compare import jobs
    from fusion_bench_ace.compare.tables import Row
    from fusion_bench_ace.compare.variants import VariantResult

    calls = []

    def fake_entry(name, spec, log_dir, metric):
        calls.append(name)
        log_dir.mkdir(parents=True)
        (log_dir / "program_report.json").write_text('{"t": {"accuracy": 0.5}}')
        row = Row(name=name, scores={"t": 50.0}, average=50.0, setting="lambda=0.3, tuned")
        return VariantResult(name, ok=True, row=row, report={"t": {"accuracy": 0.5}},
                             log_dir=log_dir)

    monkeypatch.setattr(jobs, "run_entry", fake_entry)
    spec = {"overrides": ["a=1"], "methods": {"m": ["method=x"]}, "tasks": ["t"]}
    first = jobs.run_entries(["m"], spec, tmp_path, engine_folder=tmp_path / "e", log=quiet)
    again = jobs.run_entries(["m"], spec, tmp_path, engine_folder=tmp_path / "e", log=quiet)
    assert calls == ["m"] and again[0].reused and not first[0].reused
    assert again[0].row == first[0].row and again[0].report == first[0].report
    assert again[0].log_dir == first[0].log_dir
    changed = {**spec, "overrides": ["a=2"]}  # other settings: another directory, run again
    third = jobs.run_entries(["m"], changed, tmp_path, engine_folder=tmp_path / "e", log=quiet)
    assert calls == ["m", "m"] and third[0].log_dir != first[0].log_dir


class LosesEveryJob(Launcher):
    """An engine that runs nothing and reports every job lost (a node failure, say)."""

    config = {"name": "loses_every_job"}

    def map(self, fn, calls, folder, on_done=lambda i, r: None):
        results = [JobFailure("NodeFailure: the node went away", (f"{folder}/{i}.err",))
                   for i in range(len(calls))]
        for index, result in enumerate(results):
            on_done(index, result)
        return results


def test_a_job_the_launcher_lost_is_a_failed_run_naming_the_engines_logs(tmp_path):
    spec = {"overrides": [], "methods": {"a": ["method=dummy"], "b": ["method=dummy"]},
            "tasks": TASKS}
    results = run_entries(["a", "b"], spec, tmp_path / "jobs", launcher=LosesEveryJob(),
                          engine_folder=tmp_path / "engine", log=quiet)
    assert [r.method for r in results] == ["a", "b"]
    assert not any(r.ok for r in results)
    note = results[1].failure_note()
    assert "NodeFailure" in note and f"{tmp_path}/engine/1.err" in note
