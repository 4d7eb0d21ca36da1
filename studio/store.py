"""The job queue and job state, in SQLite (stdlib ``sqlite3``). Nothing else lives here: runs, their
metrics and artifacts are read from the run folders, so a lost database loses only the queue."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# queued -> running -> done | failed | stopped; running -> interrupted (the studio was not there to see
# it end); a stopped or interrupted training job can be resumed (a new job with `--resume`).
STATES = ("queued", "running", "done", "failed", "stopped", "interrupted")
KINDS = ("train", "export", "serve")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    run TEXT NOT NULL,
    argv TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    pid INTEGER,
    pid_start REAL,
    rc INTEGER,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    log TEXT NOT NULL DEFAULT '',
    info TEXT NOT NULL DEFAULT '{}'
);
"""


@dataclass
class Job:
    id: int
    kind: str
    run: str
    argv: list[str]
    state: str
    pid: int | None
    pid_start: float | None
    rc: int | None
    stop_requested: bool
    created: float
    started: float | None
    ended: float | None
    log: str
    info: dict[str, Any]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "run": self.run, "state": self.state, "rc": self.rc,
                "created": self.created, "started": self.started, "ended": self.ended, "info": self.info,
                "stop_requested": self.stop_requested}


class JobStore:
    """Thread-safe access to ``studio.db``: one connection, one lock, short transactions."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, kind: str, run: str, argv: list[str], info: dict[str, Any] | None = None) -> Job:
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind}")
        with self._lock:
            cur = self._db.execute("INSERT INTO jobs (kind, run, argv, created, info) VALUES (?, ?, ?, ?, ?)",
                                   (kind, run, json.dumps(argv), time.time(), json.dumps(info or {})))
            job_id = int(cur.lastrowid or 0)
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, *, run: str | None = None, kind: str | None = None,
             states: tuple[str, ...] | None = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if run is not None:
            sql += " AND run = ?"
            args.append(run)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [_job(r) for r in rows]

    def update(self, job_id: int, **fields: Any) -> None:
        if "info" in fields:
            fields["info"] = json.dumps(fields["info"])
        if "argv" in fields:
            fields["argv"] = json.dumps(fields["argv"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def delete_run(self, run: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE run = ?", (run,))


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    return Job(id=d["id"], kind=d["kind"], run=d["run"], argv=json.loads(d["argv"]), state=d["state"],
               pid=d["pid"],
               pid_start=d["pid_start"], rc=d["rc"], stop_requested=bool(d["stop_requested"]),
               created=d["created"],
               started=d["started"], ended=d["ended"], log=d["log"], info=json.loads(d["info"]))
