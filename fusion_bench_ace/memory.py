"""Process memory the way it fails: resident (RSS) and anonymous (``RssAnon``), sampled.

RSS counts the file-backed pages of memory-mapped checkpoints, which the kernel drops when it
needs the room; anonymous memory (tensors, allocator caches) is what runs a machine out of
memory. Both are sampled from ``/proc`` (Linux) every few milliseconds in a background thread, of
this process (:class:`MemorySampler`) or of another process and its children
(:class:`ProcessTreeSampler`, for a command run in a subprocess). Elsewhere only the process's own
peak RSS is known (``resource``), and anonymous memory is reported as ``None``.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Dict, Optional

__all__ = ["MemorySampler", "ProcessTreeSampler", "memory_of"]

MIB = 2**20


def memory_of(pid: int | str = "self") -> Dict[str, Optional[int]]:
    """``{"rss": bytes, "anon": bytes}`` of a process now (``anon`` is ``None`` off Linux)."""
    try:
        values = {}
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    values[key] = int(rest.split()[0]) * 1024
        return {"rss": values.get("VmRSS", 0), "anon": values.get("RssAnon")}
    except OSError:
        if pid != "self":
            return {"rss": 0, "anon": None}
        return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "anon": None}


class _Sampler:
    """Peaks of RSS and anonymous memory, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start: Dict[str, Optional[int]] = {"rss": 0, "anon": None}
        self.peak: Dict[str, Optional[int]] = {"rss": 0, "anon": None}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Dict[str, Optional[int]]:
        raise NotImplementedError

    def _update(self) -> None:
        now = self._read()
        for key, value in now.items():
            if value is not None:
                self.peak[key] = max(self.peak[key] or 0, value)

    def __enter__(self):
        self.start = self._read()
        self.peak = dict(self.start)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._update()

    def mib(self) -> Dict[str, Optional[float]]:
        """Start and peak of both, and the peaks above the start, in MiB (``None`` if unknown)."""
        def to_mib(value):
            return None if value is None else value / MIB

        out = {}
        for key in ("rss", "anon"):
            start, peak = self.start.get(key), self.peak.get(key)
            out[f"start_{key}_mib"] = to_mib(start)
            out[f"peak_{key}_mib"] = to_mib(peak)
            out[f"peak_{key}_above_start_mib"] = (None if start is None or peak is None
                                                  else to_mib(peak - start))
        return out


class MemorySampler(_Sampler):
    """This process's memory while the ``with`` block runs."""

    def _read(self):
        return memory_of("self")


class ProcessTreeSampler(_Sampler):
    """The memory of process ``pid`` and its descendants (summed) while the block runs: for a
    command in a subprocess, e.g. ``torchrun``'s workers or another tool."""

    def __init__(self, pid: int, interval: float = 0.005):
        super().__init__(interval)
        self.pid = pid

    def _read(self):
        total = {"rss": 0, "anon": 0}
        for pid in _descendants(self.pid):
            values = memory_of(pid)
            total["rss"] += values["rss"]
            if values["anon"] is None:
                total["anon"] = None
            elif total["anon"] is not None:
                total["anon"] += values["anon"]
        return total


def _descendants(pid: int):
    """``pid`` and every process below it (from ``/proc/<pid>/task/*/children``)."""
    pending, seen = [pid], []
    while pending:
        current = pending.pop()
        seen.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except OSError:
            continue
    return seen
