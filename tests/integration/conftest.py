"""A real ``bentoml serve`` of the default model on 127.0.0.1, shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtests.serving import Server, serve

# Small body limit so the 413 test need not push 64 MB through loopback.
SERVER_ENV = {
    "VIT_MAX_BODY_BYTES": str(4 * 1024 * 1024),
    "VIT_MAX_WAIT_MS": "5",
    "VIT_MAX_BATCH_SIZE": "32",
    "VIT_ACCESS_LOG": "false",
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(SERVER_ENV, tmp_path_factory.mktemp("serve")) as running:
        yield running
