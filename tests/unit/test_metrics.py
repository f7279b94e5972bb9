"""The /metrics filter: BentoML's per-path series only for real routes; ours untouched."""

from __future__ import annotations

from service.metrics import drop_unknown_endpoints

EXPOSITION = """\
# HELP bentoml_api_server_request_total Total number of server HTTP requests
# TYPE bentoml_api_server_request_total counter
bentoml_api_server_request_total{endpoint="/classify",http_response_code="200"} 3.0
bentoml_api_server_request_total{endpoint="/nope/123",http_response_code="404"} 1.0
bentoml_api_server_request_in_progress{endpoint="/wp-login.php"} 0.0
vit_request_duration_seconds_count{endpoint="classify"} 3.0
vit_images_total{outcome="ok"} 3.0
"""


def test_unknown_paths_are_dropped_and_ours_kept() -> None:
    out = drop_unknown_endpoints(EXPOSITION, {"/classify", "/model"})
    assert 'endpoint="/classify"' in out
    assert "/nope/123" not in out and "wp-login" not in out
    assert 'vit_request_duration_seconds_count{endpoint="classify"} 3.0' in out
    assert 'vit_images_total{outcome="ok"} 3.0' in out
    assert out.count("# HELP") == 1
