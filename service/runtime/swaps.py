"""A new model version, put in service by every replica of one ``bentoml serve`` together, in
full or as a canary taking a share of the traffic.

The replicas share nothing but the run folder, so a change is a two-phase protocol in files
there. The replica whose HTTP worker took the call coordinates (``SwapBoard.load``,
``SwapBoard.traffic``); every replica, that one included, follows (``SwapBoard.follow``,
polled):

1. the coordinator takes ``swap.lock`` (one change at a time, whichever worker took the call)
   and writes ``swap.json``: an attempt id, the version, its source, phase ``prepare``;
2. each replica loads and warms the version beside what it serves, and says ``prepared`` (or
   ``failed`` and why) in ``replica-N.swap``;
3. all prepared: the coordinator writes ``serving.json`` (what a replica restarted from now on
   loads) and phase ``commit`` with the new version's share (100: it replaces the version
   served; less: a canary beside it); each replica switches at once, a version it stops
   serving answers what it holds and is freed, and it says ``switched``. One failed: phase
   ``abort``; each drops what it prepared (``dropped``) and serves on as before.

A change of shares alone (``traffic``: a canary's percent; 100 promotes it, 0 retires it) is one
phase, ``traffic``, answered ``applied``. Every file is written whole and renamed into place, so
a reader never sees half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "POLL_S",
    "Follower",
    "NoCanary",
    "Served",
    "Serving",
    "SwapBoard",
    "SwapBusy",
    "SwapFailed",
    "takes_canary",
]

# How often a replica looks for a change to follow, and the coordinator for their answers.
POLL_S = 0.02


class SwapBusy(Exception):
    """Another change is under way on this server."""


class SwapFailed(Exception):
    """A replica could not prepare the version (the message says which and why), or did not
    within the time allowed; every replica serves on what it served."""


class NoCanary(SwapFailed):
    """A change of traffic with no canary serving."""


@dataclass(frozen=True)
class Serving:
    """One version a replica serves: its name and the source it was loaded from."""

    version: str
    source: str


@dataclass(frozen=True)
class Served:
    """What every replica serves: a version, and maybe a canary taking ``percent`` of it."""

    stable: Serving
    canary: Serving | None = None
    percent: int = 0
    latest: int = 1  # the highest version ever loaded (numbers are never reused)
    name: str = ""  # the served name (a version's own source may name it otherwise)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Served:
        canary = data.get("canary")
        return cls(
            Serving(**data["stable"]),
            None if canary is None else Serving(**canary),
            int(data.get("percent", 0)),
            int(data.get("latest", 1)),
            str(data.get("name", "")),
        )


class Follower(Protocol):
    """A replica's side of a change."""

    def versions(self) -> set[str]:
        """The versions it serves now."""

    async def prepare(self, source: str, version: str) -> None:
        """Load and warm ``version`` beside what it serves (raises if it cannot)."""

    async def switch(self, percent: int) -> float:
        """Serve the prepared version (100: alone; less: as a canary taking ``percent``);
        the seconds a version it stopped serving took to finish."""

    def drop(self) -> None:
        """Forget the prepared version."""

    async def traffic(self, percent: int) -> float:
        """Give the canary ``percent`` (100: promote it, 0: retire it); the seconds a
        version it stopped serving took to finish."""


def takes_canary(key: str | None, percent: int) -> bool:
    """Whether a request goes to the canary: by its client's key (the same key, the same
    version, on every process) or, without one, at random; ``percent`` of requests in all."""
    if percent <= 0:
        return False
    share = zlib.crc32(key.encode()) % 100 if key else random.randrange(100)
    return share < percent


