"""The output folder: images, their sidecars, and a journal of finished jobs that makes a rerun resume.

    out/NAME_00.png              an output image (NAME from --name; _00, _01 ... in the workflow's order)
    out/NAME_00.json             its sidecar: the manifest row, the job key, the workflow's hash, worker, timings
    out/batch_journal.jsonl      one line per finished job: {"key", "row", "status": "done" | "failed", ...}
    out/batch_summary.json       the last run's summary (written at its end)

Every file is written under a temporary name (.NAME.partial) and renamed when complete, so a file
under its final name is always whole. A job counts as done once its journal line is written, after
all its files; a rerun skips done jobs whose files are all still there. One run at a time per folder
(a lock file).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from blip_diffusion_nodes.batch.jobs import BatchError

try:
    import fcntl
except ImportError:  # Windows: no lock; do not start two runs on one folder there
    fcntl = None

JOURNAL = "batch_journal.jsonl"
SUMMARY = "batch_summary.json"
LOCK = ".batch.lock"
PARTIAL = ".partial"


class OutputStore:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / LOCK, "w")
        if fcntl is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise BatchError(f"another batch run is writing to {self.out}") from None
        for stale in self.out.glob(f".*{PARTIAL}"):  # left by a run that was killed while writing
            stale.unlink()
        self.done: dict[str, dict] = {}
        journal = self.out / JOURNAL
        if journal.exists():
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash: that job was not finished
                if record.get("status") == "done":  # the latest line about a key wins
                    self.done[record["key"]] = record
                else:
                    self.done.pop(record.get("key"), None)
        self._journal = open(journal, "a", encoding="utf-8")

    def is_done(self, key: str) -> bool:
        """Finished in an earlier run and every file it wrote is still there."""
        record = self.done.get(key)
        return record is not None and all((self.out / name).is_file() for name in record["files"])

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.out / f".{name}{PARTIAL}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name says the file is complete
        os.replace(tmp, self.out / name)

    def write_job(self, name: str, images: list[tuple[str, bytes, dict]], record: dict[str, Any]) -> list[str]:
        """Write NAME_<i><ext> and NAME_<i>.json for each (ext, bytes, sidecar) in `images`, then journal the job
        as done (`record` + the file names). Returns the file names."""
        files = []
        for i, (ext, data, sidecar) in enumerate(images):
            stem = f"{name}_{i:02d}"
            self._write(stem + ext, data)
            self._write(
                stem + ".json", json.dumps({**sidecar, "file": stem + ext}, indent=1, ensure_ascii=False).encode()
            )
            files += [stem + ext, stem + ".json"]
        self._append({**record, "status": "done", "files": files})
        self.done[record["key"]] = {**record, "files": files}
        return files

    def record_failure(self, record: dict[str, Any]) -> None:
        self._append({**record, "status": "failed"})

    def _append(self, record: dict) -> None:
        self._journal.write(json.dumps({**record, "time": time.time()}, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def write_summary(self, summary: dict) -> None:
        self._write(SUMMARY, json.dumps(summary, indent=1, ensure_ascii=False).encode())

    def close(self) -> None:
        self._journal.close()
        self._lock.close()
