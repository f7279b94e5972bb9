"""The one seam into the servers: importing the service replaces exactly the three third-party
attributes ``service/runtime/server.py`` names, and the pinned BentoML, uvicorn and circus still
have every hook the seam relies on (an upgrade that moves one fails here, not in production)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

from tests.conftest import REPO

# The third-party packages around the server, as loaded by the service.
_PACKAGES = (
    "uvicorn",
    "bentoml",
    "_bentoml_impl",
    "_bentoml_sdk",
    "circus",
    "starlette",
    "fastapi",
)

_LIST_MODULES = f"""
import json, sys
import service.service
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {_PACKAGES!r})))
"""

# Every attribute of every loaded module of those packages, and of every class they define,
# before and after importing the service (the modules it loads are loaded first, so only what
# the import changes shows up): what was replaced or added, by dotted name.
_SNAPSHOT = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        pass

def snapshot():
    seen = {}
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            continue
        for attr, value in list(vars(module).items()):
            seen[f"{name}.{attr}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for member, inner in list(vars(value).items()):
                    seen[f"{name}.{attr}.{member}"] = id(inner)
    return seen

before = snapshot()
import service.service
after = snapshot()
changed = sorted(k for k, v in after.items() if k in before and before[k] != v)
added = sorted(k for k in after if k not in before)
print(json.dumps({"changed": changed, "added": added}))
"""


