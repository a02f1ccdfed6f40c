"""Background jobs for the UI: downloads, conversions, comparisons run off the request thread.

A job is a function ``work(job) -> str`` run in its own daemon thread. It reports through ``job.report(done, total,
text)`` and polls ``job.cancel`` (a ``threading.Event``) between steps. The runner refuses a second job that writes
the same target (the same output file, compared by absolute path), so two clicks never write one file twice; jobs on
different targets run side by side. Nothing here blocks the caller: ``start`` returns at once, the UI polls
``snapshot()``.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_fluxq.errors import FluxqError

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
KEEP_FINISHED = 20  # finished jobs kept for the UI's list


class JobConflict(FluxqError):
    """Another job is already writing the same target."""


@dataclass
class Job:
    id: int
    kind: str                     # "download" | "convert" | "compare"
    title: str
    target: str                   # normalized absolute path (or another unique key) the job writes
    state: str = RUNNING
    done: float = 0.0
    total: float | None = None
    text: str = "starting"
    result: str | None = None     # final message (or the error) once finished
    payload: Any = None           # the work function's return value when it is not a string (e.g. a table)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    history: list[str] = field(default_factory=list)   # progress texts, for the UI log and the tests

    def report(self, done: float, total: float | None, text: str) -> None:
        """Progress from the worker thread (cheap: called per tensor / per chunk)."""
        self.done, self.total, self.text = done, total, text
        if not self.history or self.history[-1] != text:
            self.history.append(text)
            del self.history[:-50]

    @property
    def fraction(self) -> float | None:
        if self.state == DONE:
            return 1.0
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    @property
    def active(self) -> bool:
        return self.state == RUNNING

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def snapshot(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "title": self.title, "target": self.target, "state": self.state,
                "fraction": self.fraction, "text": self.text, "result": self.result,
                "elapsed_s": round(self.elapsed(), 1), "cancelling": self.cancel.is_set() and self.active}


def target_key(path: str | os.PathLike[str]) -> str:
    """The identity of a target file: absolute, normalized, case-folded where the file system folds case."""
    return os.path.normcase(os.path.realpath(os.fspath(path)))


class JobRunner:
    """Starts jobs in threads and tracks them; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._next_id = 1

    def start(self, kind: str, title: str, target: str, work: Callable[[Job], Any]) -> Job:
        """Run ``work(job)`` in a new thread. Raises JobConflict when a running job writes ``target``."""
        key = target_key(target) if os.path.isabs(target) or os.sep in target else target
        with self._lock:
            for other in self._jobs.values():
                if other.active and other.target == key:
                    raise JobConflict(f"{os.path.basename(key) or key} is already being written by job "
                                      f"#{other.id} ({other.title}); wait for it or cancel it first")
            job = Job(id=self._next_id, kind=kind, title=title, target=key)
            self._next_id += 1
            self._jobs[job.id] = job
            self._forget_old()
        thread = threading.Thread(target=self._run, args=(job, work), name=f"fluxq-{kind}-{job.id}", daemon=True)
        thread.start()
        return job

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        try:
            value = work(job)
            if job.cancel.is_set():
                job.state, job.result = CANCELLED, "cancelled"
            else:
                job.state = DONE
                job.result = value if isinstance(value, str) else "done"
                job.payload = None if isinstance(value, str) else value
        except FluxqError as exc:
            job.state = CANCELLED if job.cancel.is_set() else FAILED
            job.result = str(exc)
        except Exception as exc:  # a bug must still end the job visibly, with the trace on the console
            traceback.print_exc()
            job.state, job.result = FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            job.finished = time.monotonic()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if not j.active]
        for job in sorted(finished, key=lambda j: j.id)[:-KEEP_FINISHED]:
            del self._jobs[job.id]

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: int) -> bool:
        job = self.get(job_id)
        if job is None or not job.active:
            return False
        job.cancel.set()
        return True

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: -j.id)

    def wait(self, job_id: int, timeout: float | None = None) -> Job | None:
        """Block until the job ends (tests and the CLI; the UI polls instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job is None or not job.active:
                return job
            if deadline is not None and time.monotonic() > deadline:
                return job
            time.sleep(0.02)
