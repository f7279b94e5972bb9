"""The folder the processes of one ``bentoml serve`` share: replicas' ready marks, the model
processes' ipc sockets, and the word that the server cannot serve (the model cannot load, a model
process cannot listen).

BentoML's arbiter is the parent of every HTTP worker and model process it runs, so its pid names
the folder (``/tmp/vit-serve-<pid>``) and no two servers on a host collide. The arbiter claims it
(``claim_run_folder``: empty at start, removed at exit); the workers find it by their parent's pid.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

__all__ = [
    "FAILED_EXIT",
    "ReadyMarks",
    "claim_run_folder",
    "failure_reported",
    "model_folder",
    "report_failure",
    "run_folder",
]

FAILED_EXIT = 3  # `bentoml serve`'s exit status when it cannot serve (see report_failure)


def run_folder(run_id: int | None = None) -> Path:
    """A private folder shared by the processes of one ``bentoml serve``.

    BentoML's arbiter is the parent of every HTTP worker and model process it runs, so its pid
    names the folder and no two servers on a host collide.
    """
    run = os.getppid() if run_id is None else run_id
    folder = Path(tempfile.gettempdir()) / f"vit-serve-{run}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def model_folder(folder: Path | None, index: int) -> Path | None:
    """Where model ``index`` of several (``VIT_MODELS``) keeps its ready marks, swap files and
    sockets: the run folder ``folder`` (None: this server's, found when used) for the first,
    the default, and a folder of its own inside it for each other."""
    if index == 0:
        return folder
    own = (folder or run_folder()) / f"model-{index}"
    own.mkdir(mode=0o700, exist_ok=True)
    return own


def claim_run_folder() -> Path:
    """In the arbiter (the process whose pid names the folder): start from an empty folder and
    remove it at exit, so no mark or socket of an earlier server whose pid this one reuses can
    count, and nothing is left behind in the temp folder."""
    folder = run_folder(os.getpid())
    for stale in folder.iterdir():
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    atexit.register(_release_run_folder, folder)
    return folder


def _release_run_folder(folder: Path) -> None:
    failed = folder / "failed"
    error = failed.read_text() if failed.exists() else None
    shutil.rmtree(folder, ignore_errors=True)
    if error is not None:
        print(f"vit-serve: {error}", file=sys.stderr, flush=True)
        os._exit(FAILED_EXIT)


class ReadyMarks:
    """Which replicas of this server are warmed up, so any one of them can answer ``/readyz``
    for all: each writes its pid to ``replica-N.ready`` once warm; a mark whose process is gone
    (a replica that died and is being restarted) does not count."""

    def __init__(self, replicas: int, folder: Path | None = None) -> None:
        self.replicas = replicas
        self.folder = folder

    def _path(self, index: int) -> Path:
        return (self.folder or run_folder()) / f"replica-{index}.ready"

    def mark(self, index: int) -> None:
        """This process (replica ``index``) is warm."""
        self._path(index).write_text(str(os.getpid()))

    def _alive(self, index: int) -> bool:
        try:
            pid = int(self._path(index).read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def all_ready(self) -> bool:
        """Every replica has marked itself warm and is still alive."""
        return all(self._alive(index) for index in range(self.replicas))

    def others_ready(self, index: int) -> bool:
        """Some replica other than ``index`` is warm and alive (so ``index`` is a respawn)."""
        return any(self._alive(other) for other in range(self.replicas) if other != index)

    def started(self) -> bool:
        """Every replica was warm at once at least once since the server started; from then on
        each replica answers readiness for itself (a respawning one does not listen)."""
        folder = self.folder or run_folder()
        if (folder / "started").exists():
            return True
        if self.all_ready():
            (folder / "started").touch()
            return True
        return False


def failure_reported() -> bool:
    """Whether a worker of this server reported that it cannot serve."""
    return (run_folder() / "failed").exists()


def report_failure(error: str) -> None:
    """A worker cannot serve (its model cannot load with ``VIT_ON_LOAD_FAILURE=exit``, or a
    model process cannot listen): leave ``error`` (what failed, and why) for the arbiter and ask
    it to stop the server; it then prints the error last and exits with ``FAILED_EXIT``."""
    (run_folder() / "failed").write_text(error)
    os.kill(os.getppid(), signal.SIGTERM)
