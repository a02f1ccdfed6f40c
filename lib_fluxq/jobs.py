"""Background jobs for the UI: downloads, conversions, comparisons run off the request thread, a bounded number at a
time.

A job is a function ``work(job) -> value`` run in its own daemon thread. It reports through ``job.report(done, total,
text)`` and polls ``job.cancel`` (a ``threading.Event``) between steps. Nothing here blocks the caller: ``start``
returns at once, the UI polls ``jobs()``.

Bounds (a WebUI is often shared: ``--listen`` / ``--share``): per kind, at most ``Limit.running`` jobs run and
``Limit.waiting`` more wait in line; a start beyond that raises JobBusy with one line to show. A second job that writes
the same target (compared by real path) is refused with JobConflict, so two clicks never write one file twice. Disk
space is reserved through ``reserve``: a job is refused when the free space, less what the jobs in flight on the same
disk still have to write, cannot hold it. A finished or cancelled job gives back its slot and its reservation at
once; a job that was still waiting never runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_fluxq.errors import FluxqError

RUNNING, WAITING, DONE, FAILED, CANCELLED = "running", "waiting", "done", "failed", "cancelled"
KEEP_FINISHED = 20  # finished jobs kept for the UI's list
DISK_MARGIN = 64 * 1024 * 1024   # left free beyond every reservation: a full disk breaks everything else too


@dataclass(frozen=True)
class Limit:
    running: int   # jobs of the kind that run at once
    waiting: int   # more that wait in line; beyond this a start is refused as busy


# One conversion or comparison at a time: each holds a Flux block or tensor in float32 and several CPU threads (six
# parallel comparisons took a server to 4.4 GB and each ran 30x slower). Downloads are network-bound: two at once.
DEFAULT_LIMITS = {"convert": Limit(1, 2), "compare": Limit(1, 2), "download": Limit(2, 4)}
FALLBACK_LIMIT = Limit(1, 2)
LIMITS_ENV = "FLUXQ_JOB_LIMITS"   # e.g. "convert=1:2,compare=1:0,download=3:6" (running:waiting per kind)
KIND_WORDS = {"convert": ("conversion", "conversions"), "compare": ("comparison", "comparisons"),
              "download": ("download", "downloads")}


class JobConflict(FluxqError):
    """Another job is already writing the same target."""


class JobBusy(FluxqError):
    """As many jobs of this kind run and wait as the server takes."""


class NotEnoughSpace(FluxqError):
    """The disk cannot hold the job's output beside what the jobs in flight still have to write."""


@dataclass
class Job:
    id: int
    kind: str                     # "download" | "convert" | "compare"
    title: str                    # shown to every visitor: base names only, never a folder
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
    reserved: int = 0             # bytes of disk space promised to this job (``JobRunner.reserve``)
    reserved_device: int | None = None
    bytes_left: int | None = None  # what it still has to write, when the work function knows it exactly
    on_forget: list[Callable[[], None]] = field(default_factory=list)   # run when the job leaves the list

    def report(self, done: float, total: float | None, text: str, bytes_left: int | None = None) -> None:
        """Progress from the worker thread (cheap: called per tensor / per chunk)."""
        self.done, self.total, self.text = done, total, text
        if bytes_left is not None:
            self.bytes_left = bytes_left
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
        """Running or waiting for a slot."""
        return self.state in (RUNNING, WAITING)

    def outstanding_bytes(self) -> int:
        """Reserved disk space this job has not written yet (0 once it ended)."""
        if not self.active or not self.reserved:
            return 0
        if self.bytes_left is not None:
            return max(0, min(self.reserved, self.bytes_left))
        return int(self.reserved * (1.0 - (self.fraction or 0.0)))

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def snapshot(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "title": self.title, "target": self.target, "state": self.state,
                "fraction": self.fraction, "text": self.text, "result": self.result,
                "elapsed_s": round(self.elapsed(), 1), "cancelling": self.cancel.is_set() and self.active}