def _write(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class SwapBoard:
    """The run folder's swap files for ``replicas`` replicas.

    Args:
        folder: the run folder.
        replicas: how many replicas follow.
    """

    def __init__(self, folder: Path, replicas: int) -> None:
        self.folder = folder
        self.replicas = replicas
        self._seen: tuple[str, str] | None = None  # the (attempt, phase) this one acted on

    @property
    def _swap(self) -> Path:
        return self.folder / "swap.json"

    def _answer(self, index: int) -> Path:
        return self.folder / f"replica-{index}.swap"

    def served(self) -> Served | None:
        """What a replica should load at its start (None: the configured model)."""
        data = _read(self.folder / "serving.json")
        return None if data is None else Served.from_dict(data)

    # --- a replica -----------------------------------------------------------------------------
    async def follow(self, index: int, replica: Follower) -> None:
        """Act on the swap file once per new (attempt, phase)."""
        data = _read(self._swap)
        if data is None:
            return
        version, phase, attempt = str(data["version"]), str(data["phase"]), str(data["attempt"])
        if self._seen == (attempt, phase):
            return
        self._seen = (attempt, phase)
        answer: dict[str, Any] = {"attempt": attempt, "version": version, "pid": os.getpid()}
        if phase == "prepare":
            if version in replica.versions():  # restarted after the switch: already on it
                answer["state"] = "switched"
            else:
                started = time.perf_counter()
                try:
                    await replica.prepare(str(data["source"]), version)
                except Exception as exc:
                    answer |= {"state": "failed", "error": str(exc) or type(exc).__name__}
                else:
                    answer |= {"state": "prepared", "prepare_s": time.perf_counter() - started}
        elif phase == "commit":
            drain_s = 0.0
            if version not in replica.versions():
                drain_s = await replica.switch(int(data["percent"]))
            answer |= {"state": "switched", "drain_s": drain_s}
        elif phase == "traffic":
            answer |= {"state": "applied", "drain_s": await replica.traffic(int(data["percent"]))}
        else:
            replica.drop()
            answer["state"] = "dropped"
        _write(self._answer(index), answer)

    # --- the coordinator -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.folder / "swap.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = "Another load is under way on this server; retry when it ends."
                raise SwapBusy(busy) from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    async def load(
        self, source: str, now: Served, timeout_s: float, percent: int = 100
    ) -> dict[str, Any]:
        """Put ``source`` in service on every replica as the next version: alone
        (``percent`` 100) or as a canary taking ``percent`` of the traffic beside ``now``'s
        stable version (replacing ``now``'s canary); returns the version and the phases' times
        once every replica has switched.

        Raises:
            SwapBusy: another change holds the lock.
            SwapFailed: some replica could not prepare it (all serve on what they served).
        """
        with self._locked():
            served = self.served() or now
            known = [served.stable.version] + ([served.canary.version] if served.canary else [])
            latest = max(served.latest, *(int(v) for v in known)) + 1
            version = str(latest)
            begun = time.perf_counter()
            swap = {"attempt": os.urandom(8).hex(), "version": version, "source": source}
            _write(self._swap, swap | {"phase": "prepare"})
            attempt = swap["attempt"]
            answers = await self._answers(attempt, ("prepared", "failed", "switched"), timeout_s)
            failed = {i: a for i, a in answers.items() if a.get("state") == "failed"}
            if failed or len(answers) < self.replicas:
                _write(self._swap, swap | {"phase": "abort"})
                await self._answers(attempt, ("dropped",), 30.0, among=set(answers))
                if failed:
                    index, answer = min(failed.items())
                    raise SwapFailed(f"replica {index} could not load it: {answer.get('error')}")
                raise SwapFailed(f"not every replica had it loaded within {timeout_s:g} s")
            prepared = time.perf_counter()
            fresh = Serving(version, source)
            if percent >= 100:
                after = Served(fresh, latest=latest, name=now.name)
            else:
                after = Served(served.stable, fresh, percent, latest, now.name)
            _write(self.folder / "serving.json", after.as_dict())
            _write(self._swap, swap | {"phase": "commit", "percent": percent})
            switched = await self._answers(attempt, ("switched",), timeout_s)
            return {
                "version": version,
                "source": source,
                **self._shares(after),
                "prepare_s": round(prepared - begun, 3),
                "switch_s": round(time.perf_counter() - prepared, 3),
                "replicas": self._replicas(switched),
            }

    async def traffic(self, percent: int, now: Served, timeout_s: float) -> dict[str, Any]:
        """Give the canary ``percent`` of the traffic on every replica: 100 promotes it (the
        stable version is retired), 0 retires it.

        Raises:
            SwapBusy: another change holds the lock.
            SwapFailed: there is no canary, or a replica did not apply it in time.
        """
        with self._locked():
            served = self.served() or now
            if served.canary is None:
                raise NoCanary("There is no canary version to give traffic to.")
            if percent >= 100:
                after = Served(served.canary, latest=served.latest, name=now.name)
            elif percent <= 0:
                after = Served(served.stable, latest=served.latest, name=now.name)
            else:
                after = Served(served.stable, served.canary, percent, served.latest, now.name)
            swap = {"attempt": os.urandom(8).hex(), "version": served.canary.version}
            _write(self.folder / "serving.json", after.as_dict())
            started = time.perf_counter()
            _write(self._swap, swap | {"phase": "traffic", "percent": percent})
            applied = await self._answers(swap["attempt"], ("applied",), timeout_s)
            if len(applied) < self.replicas:
                raise SwapFailed(f"not every replica applied it within {timeout_s:g} s")
            return {
                **self._shares(after),
                "switch_s": round(time.perf_counter() - started, 3),
                "replicas": self._replicas(applied),
            }

    @staticmethod
    def _shares(served: Served) -> dict[str, Any]:
        """Each version served and its percent of the traffic."""
        shares = {served.stable.version: 100 - served.percent}
        if served.canary is not None:
            shares[served.canary.version] = served.percent
        return {"traffic": shares}

    @staticmethod
    def _replicas(answers: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"replica": i, "pid": a.get("pid"), "drain_s": round(a.get("drain_s", 0.0), 4)}
            for i, a in sorted(answers.items())
        ]

    async def _answers(
        self,
        attempt: str,
        states: tuple[str, ...],
        timeout_s: float,
        among: set[int] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Each replica's answer to ``attempt`` (of the replicas ``among``, default all) once
        all are in ``states`` (or one failed), or what there is at the deadline."""
        deadline = time.monotonic() + timeout_s
        expected = set(range(self.replicas)) if among is None else among
        while True:
            answers = {}
            for index in expected:
                answer = _read(self._answer(index))
                if answer and answer.get("attempt") == attempt and answer.get("state") in states:
                    answers[index] = answer
            if len(answers) == len(expected) or any(
                a.get("state") == "failed" for a in answers.values()
            ):
                return answers
            if time.monotonic() > deadline:
                return answers
            await asyncio.sleep(POLL_S)
