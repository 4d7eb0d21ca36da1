"""The job runner: one training or export job at a time from the queue, each a ``kiln`` command in its
own process (its own session, so it outlives a studio restart); serving jobs run beside them.

A studio that restarts finds a job it started still running (same process id and start time) and
follows it, or marks it interrupted; an interrupted or stopped training run resumes with ``--resume``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kiln.fsutil import _start_time
from kiln.studio.config import StudioConfig
from kiln.studio.store import Job, JobStore

log = logging.getLogger("kiln.studio")

QUEUED_KINDS = ("train", "export")  # one at a time; serve jobs start at once
EXIT_INTERRUPTED = 130


class JobRunner:
    """Starts queued jobs and records how they end. ``tick`` does one round (tests call it directly);
    ``start`` runs it every ``interval`` seconds on a thread."""

    def __init__(self, cfg: StudioConfig, store: JobStore, interval: float = 0.25) -> None:
        self.cfg = cfg
        self.store = store
        self.interval = interval
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.logs = cfg.state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="kiln-studio-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread. Running jobs go on (their own sessions): the next studio finds them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a bad round must not end the runner
                log.exception("job runner")

    def recover(self) -> None:
        """Jobs the database says are running: followed again if their process is still the one started,
        otherwise interrupted."""
        for job in self.store.list(states=("running",)):
            if job.id in self._procs:
                continue
            if not self._alive(job):
                self.store.update(job.id, state="interrupted", ended=time.time())
                log.info("job %d (%s %s) was interrupted while the studio was away", job.id, job.kind,
                         job.run)

    # ---- one round -------------------------------------------------------------------------------

    def tick(self) -> None:
        with self._lock:
            for job in self.store.list(states=("running",)):
                self._check(job)
            busy = self.store.list(states=("running",))
            if not any(j.kind in QUEUED_KINDS for j in busy):
                queued = [j for j in self.store.list(states=("queued",)) if j.kind in QUEUED_KINDS]
                if queued:
                    self._launch(queued[0])
            for job in self.store.list(states=("queued",), kind="serve"):
                self._launch(job)

    def _check(self, job: Job) -> None:
        proc = self._procs.get(job.id)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return
            self._procs.pop(job.id, None)
        elif self._alive(job):
            return
        else:
            rc = None  # a process from before a restart: its exit status is gone
        step = int(job.info.get("step", 0))
        if rc == 0 and step + 1 < len(job.argv) and not job.stop_requested:
            self._launch(job, step + 1)
            return
        if job.stop_requested:
            state = "stopped"
        elif rc is None:
            state = "interrupted"
        else:
            state = "done" if rc == 0 else "failed"
        self.store.update(job.id, state=state, rc=rc, ended=time.time(), pid=None)
        log.info("job %d (%s %s): %s (exit %s)", job.id, job.kind, job.run, state, rc)

    def _launch(self, job: Job, step: int = 0) -> None:
        """Start command ``step`` of ``job``: stderr appends to the job's log, stdout goes to its own file
        (the commands' ``--json`` results)."""
        argv = [sys.executable, "-m", "kiln.studio.launch", *job.argv[step]]
        log_path = self.logs / f"job-{job.id}.log"
        out_path = self.logs / f"job-{job.id}.{step}.out"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.cfg.extra_env}
        env.pop("KILN_STUDIO_TOKEN", None)  # a job has no use for the studio's token
        with open(log_path, "ab") as err, open(out_path, "wb") as out:
            err.write(f"$ kiln {' '.join(job.argv[step])}\n".encode())
            err.flush()
            try:
                proc = subprocess.Popen(argv, cwd=self.cfg.workspace, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, env=env, start_new_session=True)
            except OSError as exc:
                err.write(f"cannot start: {exc}\n".encode())
                self.store.update(job.id, state="failed", ended=time.time())
                return
        self._procs[job.id] = proc
        info = {**job.info, "step": step}
        now = time.time()
        self.store.update(job.id, state="running", pid=proc.pid, pid_start=_start_time(proc.pid) or now,
                          started=job.started or now, log=str(log_path), info=info)

    # ---- requests --------------------------------------------------------------------------------

    def stop(self, job: Job) -> None:
        """A queued job never starts; a running one gets SIGINT (training: a clean stop at the next batch,
        resumable; a second stop stops at once); a server gets SIGTERM (a graceful drain)."""
        with self._lock:
            job = self.store.get(job.id) or job
            if job.state == "queued":
                self.store.update(job.id, state="stopped", stop_requested=1, ended=time.time())
                return
            if job.state != "running" or job.pid is None:
                return
            self.store.update(job.id, stop_requested=1)
            if self._alive(job):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(job.pid, signal.SIGTERM if job.kind == "serve" else signal.SIGINT)

    def wait(self, job_id: int, timeout: float) -> Job:
        """Block until the job has ended (tests, and deleting a run)."""
        end = time.monotonic() + timeout
        while True:
            self.tick()
            job = self.store.get(job_id)
            assert job is not None
            if job.state not in ("queued", "running") or time.monotonic() > end:
                return job
            time.sleep(0.05)

    def _alive(self, job: Job) -> bool:
        proc = self._procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        if job.pid is None:
            return False
        try:
            os.kill(job.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # another user's process took the id
        started = _start_time(job.pid)
        # the same process: /proc's start time is as recorded (a reused pid starts later)
        return started is None or job.pid_start is None or abs(started - job.pid_start) < 2.0

    def log_path(self, job: Job) -> Path:
        return self.logs / f"job-{job.id}.log"

    def out_path(self, job: Job, step: int) -> Path:
        return self.logs / f"job-{job.id}.{step}.out"