def limits_from_env(environ: dict[str, str] | None = None) -> dict[str, Limit]:
    """DEFAULT_LIMITS with the kinds that ``FLUXQ_JOB_LIMITS`` sets replaced (a server admin's choice)."""
    text = (os.environ if environ is None else environ).get(LIMITS_ENV, "").strip()
    limits = dict(DEFAULT_LIMITS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, numbers = item.partition("=")
        running, _, waiting = numbers.partition(":")
        try:
            limit = Limit(int(running), int(waiting or 0))
        except ValueError:
            raise FluxqError(f"{LIMITS_ENV}: '{item}' is not KIND=RUNNING:WAITING (e.g. convert=1:2)") from None
        if kind.strip() not in KIND_WORDS or limit.running < 1 or limit.waiting < 0:
            raise FluxqError(f"{LIMITS_ENV}: '{item}': the kinds are {', '.join(KIND_WORDS)}, with at least one "
                             f"running and zero or more waiting")
        limits[kind.strip()] = limit
    return limits


def target_key(path: str | os.PathLike[str]) -> str:
    """The identity of a target file: absolute, normalized, case-folded where the file system folds case."""
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def _existing_parent(folder: str) -> str:
    """``folder`` or its nearest existing parent (a download creates its folder only when it starts writing)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class JobRunner:
    """Starts jobs in threads within per-kind limits and tracks them; safe to call from any thread."""

    def __init__(self, limits: dict[str, Limit] | None = None) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._work: dict[int, Callable[[Job], Any]] = {}   # waiting jobs' work functions
        self._next_id = 1
        self.limits = limits_from_env() if limits is None else dict(limits)

    def limit(self, kind: str) -> Limit:
        return self.limits.get(kind, FALLBACK_LIMIT)

    def start(self, kind: str, title: str, target: str, work: Callable[[Job], Any]) -> Job:
        """Run ``work(job)`` in a new thread now, or queue it while the kind's slots are taken.

        Raises JobConflict when an active job writes ``target``, JobBusy when the kind's line is full.
        """
        key = target_key(target) if os.path.isabs(target) or os.sep in target else target
        with self._lock:
            for other in self._jobs.values():
                if other.active and other.target == key:
                    raise JobConflict(f"{os.path.basename(key) or key} is already being written by job "
                                      f"#{other.id} ({other.title}); wait for it or cancel it first")
            limit = self.limit(kind)
            running = sum(1 for j in self._jobs.values() if j.kind == kind and j.state == RUNNING)
            waiting = sum(1 for j in self._jobs.values() if j.kind == kind and j.state == WAITING)
            if running < limit.running:
                state = RUNNING
            elif waiting < limit.waiting:
                state = WAITING
            else:
                one, many = KIND_WORDS.get(kind, (kind, kind + "s"))
                raise JobBusy(f"busy: {running} {one if running == 1 else many} running and {waiting} waiting, the "
                              f"most this server takes; try again when one has finished")
            job = Job(id=self._next_id, kind=kind, title=title, target=key, state=state)
            if state == WAITING:
                job.text = "waiting for a free slot"
                self._work[job.id] = work
            self._next_id += 1
            self._jobs[job.id] = job
            forgotten = self._forget_old()
        self._run_callbacks(forgotten)
        if state == RUNNING:
            self._launch(job, work)
        return job

    def _launch(self, job: Job, work: Callable[[Job], Any]) -> None:
        thread = threading.Thread(target=self._run, args=(job, work), name=f"fluxq-{job.kind}-{job.id}", daemon=True)
        thread.start()

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        try:
            value = work(job)
            if job.cancel.is_set():
                job.state, job.result = CANCELLED, "cancelled"
            else:
                job.result = value if isinstance(value, str) else "done"
                job.payload = None if isinstance(value, str) else value
                job.state = DONE
        except FluxqError as exc:
            job.result = str(exc)
            job.state = CANCELLED if job.cancel.is_set() else FAILED
        except Exception as exc:  # a bug must still end the job visibly, with the trace on the console
            traceback.print_exc()
            job.result = f"{type(exc).__name__}: {exc}"
            job.state = FAILED
        finally:
            job.finished = time.monotonic()
            self._next_waiting(job.kind)

    def _next_waiting(self, kind: str) -> None:
        """A slot of ``kind`` is free: start the oldest waiting job of that kind."""
        with self._lock:
            running = sum(1 for j in self._jobs.values() if j.kind == kind and j.state == RUNNING)
            if running >= self.limit(kind).running:
                return
            queued = sorted((j for j in self._jobs.values() if j.kind == kind and j.state == WAITING),
                            key=lambda j: j.id)
            if not queued:
                return
            job = queued[0]
            job.state, job.text, job.started = RUNNING, "starting", time.monotonic()
            work = self._work.pop(job.id)
        self._launch(job, work)

    def _forget_old(self) -> list[Job]:
        """Drop the oldest finished jobs beyond KEEP_FINISHED (under the lock); returns them for their callbacks."""
        finished = [j for j in self._jobs.values() if not j.active]
        dropped = sorted(finished, key=lambda j: j.id)[:-KEEP_FINISHED] if len(finished) > KEEP_FINISHED else []
        for job in dropped:
            del self._jobs[job.id]
        return dropped

    @staticmethod
    def _run_callbacks(jobs: list[Job]) -> None:
        for job in jobs:
            for callback in job.on_forget:
                with contextlib.suppress(OSError):
                    callback()

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: int) -> bool:
        """Stop a job. A waiting job ends at once and never runs."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or not job.active:
                return False
            job.cancel.set()
            if job.state == WAITING:
                self._work.pop(job.id, None)
                job.state, job.result, job.finished = CANCELLED, "cancelled before it started", time.monotonic()
        return True

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: -j.id)

    def counts(self, kind: str) -> tuple[int, int]:
        """(running, waiting) jobs of ``kind``."""
        with self._lock:
            states = [j.state for j in self._jobs.values() if j.kind == kind]
        return states.count(RUNNING), states.count(WAITING)

    def reserve(self, job: Job, folder: str, nbytes: int, label: str) -> None:
        """Promise ``nbytes`` of the disk holding ``folder`` to ``job``, counting what the other jobs in flight on
        that disk still have to write. Raises NotEnoughSpace (naming ``label``, the file) when it does not fit."""
        probe = _existing_parent(folder)
        try:
            device = os.stat(probe).st_dev
            free = shutil.disk_usage(probe).free
        except OSError:
            return   # cannot tell: the writer's own checks and errors still apply
        with self._lock:
            others = [j for j in self._jobs.values()
                      if j is not job and j.active and j.reserved_device == device and j.reserved]
            promised = sum(j.outstanding_bytes() for j in others)
            if free - promised < nbytes + DISK_MARGIN:
                busy = f", of which {size_text(promised)} is promised to {len(others)} job(s) in flight" \
                    if promised else ""
                raise NotEnoughSpace(f"not enough space for {label}: it needs {size_text(nbytes + DISK_MARGIN)}, "
                                     f"{size_text(free)} free{busy}; free some space"
                                     f"{' or wait for them to finish' if promised else ''}")
            job.reserved, job.reserved_device = int(nbytes), device

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


# errno values of a file system that has no hard links (FAT / exFAT, some network shares)
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EPERM),
             getattr(errno, "EOPNOTSUPP", errno.EPERM)}


def place_file(tmp: str, dst: str, replace: bool = False) -> None:
    """Give the finished ``tmp`` its final name ``dst`` (same folder) in one step.

    Without ``replace`` an existing ``dst`` is never overwritten, not even one that appeared after the caller last
    looked: a hard link fails when the name exists (the O_EXCL of renames), and only then is ``tmp`` unlinked.
    Raises FileExistsError, leaving ``tmp`` in place. Where hard links are not supported, Windows' rename refuses an
    existing name just as well; elsewhere a last check narrows the window to the rename itself.
    """
    if replace:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.name != "nt" and os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "file exists", dst) from None
        os.rename(tmp, dst)
        return
    os.unlink(tmp)
