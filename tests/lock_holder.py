"""Test helper: another process that holds a folder's lock (training.locks) until it is stopped or killed."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from training.locks import folder_lock
with folder_lock(sys.argv[2], sys.argv[3]):
    print("locked", flush=True)
    time.sleep(600)
"""


def start_holder(folder: Path, lock_name: str = ".lock") -> subprocess.Popen:
    """Start a process that locks `folder` (lock file `lock_name`) and return it once it holds the lock."""
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(REPO_ROOT), str(folder), lock_name],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.strip() == "locked", f"the lock holder did not start: {line!r}"
    return proc


@contextmanager
def held_lock(folder: Path, lock_name: str = ".lock") -> Iterator[subprocess.Popen]:
    """A second process holds the lock on `folder` for the with-block (then is killed)."""
    proc = start_holder(folder, lock_name)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
