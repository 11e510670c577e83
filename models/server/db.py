"""Job records in SQLite under the server's working directory, so a restarted server still lists past jobs."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional

RUNNING = "running"
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    options TEXT NOT NULL,
    command TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    exit_code INTEGER,
    pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 1,
    summary TEXT,
    error TEXT
)
"""
_JSON_COLUMNS = ("options", "command")


class JobStore:
    """One connection guarded by a lock: jobs are written from request handlers and from process watchers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def insert(self, job_id: str, stage: str, options: dict, command: list[str]) -> dict:
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, stage, options, command, status, created) VALUES (?, ?, ?, ?, ?, ?)",
                             (job_id, stage, json.dumps(options), json.dumps(command), RUNNING, time.time()))
        return self.get(job_id)

    def update(self, job_id: str, **fields) -> None:
        for key in _JSON_COLUMNS:
            if key in fields:
                fields[key] = json.dumps(fields[key])
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _as_dict(row) if row else None

    def list(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC").fetchall()
        return [_as_dict(row) for row in rows]

    def running(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
        return [_as_dict(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _as_dict(row: sqlite3.Row) -> dict:
    record = dict(row)
    for key in _JSON_COLUMNS:
        record[key] = json.loads(record[key])
    return record
