"""The benchmark's hand-written peer serves the same model with the same preprocessing: it
agrees with the service image by image, so the side-by-side figures compare like with like."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from harness.samples import digit
from harness.serving import Server, serve_peer
from tests.conftest import DEFAULT_MODEL_DIR


def test_the_peer_agrees_with_the_service(server: Server, tmp_path: Path) -> None:
    with (
        serve_peer(tmp_path, model=f"local-dir:{DEFAULT_MODEL_DIR}", workers=1, threads=1) as peer,
        httpx.Client(timeout=30) as client,
    ):
        health = client.get(f"{peer.url}/healthz").json()
        # The peer runs the same fast stack a user gets from uvicorn[standard].
        assert "httptools" in health["http_protocol"] and health["event_loop"] == "uvloop"
        for index in range(10):
            data = digit(index, 64, index % 2 == 1)
            ours = client.post(
                f"{server.url}/classify",
                files={"image": ("d.png", data)},
                data={"attention": "none"},
            ).json()["predictions"]
            theirs = client.post(f"{peer.url}/classify", files={"image": ("d.png", data)}).json()[
                "predictions"
            ]
            assert ours[0]["index"] == theirs[0]["index"]
            np.testing.assert_allclose(ours[0]["score"], theirs[0]["score"], atol=0.05)
