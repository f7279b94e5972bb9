"""What ``/metrics`` counts for each request: ``vit_requests_total{endpoint,status}`` once per
request, ``vit_image_errors_total{code}`` once per refusal (a request's, or each bad image's of a
batch), ``vit_images_total{outcome}``; the duration histogram and the in-flight gauge."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.http.conftest import LIMITS, InProcessApp, png

COUNTED = ("vit_requests_total", "vit_image_errors_total", "vit_images_total")

CASES = [
    # (what, path, request kwargs, status, refusals by code, images by outcome)
    ("good image", "/classify", {"files": {"image": ("a.png", png())}},
     200, {}, {"ok": 1}),
    ("undecodable image", "/classify", {"files": {"image": ("a.txt", b"hello")}},
     415, {"unsupported_media_type": 1}, {"client_error": 1}),
    ("degenerate image", "/classify", {"files": {"image": ("a.png", png(4, 40))}},
     422, {"degenerate_image": 1}, {"client_error": 1}),
    ("bad option", "/classify", {"files": {"image": ("a.png", png())}, "data": {"attention": "all"}},
     422, {"invalid_attention": 1}, {"client_error": 1}),
    ("wrong content type", "/classify", {"json": {"image": "x"}},
     415, {"unsupported_media_type": 1}, {"client_error": 1}),
    ("body too large", "/classify", {"files": {"image": ("a.png", b"\x00" * (LIMITS["max_body_bytes"] + 1))}},
     413, {"body_too_large": 1}, {"client_error": 1}),
    ("missing image", "/classify_batch", {"files": {"image": ("a.png", png())}},
     400, {"missing_image": 1}, {"client_error": 1}),
    ("too many images", "/classify_batch", {"files": [("images", ("a.png", png()))] * (LIMITS["max_images_per_request"] + 1)},
     413, {"too_many_images": 1}, {"client_error": 1}),
    ("bad images in a batch", "/classify_batch",
     {"files": [("images", ("a.png", png())), ("images", ("b.png", b"")), ("images", ("c.png", png(200, 8)))]},
     200, {"empty_image": 1, "degenerate_image": 1}, {"ok": 1, "client_error": 2}),
]  # fmt: skip


def _changes(before: dict[Any, float], after: dict[Any, float]) -> Counter[tuple[str, str]]:
    """Which series grew, and by how much, as (name, labels) -> amount."""
    grown: Counter[tuple[str, str]] = Counter()
    for key, value in after.items():
        if value != before.get(key, 0.0):
            name, labels = key
            grown[name, ",".join(f"{k}={v}" for k, v in sorted(labels))] = int(
                value - before.get(key, 0.0)
            )
    return grown


@pytest.mark.parametrize(
    ("what", "path", "request_kwargs", "status", "codes", "outcomes"),
    CASES,
    ids=[case[0] for case in CASES],
)
def test_each_request_is_counted_once_with_its_refusals(
    app: InProcessApp,
    what: str,
    path: str,
    request_kwargs: dict[str, Any],
    status: int,
    codes: dict[str, int],
    outcomes: dict[str, int],
) -> None:
    before = app.samples(*COUNTED)
    assert app.client.post(path, **request_kwargs).status_code == status
    endpoint = path.lstrip("/")
    expected = Counter(
        {("vit_requests_total", f"endpoint={endpoint},status={status}"): 1}
        | {("vit_image_errors_total", f"code={code}"): n for code, n in codes.items()}
        | {("vit_images_total", f"outcome={outcome}"): n for outcome, n in outcomes.items()}
    )
    assert _changes(before, app.samples(*COUNTED)) == expected


def test_durations_are_observed_and_nothing_stays_in_flight(
    app: InProcessApp, tiny_dir: Path
) -> None:
    duration = "vit_request_duration_seconds_count"
    before = app.metric(duration, endpoint="classify_batch")
    files = [("images", ("a.png", png())), ("images", ("b.png", b"junk"))]
    assert app.client.post("/classify_batch", files=files).status_code == 200
    assert app.client.post("/classify_batch", files={"images": ("a.png", b"")}).status_code == 200
    assert app.metric(duration, endpoint="classify_batch") == before + 2
    assert app.metric("vit_inflight_requests") == 0
    model = {"model": tiny_dir.name, "source": f"local-dir:{tiny_dir}"}
    assert app.metric("vit_model_info", **model, version="1", dtype="float32", device="cpu") == 1


def test_the_series_a_request_writes_exist_before_the_first_request(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Ready means warm: a histogram's first series is made before ready, at 0 (in
    multiprocess mode making one costs the first request ~0.5 ms each); a stage or a door this
    worker does not run gets none."""
    from tests.http.conftest import serve_in_process, settings_for, wait_until_ready

    with serve_in_process(settings_for(tiny_dir), tmp_path / "run") as fresh:
        wait_until_ready(fresh)
        stages = {
            dict(labels)["stage"]: value
            for (name, labels), value in fresh.samples("vit_stage_duration_seconds_count").items()
        }
        assert stages == dict.fromkeys(
            ("decode", "queue", "preprocess", "forward", "attention", "postprocess"), 0.0
        )
        endpoints = {
            dict(labels)["endpoint"]: value
            for (name, labels), value in fresh.samples("vit_request_duration_seconds_count").items()
        }
        assert endpoints == dict.fromkeys(
            ("classify", "classify_batch", "oip_infer", "oip_grpc_infer"), 0.0
        )
        response = fresh.client.post("/classify", files={"image": ("a.png", png())})
        assert response.status_code == 200
        assert fresh.metric("vit_request_duration_seconds_count", endpoint="classify") == 1
        assert fresh.metric("vit_stage_duration_seconds_count", stage="forward") == 1
