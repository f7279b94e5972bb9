"""A new version of the model without a restart (the repository API, behind the admin token),
and the response cache, in-process with the tiny model: one replica, its own run folder."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from starlette.testclient import TestClient

from service.runtime.swaps import takes_canary

from .conftest import (
    InProcessApp,
    offline_probs,
    png,
    scores,
    serve_in_process,
    settings_for,
    wait_until_ready,
)
from .test_oip import image_input

TOKEN = "s3cret-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def admin_app(tiny_dir: Path, tmp_path: Path) -> Iterator[InProcessApp]:
    """The tiny model with the admin API on and the response cache on (each test its own)."""
    settings = settings_for(tiny_dir, admin_token=TOKEN, cache_bytes=1 << 20)
    with serve_in_process(settings, tmp_path / "run") as running:
        wait_until_ready(running)
        yield running


def _classify(client: TestClient, image: bytes, **fields: str) -> dict:
    response = client.post("/classify", files={"image": ("a.png", image)}, data=fields)
    assert response.status_code == 200, response.text
    return response.json()


def _load(client: TestClient, name: str, body: object, headers: dict | None = None):
    return client.post(
        f"/v2/repository/models/{name}/load",
        json=body,
        headers=AUTH if headers is None else headers,
    )


# --- the token -------------------------------------------------------------------------------
def test_the_repository_api_is_off_without_a_token(client: TestClient) -> None:
    response = client.post("/v2/repository/index", headers=AUTH)
    assert response.status_code == 403
    assert response.json()["error"].startswith("admin_disabled:")


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": TOKEN}, 401, "unauthorized"),  # no scheme
        ({"Authorization": f"Basic {TOKEN}"}, 401, "unauthorized"),
        ({"Authorization": "Bearer "}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, 403, "forbidden"),
        ({"Authorization": f"Bearer {TOKEN}x"}, 403, "forbidden"),
    ],
)
def test_every_admin_call_without_the_token_is_refused(
    admin_app: InProcessApp, tiny_dir: Path, v2_dir: Path, headers: dict, status: int, code: str
) -> None:
    client = admin_app.client
    name = tiny_dir.name
    calls = [
        client.post("/v2/repository/index", headers=headers),
        _load(client, name, {"parameters": {"source": f"local-dir:{v2_dir}"}}, headers),
        client.post(f"/v2/repository/models/{name}/unload", headers=headers),
    ]
    for response in calls:
        assert response.status_code == status, response.text
        assert response.json()["error"].startswith(f"{code}:")
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert _classify(client, png())["model"]["version"] == "1"  # nothing was loaded


# --- a load ---------------------------------------------------------------------------------
def test_a_load_puts_the_new_version_in_service(
    admin_app: InProcessApp, tiny_dir: Path, v2_dir: Path
) -> None:
    client, name, image = admin_app.client, tiny_dir.name, png(seed=3)
    index = client.post("/v2/repository/index", headers=AUTH)
    assert index.json() == [
        {"name": name, "version": "1", "state": "READY", "reason": "", "traffic_percent": 100}
    ]
    before = _classify(client, image, top_k="7", attention="cls")
    assert before["model"]["version"] == "1"
    assert scores(before) == pytest.approx(offline_probs(tiny_dir, image).tolist(), abs=1e-5)

    response = _load(client, name, {"parameters": {"source": f"local-dir:{v2_dir}"}})
    assert response.status_code == 200, response.text
    done = response.json()
    assert done["name"] == name and done["version"] == "2" and done["traffic"] == {"2": 100}
    assert done["source"] == f"local-dir:{v2_dir}"
    assert [r["replica"] for r in done["replicas"]] == [0]

    after = _classify(client, image, top_k="7", attention="cls")
    assert after["model"] == {**before["model"], "version": "2", "source": f"local-dir:{v2_dir}"}
    expected = offline_probs(v2_dir, image)
    assert scores(after) == pytest.approx(expected.tolist(), abs=1e-5)
    assert not np.allclose(expected, offline_probs(tiny_dir, image), atol=1e-3)
    # The served name stays; the protocol's routes name the version now served.
    assert client.get("/model").json()["model"]["version"] == "2"
    meta = client.get(f"/v2/models/{name}").json()
    assert meta["versions"] == ["2"]
    assert client.get(f"/v2/models/{name}/versions/1").status_code == 404
    assert client.get(f"/v2/models/{name}/versions/2/ready").json()["ready"] is True
    index = client.post("/v2/repository/index", headers=AUTH).json()
    assert index == [
        {"name": name, "version": "2", "state": "READY", "reason": "", "traffic_percent": 100}
    ]
    # A load without a source loads what is served again, as the next version.
    again = _load(client, name, None)
    assert again.status_code == 200 and again.json()["version"] == "3"
    assert again.json()["source"] == f"local-dir:{v2_dir}"
    assert admin_app.metric(
        "vit_model_info", model=name, version="1", source=f"local-dir:{tiny_dir}",
        dtype="float32", device="cpu",
    ) == 0  # fmt: skip
    assert admin_app.metric(
        "vit_model_info", model=name, version="3", source=f"local-dir:{v2_dir}",
        dtype="float32", device="cpu",
    ) == 1  # fmt: skip


def test_the_protocol_says_which_version_answered(
    admin_app: InProcessApp, tiny_dir: Path, v2_dir: Path
) -> None:
    client, name = admin_app.client, tiny_dir.name
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3]}
    body = {
        "inputs": [{**pixels, "data": [7] * (32 * 32 * 3)}],
        "outputs": [{"name": "probabilities"}],
    }
    assert client.post(f"/v2/models/{name}/infer", json=body).json()["model_version"] == "1"
    assert _load(client, name, {"parameters": {"source": f"local-dir:{v2_dir}"}}).status_code == 200
    answer = client.post(f"/v2/models/{name}/versions/2/infer", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "2"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"parameters": {"source": "local-dir:/nonexistent/model"}}, 400, "load_failed"),
        ({"parameters": {"source": "not a source"}}, 400, "invalid_source"),
        ({"parameters": {"source": 7}}, 400, "invalid_source"),
        ({"parameters": "x"}, 400, "invalid_parameters"),
    ],
)
def test_a_load_that_fails_leaves_the_old_version_serving(
    admin_app: InProcessApp, tiny_dir: Path, body: object, status: int, code: str
) -> None:
    client, image = admin_app.client, png(seed=4)
    response = _load(client, tiny_dir.name, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error.startswith(f"{code}:")
    if code == "load_failed":
        assert "/nonexistent/model" in error and "Version 1 serves on." in error
    answer = _classify(client, image, top_k="7", attention="cls")
    assert answer["model"]["version"] == "1"
    assert scores(answer) == pytest.approx(offline_probs(tiny_dir, image).tolist(), abs=1e-5)
    assert client.get("/readyz").status_code == 200


def test_unknown_models_and_the_unload_of_the_only_one(
    admin_app: InProcessApp, tiny_dir: Path
) -> None:
    client = admin_app.client
    assert _load(client, "nope", {}).status_code == 404
    response = client.post(f"/v2/repository/models/{tiny_dir.name}/unload", headers=AUTH)
    assert response.status_code == 409
    assert response.json()["error"].startswith("cannot_unload:")
    assert client.get("/v2/repository/index", headers=AUTH).status_code == 405


# --- a canary -------------------------------------------------------------------------------
def test_a_canary_gets_its_share_and_is_promoted(
    admin_app: InProcessApp, tiny_dir: Path, v2_dir: Path
) -> None:
    client, name, image = admin_app.client, tiny_dir.name, png(seed=9)
    body = {"parameters": {"source": f"local-dir:{v2_dir}", "canary_percent": 10}}
    response = _load(client, name, body)
    assert response.status_code == 200, response.text
    assert response.json()["traffic"] == {"1": 90, "2": 10}
    index = client.post("/v2/repository/index", headers=AUTH).json()
    assert [(row["version"], row["traffic_percent"]) for row in index] == [("1", 90), ("2", 10)]
    counted = {v: admin_app.metric("vit_version_images_total", model=name, version=v)
               for v in ("1", "2")}  # fmt: skip
    # 2,000 requests: 10 % +- 3 % to the canary; each answer's scores are its version's own.
    expected = {"1": offline_probs(tiny_dir, image), "2": offline_probs(v2_dir, image)}
    answers = [_classify(client, image, top_k="7", attention="none") for _ in range(2000)]
    split = Counter(a["model"]["version"] for a in answers)
    assert abs(split["2"] / 2000 - 0.10) <= 0.03, split
    for answer in answers[:50]:
        wanted = expected[answer["model"]["version"]]
        assert scores(answer) == pytest.approx(wanted.tolist(), abs=1e-5)
    for version in ("1", "2"):
        assert admin_app.metric(
            "vit_version_images_total", model=name, version=version
        ) == counted[version] + split[version]  # fmt: skip
    # A client that sends its key stays with one version: the one its key routes to.
    keys = [f"client-{i}" for i in range(100)]
    for key, version in (
        (next(k for k in keys if takes_canary(k, 10)), "2"),
        (next(k for k in keys if not takes_canary(k, 10)), "1"),
    ):
        sent = [
            client.post("/classify", files={"image": ("a.png", image)},
                        headers={"X-Client-Key": key})
            for _ in range(15)
        ]  # fmt: skip
        assert {answer.json()["model"]["version"] for answer in sent} == {version}, key
    # The protocol's version path is answered by that version, whatever the shares.
    for version in ("1", "2"):
        path = f"/v2/models/{name}/versions/{version}/infer"
        pinned = [
            client.post(path, content=orjson.dumps({"inputs": [image_input(image)]}))
            for _ in range(20)
        ]
        assert {(p.status_code, p.json()["model_version"]) for p in pinned} == {(200, version)}
        assert np.allclose(pinned[0].json()["outputs"][0]["data"], expected[version], atol=1e-5), (
            version
        )
    # Promoted: version 2 alone; a traffic call without a canary is refused.
    traffic = f"/v2/repository/models/{name}/traffic"
    promoted = client.post(traffic, json={"parameters": {"canary_percent": 100}}, headers=AUTH)
    assert promoted.status_code == 200 and promoted.json()["traffic"] == {"2": 100}
    assert {_classify(client, image)["model"]["version"] for _ in range(20)} == {"2"}
    again = client.post(traffic, json={"parameters": {"canary_percent": 50}}, headers=AUTH)
    assert again.status_code == 409 and again.json()["error"].startswith("no_canary:")


@pytest.mark.parametrize("percent", [0, 100, 101, -1, "10", True, 2.5])
def test_a_canary_share_out_of_range_is_refused(
    admin_app: InProcessApp, tiny_dir: Path, v2_dir: Path, percent: object
) -> None:
    body = {"parameters": {"source": f"local-dir:{v2_dir}", "canary_percent": percent}}
    response = _load(admin_app.client, tiny_dir.name, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("invalid_parameters:")


def test_a_canary_retired_leaves_the_stable_version_alone(
    admin_app: InProcessApp, tiny_dir: Path, v2_dir: Path
) -> None:
    client, name, image = admin_app.client, tiny_dir.name, png(seed=10)
    body = {"parameters": {"source": f"local-dir:{v2_dir}", "canary_percent": 50}}
    assert _load(client, name, body).status_code == 200
    traffic = f"/v2/repository/models/{name}/traffic"
    retired = client.post(traffic, json={"parameters": {"canary_percent": 0}}, headers=AUTH)
    assert retired.status_code == 200 and retired.json()["traffic"] == {"1": 100}
    assert {_classify(client, image)["model"]["version"] for _ in range(20)} == {"1"}
    # The next version is 3: version numbers are never reused.
    assert (
        _load(client, name, {"parameters": {"source": f"local-dir:{v2_dir}"}}).json()["version"]
        == "3"
    )


def test_a_canary_set_at_start_serves_from_the_first_request(
    tiny_dir: Path, v2_dir: Path, tmp_path: Path
) -> None:
    settings = settings_for(
        tiny_dir, admin_token=TOKEN, canary_model=f"local-dir:{v2_dir}", canary_percent=30
    )
    with serve_in_process(settings, tmp_path / "run") as running:
        wait_until_ready(running)
        client = running.client
        index = client.post("/v2/repository/index", headers=AUTH).json()
        assert [(row["version"], row["traffic_percent"]) for row in index] == [("1", 70), ("2", 30)]
        image = png(seed=11)
        models = [  # by client key: the same split every run
            client.post("/classify", files={"image": ("a.png", image)},
                        headers={"X-Client-Key": f"client-{i}"}).json()["model"]
            for i in range(300)
        ]  # fmt: skip
        split = Counter(m["version"] for m in models)
        assert abs(split["2"] / 300 - 0.30) <= 0.06, split
        assert {m["name"] for m in models} == {tiny_dir.name}  # the canary serves the name
        body = {"parameters": {"source": f"local-dir:{tiny_dir}"}}
        assert _load(client, tiny_dir.name, body).json()["version"] == "3"


# --- the response cache ------------------------------------------------------------------------
def test_a_repeated_upload_is_answered_from_the_cache(admin_app: InProcessApp) -> None:
    client, image = admin_app.client, png(seed=5)
    hits, misses = (admin_app.metric("vit_cache_lookups_total", result=r) for r in ("hit", "miss"))
    first = _classify(client, image, attention="rollout", top_k="3")
    second = _classify(client, image, attention="rollout", top_k="3")
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert second["request_id"] != first["request_id"]
    for part in ("predictions", "attention", "patches", "image", "model"):
        assert second[part] == first[part], part
    assert second["timing_ms"]["batch_size"] == 0  # rode in no forward pass
    assert first["timing_ms"]["batch_size"] >= 1
    # Other options are another answer: never the attention asked for another way.
    other = _classify(client, image, attention="cls", top_k="3")
    assert other["cache"] == "miss" and other["attention"]["mode"] == "cls"
    assert other["attention"]["weights"] != first["attention"]["weights"]
    assert _classify(client, image, attention="rollout", top_k="2")["cache"] == "miss"
    assert admin_app.metric("vit_cache_lookups_total", result="hit") == hits + 1
    assert admin_app.metric("vit_cache_lookups_total", result="miss") == misses + 3
    assert admin_app.metric("vit_cache_bytes") > 0


def test_a_batch_mixes_hits_and_misses_in_upload_order(admin_app: InProcessApp) -> None:
    client = admin_app.client
    seen, fresh = png(seed=6), png(seed=7)
    alone = _classify(client, seen)
    files = [("images", ("s.png", seen)), ("images", ("f.png", fresh)), ("images", ("x", b"bad"))]
    items = client.post("/classify_batch", files=files).json()
    assert [item.get("cache") for item in items] == ["hit", "miss", None]
    assert items[0]["predictions"] == alone["predictions"]
    assert items[2]["status"] == 415


def test_a_swap_empties_the_cache(admin_app: InProcessApp, tiny_dir: Path, v2_dir: Path) -> None:
    client, image = admin_app.client, png(seed=8)
    _classify(client, image)
    assert _classify(client, image)["cache"] == "hit"
    assert (
        _load(client, tiny_dir.name, {"parameters": {"source": f"local-dir:{v2_dir}"}}).status_code
        == 200
    )
    answer = _classify(client, image)
    assert answer["cache"] == "miss" and answer["model"]["version"] == "2"
    assert _classify(client, image)["cache"] == "hit"
