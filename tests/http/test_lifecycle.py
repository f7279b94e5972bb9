"""Before the model is there: while it loads, every request is a 503 ``not_ready`` with
``Retry-After`` and ``/readyz`` is 503 (liveness stays 200); when it cannot load and
``VIT_ON_LOAD_FAILURE=serve``, every request is a 503 ``load_failed`` that says what was wrong
and what to do. (``exit``, the default, stops the server: tests/integration/test_hardening.py.)
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.http.conftest import (
    InProcessApp,
    assert_error,
    png,
    serve_in_process,
    settings_for,
    wait_for,
    wait_until_ready,
)

STILL_LOADING = "The model is still loading; retry shortly."


def _refusals(app: InProcessApp) -> dict[str, Any]:
    """Each request kind the app refuses until it has a model."""
    client = app.client
    return {
        "classify": client.post("/classify", files={"image": ("a.png", png())}),
        "classify_batch": client.post("/classify_batch", files={"images": ("a.png", png())}),
        "model": client.get("/model"),
    }


class _Release:
    """Lets a model held by its test gate (``VIT_TEST_GATE``) load."""

    def __init__(self, gate: Path) -> None:
        self.gate = gate

    def set(self) -> None:
        self.gate.unlink(missing_ok=True)


@pytest.fixture
def loading(tiny_dir: Path, tmp_path: Path) -> Iterator[tuple[InProcessApp, _Release]]:
    """An app whose model load waits at its test gate; released (and loaded) at teardown."""
    gate = tmp_path / "gate"
    gate.write_text("")
    release = _Release(gate)
    with serve_in_process(settings_for(tiny_dir, test_gate=str(gate)), tmp_path / "run") as app:
        try:
            wait_for(lambda: gate.read_text() == "loading\n", "held at the gate")
            yield app, release
        finally:
            release.set()
            wait_until_ready(app)


def test_while_the_model_loads_requests_get_503_not_ready(
    loading: tuple[InProcessApp, _Release],
) -> None:
    app, release = loading
    for name, response in _refusals(app).items():
        assert assert_error(response, 503, "not_ready") == STILL_LOADING, name
        assert response.headers["retry-after"] == "5", name
    assert app.client.get("/readyz").status_code == 503
    for probe in ("/livez", "/healthz"):
        assert app.client.get(probe).status_code == 200

    assert app.metric("vit_requests_total", endpoint="classify", status="503") == 1
    assert app.metric("vit_requests_total", endpoint="classify_batch", status="503") == 1
    assert app.metric("vit_image_errors_total", code="not_ready") == 2

    release.set()
    wait_until_ready(app)
    response = app.client.post("/classify", files={"image": ("a.png", png())})
    assert response.status_code == 200, response.text


# What a load failure answers (VIT_ON_LOAD_FAILURE=serve): the loader's error, then what to do.
LOAD_FAILED = (
    r"The model failed to load: {error} Fix VIT_MODEL or the checkpoint and restart the "
    r"server; the server log has the details\."
)


def _missing_folder(tmp_path: Path, tiny_dir: Path) -> tuple[str, str]:
    folder = tmp_path / "nowhere"
    error = (
        f"Model folder {str(folder)!r} does not exist: give the folder that holds config.json "
        "and model.safetensors ('local-dir:PATH')."
    )
    return f"local-dir:{folder}", re.escape(error)


def _truncated_weights(tmp_path: Path, tiny_dir: Path) -> tuple[str, str]:
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    start = re.escape(f"{str(weights)!r} is corrupt or truncated (")
    return f"local-dir:{folder}", start + r".+\): re-download or re-export it\."


def _unknown_source(tmp_path: Path, tiny_dir: Path) -> tuple[str, str]:
    error = (
        f"Cannot tell what kind of model source {str(tiny_dir)!r} is: use 'local-dir:PATH' "
        "(timm hub folder), 'hf-hub:ORG/NAME', 'ARCH@FILE.safetensors' or "
        "'bento:NAME[:VERSION]'."
    )
    return str(tiny_dir), re.escape(error)


@pytest.mark.parametrize("broken", [_missing_folder, _truncated_weights, _unknown_source])
def test_a_model_that_cannot_load_is_a_503_load_failed_that_says_why(
    tiny_dir: Path, tmp_path: Path, broken: Any
) -> None:
    source, error = broken(tmp_path, tiny_dir)
    expected = re.compile(LOAD_FAILED.format(error=error))
    with serve_in_process(settings_for(source, on_load_failure="serve"), tmp_path / "run") as app:

        def settled() -> bool:
            response = app.client.get("/model")
            return response.status_code != 503 or response.json()["error"]["code"] != "not_ready"

        wait_for(settled, "done loading")
        for name, response in _refusals(app).items():
            message = assert_error(response, 503, "load_failed")
            assert expected.fullmatch(message), (name, message)
            assert "retry-after" not in response.headers, name  # nothing retries the load
        assert app.client.get("/readyz").status_code == 503
        assert app.client.get("/livez").status_code == 200
        assert app.metric("vit_image_errors_total", code="load_failed") == 2
