"""A real ``bentoml serve`` of the default model on 127.0.0.1, shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.serving import Server, serve

# Small body limit so the 413 test need not push 64 MB through loopback. float32 whatever the
# machine and model: the tests compare answers with an offline fp32 run to 1e-4, and in bf16
# scores vary with the batch an image shares, by up to 6e-3 (0.3e-6 in fp32; the default model
# forced to bf16 on an AMX CPU, batches of 8 to 64 against single images).
SERVER_ENV = {
    "VIT_DTYPE": "float32",
    "VIT_MAX_BODY_BYTES": str(4 * 1024 * 1024),
    "VIT_MAX_WAIT_MS": "5",
    "VIT_MAX_BATCH_SIZE": "32",
    "VIT_ACCESS_LOG": "false",
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(SERVER_ENV, tmp_path_factory.mktemp("serve")) as running:
        yield running


@pytest.fixture(scope="module")
def address(server: Server) -> str:
    """The session server's Open Inference Protocol over gRPC, as ``host:port``."""
    assert server.grpc_port
    return f"127.0.0.1:{server.grpc_port}"
