"""Where the comparison runner's jobs run: this machine, one after another or several at once,
a SLURM cluster (submitit), or a Ray cluster.

A job is one call of a module-level function (one entry of a table - a method or a grid point -
:func:`fusion_bench_ace.compare.jobs.entry_job`), which writes everything into the job's own
directory. A launcher runs the calls and hands back each call's return value, in the order of
the calls, or a :class:`JobFailure` when the engine could not run the call to its end (a SLURM
job killed at its time limit, a lost Ray worker). No scheduling happens here: the engines do it.

Launchers are configured by ``config/launcher/<name>.yaml`` (``_target_`` one of the classes
below) and chosen with ``compare run|sweep --launcher <name> [key=value ...]``
(:func:`load_launcher`); docs/scale_out.md says which engine is behind which and why.
"""

from __future__ import annotations

import concurrent.futures
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..paths import config_dir

OnDone = Callable[[int, Any], None]
"""Called as each job ends, with its index in the calls and its result (or JobFailure)."""


@dataclass
class JobFailure:
    """A job the launcher could not run to its end: why, and where the engine's logs are."""

    error: str
    logs: Tuple[str, ...] = ()


def _ignore(index: int, result: Any) -> None:
    pass


class Launcher:
    """Runs ``fn(*call)`` once per call, each as its own job."""

    config: Dict[str, Any] = {}
    """The launcher's name and options as loaded (recorded in the table's provenance)."""

    def map(
        self, fn: Callable[..., Any], calls: Sequence[tuple], folder: Path,
        on_done: OnDone = _ignore,
    ) -> List[Any]:
        """Each call's result, or a :class:`JobFailure`, in the order of ``calls``. ``folder``:
        where the engine may keep its own files (submitit's pickles and logs)."""
        raise NotImplementedError


class LocalLauncher(Launcher):
    """Jobs on this machine: one after another (``workers: 1``), or ``workers`` at a time.

    A job's work happens in the ``fusion_bench`` process it starts, so a thread per running job
    (:class:`concurrent.futures.ThreadPoolExecutor`) is all the parallel case needs.
    """

    def __init__(self, workers: int = 1):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer; got {workers!r}")
        self.workers = workers

    def map(self, fn, calls, folder, on_done=_ignore):
        results: List[Any] = [None] * len(calls)
        if self.workers == 1:
            for index, call in enumerate(calls):
                results[index] = _call(fn, call)
                on_done(index, results[index])
            return results
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(_call, fn, call): i for i, call in enumerate(calls)}
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                on_done(index, results[index])
        return results


def _call(fn, call):
    try:
        return fn(*call)
    except Exception as error:  # the job's own failure, kept as its row, not the table's end
        return JobFailure(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")


class SubmititLauncher(Launcher):
    """Jobs as a SLURM job array through `submitit <https://github.com/facebookincubator/submitit>`_
    (the engine behind Hydra's submitit launcher plugin).

    Args:
        cluster: submitit's executor: ``slurm``; ``local`` runs the same jobs as local processes
            (all at once) and ``debug`` in this process, for trying a configuration without a
            cluster; ``null`` picks SLURM when ``srun`` is found.
        timeout_min, gpus_per_node, cpus_per_task, mem_gb: per job (submitit's generic names).
        partition, account, qos, constraint: SLURM's options of those names.
        array_parallelism: at most this many jobs of the array run at once.
        additional_parameters: any other ``#SBATCH`` option, e.g. ``{exclusive: true}``.
        setup: shell lines run before each job (``module load ...``, activating the env).
        poll_s: how often to ask the cluster whether jobs have ended.
    """

    def __init__(
        self,
        cluster: Optional[str] = "slurm",
        timeout_min: int = 60,
        gpus_per_node: int = 0,
        cpus_per_task: int = 1,
        mem_gb: Optional[float] = None,
        partition: Optional[str] = None,
        account: Optional[str] = None,
        qos: Optional[str] = None,
        constraint: Optional[str] = None,
        array_parallelism: Optional[int] = None,
        additional_parameters: Optional[Dict[str, Any]] = None,
        setup: Optional[Sequence[str]] = None,
        poll_s: float = 15.0,
        job_name: str = "fusion_bench_ace",
    ):
        self.cluster = cluster
        self.poll_s = poll_s
        generic = {"timeout_min": timeout_min, "gpus_per_node": gpus_per_node,
                   "cpus_per_task": cpus_per_task, "mem_gb": mem_gb, "name": job_name}
        slurm = {"partition": partition, "account": account, "qos": qos,
                 "constraint": constraint, "array_parallelism": array_parallelism,
                 "additional_parameters": dict(additional_parameters or {}) or None,
                 "setup": list(setup or []) or None}
        self.parameters = {
            **{k: v for k, v in generic.items() if v is not None},
            **{f"slurm_{k}": v for k, v in slurm.items() if v is not None},
        }

    def executor(self, folder: Path):
        """submitit's executor for ``folder`` with this launcher's parameters (SLURM's are
        checked by submitit whichever ``cluster`` runs the jobs)."""
        import submitit

        executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=self.cluster)
        executor.update_parameters(**self.parameters)
        return executor

    def map(self, fn, calls, folder, on_done=_ignore):
        import submitit

        if not calls:
            return []
        executor = self.executor(folder)
        jobs = executor.map_array(fn, *zip(*calls))
        index_of = {id(job): i for i, job in enumerate(jobs)}
        results: List[Any] = [None] * len(calls)
        for job in submitit.helpers.as_completed(jobs, poll_frequency=self.poll_s):
            index = index_of[id(job)]
            try:
                results[index] = job.result()
            except Exception as error:  # the job died (time limit, node, pickling): its logs
                results[index] = JobFailure(
                    f"{type(error).__name__}: {error}",
                    (str(job.paths.stdout), str(job.paths.stderr)),
                )
            on_done(index, results[index])
        return results


