"""Several models at once (``VIT_MODELS``), in-process with two tiny models of one architecture
and different weights: each answers by its name, through every door, with its own versions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from .conftest import (
    InProcessApp,
    assert_error,
    offline_probs,
    png,
    scores,
    serve_in_process,
    settings_for,
    wait_until_ready,
)
from .test_oip import image_input, infer

TOKEN = "m0dels-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def two(
    tiny_dir: Path, v2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessApp]:
    """``first`` (the default) and ``second``, the admin API on."""
    models = f"first=local-dir:{tiny_dir},second=local-dir:{v2_dir}"
    settings = settings_for(tiny_dir, models=models, admin_token=TOKEN)
    with serve_in_process(settings, tmp_path_factory.mktemp("run")) as running:
        wait_until_ready(running)
        yield running


def _classify(client: TestClient, image: bytes, path: str = "/classify", **kw: object) -> dict:
    response = client.post(path, files={"image": ("a.png", image)}, data={"top_k": "7"}, **kw)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_each_model_the_default_first(two: InProcessApp) -> None:
    listed = two.client.get("/models").json()["models"]
    assert [(m["name"], m["default"], m["state"]) for m in listed] == [
        ("first", True, "ready"),
        ("second", False, "ready"),
    ]
    for model in listed:
        assert model["versions"] == [
            {"name": model["name"], "version": "1", "traffic_percent": 100}
        ]


def test_each_model_answers_by_its_name(two: InProcessApp, tiny_dir: Path, v2_dir: Path) -> None:
    client, image = two.client, png(seed=11)
    first, second = offline_probs(tiny_dir, image), offline_probs(v2_dir, image)
    assert not np.allclose(first, second, atol=1e-3)  # the two models can be told apart
    answers = {
        "default": _classify(client, image),
        "first": _classify(client, image, "/classify?model=first"),
        "second": _classify(client, image, "/classify?model=second"),
        "header": _classify(client, image, headers={"X-Model": "second"}),
    }
    for key, expected, name in (
        ("default", first, "first"),
        ("first", first, "first"),
        ("second", second, "second"),
        ("header", second, "second"),
    ):
        assert answers[key]["model"]["name"] == name, key
        assert np.allclose(scores(answers[key]), expected, atol=1e-4), key
    batch = client.post(
        "/classify_batch?model=second",
        files=[("images", ("a.png", image)), ("images", ("b.png", image))],
        data={"top_k": "7"},
    )
    assert batch.status_code == 200, batch.text
    for item in batch.json():
        assert item["model"]["name"] == "second"
        assert np.allclose(scores(item), second, atol=1e-4)
    # Counted under the model that answered.
    assert two.metric("vit_version_images_total", model="second", version="1") >= 4


def test_the_protocol_serves_each_model_by_name(two: InProcessApp, v2_dir: Path) -> None:
    client, image = two.client, png(seed=12)
    meta = client.get("/v2/models/second")
    assert meta.status_code == 200, meta.text
    assert meta.json()["name"] == "second"
    assert meta.json()["parameters"]["source"] == f"local-dir:{v2_dir}"
    assert client.get("/v2/models/second/ready").json() == {"name": "second", "ready": True}
    answer = infer(client, "second", {"inputs": [image_input(image)]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_name"] == "second"
    assert answer.json()["model_version"] == "1"


def test_a_name_not_served_is_refused_in_every_door(two: InProcessApp) -> None:
    client, image = two.client, png(seed=13)
    refused = client.post("/classify?model=third", files={"image": ("a.png", image)})
    assert_error(refused, 404, "unknown_model", "'third'", "'first'", "'second'")
    by_header = client.post(
        "/classify", files={"image": ("a.png", image)}, headers={"X-Model": "third"}
    )
    assert_error(by_header, 404, "unknown_model", "'third'")
    assert_error(client.get("/model?model=third"), 404, "unknown_model")
    protocol = client.get("/v2/models/third")
    assert protocol.status_code == 404
    assert protocol.json()["error"].startswith("unknown_model:")
    version = client.get("/v2/models/second/versions/9")
    assert version.status_code == 404
    assert version.json()["error"].startswith("unknown_version:")


def test_get_model_describes_the_one_named(two: InProcessApp, v2_dir: Path) -> None:
    default = two.client.get("/model").json()
    assert default["model"]["name"] == "first"
    second = two.client.get("/model", params={"model": "second"}).json()
    assert second["model"]["name"] == "second"
    assert second["model"]["source"] == f"local-dir:{v2_dir}"


def test_a_version_loads_for_one_model_and_leaves_the_other(
    two: InProcessApp, tiny_dir: Path
) -> None:
    client, image = two.client, png(seed=14)
    index = client.post("/v2/repository/index", headers=AUTH).json()
    assert [(row["name"], row["version"], row["state"]) for row in index] == [
        ("first", "1", "READY"),
        ("second", "1", "READY"),
    ]
    # ``second`` becomes the tiny model's weights, as version 2; ``first`` is untouched.
    loaded = client.post(
        "/v2/repository/models/second/load",
        json={"parameters": {"source": f"local-dir:{tiny_dir}"}},
        headers=AUTH,
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["name"] == "second" and loaded.json()["version"] == "2"
    answer = _classify(client, image, "/classify?model=second")
    assert answer["model"]["version"] == "2"
    assert np.allclose(scores(answer), offline_probs(tiny_dir, image), atol=1e-4)
    assert _classify(client, image)["model"] == {
        **_classify(client, image)["model"],
        "name": "first",
        "version": "1",
    }
    listed = {m["name"]: m["versions"] for m in client.get("/models").json()["models"]}
    assert [v["version"] for v in listed["first"]] == ["1"]
    assert [v["version"] for v in listed["second"]] == ["2"]
    unknown = client.post("/v2/repository/models/third/load", json={"parameters": {}}, headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["error"].startswith("unknown_model:")
