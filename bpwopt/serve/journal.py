"""The job list a server keeps on disk, so that a restarted server still shows (and resumes) its jobs.

One JSON file, replaced atomically at each change of a job's status (not at each
progress tick): a server killed at any moment leaves the list as it was at the
last change. The newest JOURNAL_JOBS jobs are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bpwopt.errors import BpwoptError
from bpwopt.formats.output_paths import write_small_file

JOURNAL_NAME = ".bpwopt-serve-jobs.json"  # in the first root unless --jobs-file names another
JOURNAL_JOBS = 500
LOG_LINES = 200  # of each job's own lines, the last ones


def read_journal(path: Path) -> list[dict]:
    """The jobs stored at path, oldest first; none if there is no file yet. BpwoptError if it is not a job list."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BpwoptError(f"{path}: not a bpwopt serve job list ({error}); move it away or give --jobs-file") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "id" in r for r in records):
        raise BpwoptError(f"{path}: not a bpwopt serve job list; move it away or give --jobs-file")
    return records


class Journal:
    """Writes the job list to path; a failure is said once on stderr and the server goes on without it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failed = False

    def write(self, records: list[dict]) -> None:
        kept = [record | {"log": record.get("log", [])[-LOG_LINES:]} for record in records[-JOURNAL_JOBS:]]
        try:
            write_small_file(self.path, json.dumps(kept, indent=1).encode(), what="job list")
            self._failed = False
        except BpwoptError as error:
            if not self._failed:
                print(f"bpwopt: warning: jobs are not remembered across restarts: {error}", file=sys.stderr)
            self._failed = True