class RayLauncher(Launcher):
    """Jobs as Ray tasks (``ray.remote``), on a running Ray cluster or one started here.

    Args:
        address: ``null`` starts Ray on this machine for the run; ``auto`` joins the cluster
            that ``ray start`` runs on this node; ``ray://<head>:10001`` a remote one.
        num_cpus, num_gpus: resources each job asks Ray for.
        init: further ``ray.init`` arguments (``{num_cpus: 2}``: the size of a local instance).
    """

    def __init__(
        self,
        address: Optional[str] = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        init: Optional[Dict[str, Any]] = None,
    ):
        self.address = address
        self.resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self.init = dict(init or {})

    def map(self, fn, calls, folder, on_done=_ignore):
        import ray

        if not calls:
            return []
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, **self.init)
        try:
            remote = ray.remote(max_retries=0, **self.resources)(_call)
            pending = {remote.remote(fn, call): i for i, call in enumerate(calls)}
            results: List[Any] = [None] * len(calls)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                try:
                    results[index] = ray.get(done[0])
                except Exception as error:  # the task died: Ray keeps its logs on the node
                    results[index] = JobFailure(
                        f"{type(error).__name__}: {error}",
                        ("the Ray worker's log on its node (/tmp/ray/session_latest/logs)",),
                    )
                on_done(index, results[index])
            return results
        finally:
            if started:
                ray.shutdown()


# --- config/launcher/*.yaml -----------------------------------------------------------------------


def launcher_config_dir() -> Path:
    return config_dir() / "launcher"


def available_launchers() -> List[str]:
    return sorted(p.stem for p in launcher_config_dir().glob("*.yaml"))


def load_launcher(name: str = "local", overrides: Sequence[str] = ()) -> Launcher:
    """The launcher of ``config/launcher/<name>.yaml`` with ``key=value`` overrides applied."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = launcher_config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown launcher {name!r}; available: {', '.join(available_launchers())}"
        )
    config = OmegaConf.load(path)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"launcher options are key=value; got {item!r}")
        if key.split(".")[0] not in config or key.startswith("_"):
            options = ", ".join(k for k in config if not str(k).startswith("_"))
            raise ValueError(f"launcher {name!r} has no option {key!r}; its options: {options}")
    config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    try:
        launcher = instantiate(config, _convert_="all")
    except InstantiationException as error:  # say what was wrong, not where Hydra caught it
        raise ValueError(f"launcher {name!r}: {error.__cause__ or error}") from error
    launcher.config = {"name": name, **OmegaConf.to_container(config, resolve=True)}
    return launcher