def _run(code: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def test_importing_the_service_replaces_three_third_party_attributes_and_adds_none() -> None:
    from service.runtime.server import replaced

    modules = _run(_LIST_MODULES)
    diff = json.loads(_run(_SNAPSHOT, modules))
    assert diff["added"] == []
    assert sorted(diff["changed"]) == sorted(replaced())
    assert len(replaced()) == 3


def test_the_pinned_worker_script_builds_uvicorns_server_at_call_time() -> None:
    from _bentoml_impl.worker import service as worker

    source = inspect.getsource(worker.main.callback)  # a click command
    assert "import uvicorn" in source and "uvicorn.Server(config).run(sockets=" in source
    assert "uvicorn.Config(" in source and "http=" not in source  # the protocol is ours to set


def test_the_pinned_serve_finds_the_arbiter_factory_at_call_time() -> None:
    from _bentoml_impl.server import serving

    source = inspect.getsource(serving.serve_http)
    assert "from bentoml._internal.utils.circus import create_standalone_arbiter" in source
    assert "create_standalone_arbiter(**arbiter_kwargs)" in source
    assert "name=API_SERVER_NAME" in source
    assert serving.API_SERVER_NAME == "_bento_api_server"


def test_the_pinned_app_builds_the_traffic_middleware_at_call_time() -> None:
    from _bentoml_impl.server import app
    from bentoml._internal.server.http import instruments

    from service.runtime.server import _ORIGINALS

    assert "RunnerTrafficMetricsMiddleware" in inspect.getsource(app)
    base = _ORIGINALS.get("RunnerTrafficMetricsMiddleware")
    base = base or instruments.RunnerTrafficMetricsMiddleware
    setup = inspect.getsource(base._setup)
    for used in ("self.metrics_request_total", "self.metrics_request_duration"):
        assert used in setup, used
    assert "_is_setup" in inspect.getsource(base)


def test_uvicorn_has_the_hooks_the_worker_server_and_protocol_override() -> None:
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import Server

    from service.runtime.server import WorkerProtocol, WorkerServer

    assert WorkerServer.__mro__[1] is Server and WorkerProtocol.__mro__[1] is HttpToolsProtocol
    for hook in ("run", "handle_exit", "on_tick", "shutdown"):
        assert hook in vars(Server), hook
        assert hook in vars(WorkerServer), hook
    assert "self.http_protocol_class = self.http" in inspect.getsource(Config.load)
    for hook in ("connection_made", "connection_lost", "on_message_begin", "on_headers_complete",
                 "shutdown", "on_response_complete"):  # fmt: skip
        assert hook in vars(HttpToolsProtocol), hook
    for hook in ("connection_made", "connection_lost", "on_message_begin", "on_headers_complete",
                 "shutdown"):  # fmt: skip
        assert hook in vars(WorkerProtocol), hook
    source = inspect.getsource(HttpToolsProtocol)
    for state in ("self.cycle", "self.parser", "self.url", "self.headers", "self.flow"):
        assert state in source, state


def test_circus_binds_a_socket_it_was_not_told_is_reuseport() -> None:
    from circus.sockets import CircusSocket, CircusSockets

    assert "bind_and_listen" in vars(CircusSocket)
    # circus leaves its own so_reuseport sockets unbound in the arbiter: ours must not say so.
    assert "if not sock.so_reuseport" in inspect.getsource(CircusSockets.bind_and_listen_all)


_ARBITER = """
import json, os, socket
os.environ["BENTOML_CONTAINERIZED"] = "true"
import bentoml.serving
from bentoml._internal.utils import circus
from circus.sockets import CircusSocket
import service.service
from service.runtime import server

seen = {}
def factory(watchers, **kwargs):
    seen.update(watchers=watchers, **kwargs)
    return "arbiter"
server._ORIGINALS["create_standalone_arbiter"] = factory

watcher = bentoml.serving.create_watcher("w", ["x"])
before = watcher.respawn
api = CircusSocket(name="_bento_api_server", host="127.0.0.1", port=0)
other = CircusSocket(name="other", host="127.0.0.1", port=0)
assert circus.create_standalone_arbiter([watcher], sockets=[api, other], threaded=False) == "arbiter"
reserved, kept = seen["sockets"]
reserved.bind_and_listen()
print(json.dumps({
    "respawn_before": before,
    "respawn_after": seen["watchers"][0].respawn,
    "reserved": type(reserved).__name__,
    "reuseport": reserved.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
    "listening": reserved.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    "bound": reserved.getsockname()[1] != 0,
    "other_kept": kept is other,
    "threaded": seen["threaded"],
}))
"""


def test_the_arbiter_respawns_in_containers_and_only_reserves_the_api_port() -> None:
    facts = json.loads(_run(_ARBITER))
    assert facts["respawn_before"] is False  # BentoML's choice inside a container
    assert facts["respawn_after"] is True
    assert facts["reserved"] == "_PortReservation"
    assert facts["reuseport"] == 1 and facts["listening"] == 0 and facts["bound"]
    assert facts["other_kept"] and facts["threaded"] is False


class _Socket:
    """A connected socket's two addresses, counting the look-ups (each a system call)."""

    def __init__(self) -> None:
        self.lookups = 0

    def getsockname(self) -> tuple[str, int]:
        self.lookups += 1
        return ("127.0.0.1", 3000)

    def getpeername(self) -> tuple[str, int]:
        self.lookups += 1
        return ("127.0.0.9", 41000)


class _Transport:
    def __init__(self) -> None:
        self.socket = _Socket()
        self.written = b""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.socket if name == "socket" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class _Front:
    """Refuses ``/busy`` at the gate, lets everything else through."""

    def wrap(self, app: object) -> object:
        return app

    def gate(self, method: bytes, url: bytes, scope: dict[str, object]) -> bytes | None:
        if url == b"/busy":
            return b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
        return None


def test_the_worker_protocol_sets_what_uvicorns_sets_and_looks_addresses_up_once_admitted() -> None:
    """``WorkerProtocol.connection_made`` is uvicorn's less the two address look-ups: a new
    connection refused at the gate makes no system call for them; the first request let
    through looks them up once, and its scope carries them as uvicorn's would."""
    import asyncio

    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from service.runtime import server

    seen: list[dict[str, object]] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    async def check() -> None:
        config = Config(app=app, log_level="warning", lifespan="off")
        config.load()
        theirs = HttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        theirs_transport = _Transport()
        theirs.connection_made(theirs_transport)  # type: ignore[arg-type]
        assert theirs_transport.socket.lookups == 2

        saved = server._INSTALLED[:]
        server._INSTALLED[:] = [server._Installed(_Front(), 5.0)]  # type: ignore[arg-type]
        try:
            ours = server.WorkerProtocol(config=config, server_state=ServerState(), app_state={})
            transport = _Transport()
            ours.connection_made(transport)  # type: ignore[arg-type]
            assert transport.socket.lookups == 0
            assert set(vars(ours)) - set(vars(theirs)) == {"_header_timer"}
            assert set(vars(theirs)) - set(vars(ours)) == set()
            assert ours.server is None and ours.client is None  # looked up once admitted
            for name in set(vars(theirs)) - {"server", "client"}:
                assert type(vars(ours)[name]) is type(vars(theirs)[name]), name

            ours.data_received(b"POST /busy HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            assert transport.written.startswith(b"HTTP/1.1 503")
            assert transport.socket.lookups == 0
            for _ in range(2):
                ours.data_received(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
                for _ in range(10):
                    await asyncio.sleep(0)
            assert transport.socket.lookups == 2
            assert [(s["server"], s["client"]) for s in seen] == [
                (("127.0.0.1", 3000), ("127.0.0.9", 41000))
            ] * 2
            ours.connection_lost(None)
        finally:
            server._INSTALLED[:] = saved

    asyncio.run(check())
