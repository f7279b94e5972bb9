"""The classification service over real HTTP: accuracy, batching, isolation, attention, errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import struct
import zlib
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.serving import Server, scrape
from models.digits import load_split, render_digit
from service.model.engine import Engine
from service.model.imaging import decode_image
from service.model.loading import load_model
from service.web.schemas import BatchItem, ClassifyResponse, ModelResponse
from tests.conftest import DEFAULT_MODEL_DIR
from tests.integration.conftest import SERVER_ENV

SPLIT = load_split()


def _digit_bytes(index: int, size: int, invert: bool, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = render_digit(SPLIT.X_test[index], size, invert)
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _batches_larger_than_one(server: Server) -> float:
    series = scrape(server.url)
    return series["vit_batch_size_count"] - series['vit_batch_size_bucket{le="1.0"}']


async def _post_many(
    url: str, payloads: list[dict[str, Any]], concurrency: int
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(payload: dict[str, Any]) -> httpx.Response:
            async with semaphore:
                return await client.post(url, **payload)

        return list(await asyncio.gather(*(one(p) for p in payloads)))


# --- accuracy -------------------------------------------------------------------------------


def test_held_out_digits_over_http(server: Server) -> None:
    """>= 95 % top-1 on 120 held-out digits, PNG and JPEG, several sizes, both polarities."""
    cases = []
    for i in range(120):
        size = (28, 32, 64, 100, 160, 300)[i % 6]
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        invert = (i // 2) % 2 == 1
        cases.append((i, size, invert, fmt))
    payloads = [
        {"files": {"image": (f"d{i}.{fmt.lower()}", _digit_bytes(i, size, inv, fmt))}}
        for i, size, inv, fmt in cases
    ]
    responses = asyncio.run(_post_many(f"{server.url}/classify", payloads, concurrency=8))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses[:3]]
    correct = sum(
        int(r.json()["predictions"][0]["label"]) == int(SPLIT.y_test[i])
        for r, (i, *_rest) in zip(responses, cases, strict=True)
    )
    assert correct / len(cases) >= 0.95, f"{correct}/{len(cases)}"
    for polarity in (False, True):
        subset = [
            int(r.json()["predictions"][0]["label"]) == int(SPLIT.y_test[i])
            for r, (i, _s, inv, _f) in zip(responses, cases, strict=True)
            if inv == polarity
        ]
        assert sum(subset) / len(subset) >= 0.95


# --- batching and isolation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline() -> Engine:
    return Engine(load_model(f"local-dir:{DEFAULT_MODEL_DIR}", device="cpu", dtype="float32"))


def test_no_cross_talk_under_concurrency(server: Server, offline: Engine) -> None:
    before = _batches_larger_than_one(server)
    images = [_digit_bytes(i, 32 + i, i % 2 == 1, "PNG") for i in range(64)]
    payloads = [{"files": {"image": (f"{i}.png", data)}} for i, data in enumerate(images)]
    responses = asyncio.run(_post_many(f"{server.url}/classify", payloads, concurrency=64))
    assert [r.status_code for r in responses] == [200] * 64
    min_side = offline.info.resize_size
    for data, response in zip(images, responses, strict=True):
        answer = response.json()
        assert answer["image"]["sha256"] == hashlib.sha256(data).hexdigest()
        decoded = decode_image(data, min_short_side=min_side)
        expected = offline.run([decoded.pixels], ["none"]).items[0].probs
        top = answer["predictions"][0]
        assert top["index"] == int(np.argmax(expected))
        assert top["score"] == pytest.approx(float(expected.max()), abs=1e-4)
    assert _batches_larger_than_one(server) > before
    assert max(r.json()["timing_ms"]["batch_size"] for r in responses) > 1


def test_lone_request_not_held_after_burst(server: Server) -> None:
    payloads = [
        {"files": {"image": ("b.png", _digit_bytes(i % 50, 64, False, "PNG"))}}
        for i in range(32 * 4)
    ]
    burst = asyncio.run(_post_many(f"{server.url}/classify", payloads, concurrency=32))
    assert [r.status_code for r in burst] == [200] * len(burst)
    max_wait_ms = float(SERVER_ENV["VIT_MAX_WAIT_MS"])
    for _ in range(5):
        alone = httpx.post(
            f"{server.url}/classify", files={"image": ("a.png", _digit_bytes(1, 64, True, "PNG"))}
        )
        assert alone.status_code == 200
        assert alone.json()["timing_ms"]["queue"] < max_wait_ms


def _truncated_jpeg() -> bytes:
    data = _digit_bytes(3, 200, False, "JPEG")
    return data[: len(data) // 2]


def test_poisoned_neighbours_fail_alone(server: Server) -> None:
    good = [(i, _digit_bytes(i, 96, i % 2 == 0, "PNG")) for i in range(24)]
    bad = [b"", b"not an image at all", _truncated_jpeg(), _digit_bytes(0, 96, False, "TIFF")] * 4
    payloads: list[dict[str, Any]] = []
    for k in range(max(len(good), len(bad))):
        if k < len(good):
            payloads.append({"files": {"image": ("g.png", good[k][1])}})
        if k < len(bad):
            payloads.append({"files": {"image": ("b.bin", bad[k])}})
    responses = asyncio.run(_post_many(f"{server.url}/classify", payloads, concurrency=32))
    good_answers = [
        r for r, p in zip(responses, payloads, strict=True) if p["files"]["image"][0] == "g.png"
    ]
    bad_answers = [
        r for r, p in zip(responses, payloads, strict=True) if p["files"]["image"][0] == "b.bin"
    ]
    assert [r.status_code for r in good_answers] == [200] * len(good)
    correct = sum(
        int(r.json()["predictions"][0]["label"]) == int(SPLIT.y_test[i])
        for r, (i, _d) in zip(good_answers, good, strict=True)
    )
    assert correct >= len(good) - 1
    assert all(400 <= r.status_code < 500 for r in bad_answers)
    assert all("error" in r.json() for r in bad_answers)


def test_batch_endpoint_keeps_order_and_isolates_bad_items(server: Server) -> None:
    files = [
        ("images", ("zero.png", _digit_bytes(0, 64, False, "PNG"))),
        ("images", ("junk.txt", b"hello")),
        ("images", ("two.jpg", _digit_bytes(2, 80, True, "JPEG"))),
    ]
    response = httpx.post(f"{server.url}/classify_batch", files=files, data={"top_k": "3"})
    assert response.status_code == 200
    items = response.json()
    assert [item["index"] for item in items] == [0, 1, 2]
    assert [item["filename"] for item in items] == ["zero.png", "junk.txt", "two.jpg"]
    assert items[1]["status"] == 415 and items[1]["error"]["code"] == "unsupported_media_type"
    for slot, label_index in ((0, 0), (2, 2)):
        assert len(items[slot]["predictions"]) == 3
        assert int(items[slot]["predictions"][0]["label"]) == int(SPLIT.y_test[label_index])
    for item in items:
        BatchItem.model_validate(item)


# --- attention and metadata ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cls", "rollout"])
def test_attention_answer(server: Server, mode: str) -> None:
    width, height = 240, 180
    image = render_digit(SPLIT.X_test[5], (width, height), invert=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    response = httpx.post(
        f"{server.url}/classify",
        files={"image": ("five.png", buffer.getvalue())},
        data={"attention": mode, "heatmap": "true", "top_k": "10"},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    ClassifyResponse.model_validate(answer)
    attention = answer["attention"]
    weights = np.array(attention["weights"])
    assert attention["mode"] == mode
    assert attention["grid"] == answer["patches"]["grid"] == [4, 4]
    assert weights.shape == (4, 4)
    assert np.isfinite(weights).all() and (weights >= 0).all()
    assert weights.sum() == pytest.approx(1.0, abs=1e-3)
    scores = [p["score"] for p in answer["predictions"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 10
    assert sum(scores) == pytest.approx(1.0, abs=1e-3)
    top = answer["patches"]["top"]
    assert top and top[0]["attention"] == pytest.approx(weights.max(), abs=1e-5)
    for patch in top:
        x0, y0, x1, y1 = patch["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert weights[patch["row"], patch["col"]] == pytest.approx(patch["attention"], abs=1e-5)
    heatmap = Image.open(io.BytesIO(base64.b64decode(attention["heatmap_png"])))
    assert heatmap.format == "PNG" and heatmap.size == (width, height)


def test_top_boxes_are_in_original_pixels(server: Server) -> None:
    """A landscape upload: the model sees the centered square; boxes tile that square."""
    width, height = 400, 200
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    answer = httpx.post(
        f"{server.url}/classify", files={"image": ("wide.png", buffer.getvalue())}
    ).json()
    assert answer["patches"]["crop_box"] == [100.0, 0.0, 300.0, 200.0]
    for patch in answer["patches"]["top"]:
        x0, y0, x1, y1 = patch["box"]
        assert x1 - x0 == pytest.approx(50.0) and y1 - y0 == pytest.approx(50.0)
        assert x0 == pytest.approx(100 + 50 * patch["col"]) and y0 == pytest.approx(
            50 * patch["row"]
        )


def test_attention_none(server: Server) -> None:
    answer = httpx.post(
        f"{server.url}/classify",
        files={"image": ("x.png", _digit_bytes(7, 32, False, "PNG"))},
        data={"attention": "none"},
    ).json()
    assert "attention" not in answer
    assert answer["patches"]["top"] == []


def test_default_model_metadata(server: Server) -> None:
    body = httpx.get(f"{server.url}/model").json()
    ModelResponse.model_validate(body)
    model = body["model"]
    assert model["num_patches"] == 16
    assert model["patch_dim"] == 192
    assert model["embed_dim"] == 64
    assert model["grid"] == [4, 4]
    assert model["sequence_length"] == 17
    assert model["position_embedding_kind"] == "learned"
    assert model["position_embedding_shape"] == [1, 17, 64]
    assert body["labels"] == [str(d) for d in range(10)]
    assert body["ready"] is True
    answer = httpx.post(
        f"{server.url}/classify", files={"image": ("x.png", _digit_bytes(7, 32, False, "PNG"))}
    ).json()
    patches = answer["patches"]
    assert patches["num_patches"] == 16 and patches["patch_dim"] == 192
    assert patches["embed_dim"] == 64 and patches["sequence_length"] == 17
    assert patches["position_embedding"] == {"kind": "learned", "shape": [1, 17, 64]}


def test_probes_and_openapi(server: Server) -> None:
    for probe in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(f"{server.url}{probe}").status_code == 200
    paths = httpx.get(f"{server.url}/docs.json").json()["paths"]
    assert {"/classify", "/classify_batch", "/model"} <= set(paths)


# --- the error table -------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression-bomb shape), tiny on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _tiff() -> bytes:
    return _digit_bytes(1, 32, False, "TIFF")


def _degenerate() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 100)).save(buffer, format="PNG")
    return buffer.getvalue()


ERROR_TABLE = [
    # (what, request kwargs for /classify, status, code)
    ("not an image", {"files": {"image": ("a.txt", b"hello world")}}, 415, "unsupported_media_type"),
    ("format not allowed", {"files": {"image": ("a.tif", _tiff())}}, 415, "unsupported_media_type"),
    ("not multipart", {"json": {"image": "x"}}, 415, "unsupported_media_type"),
    ("empty", {"files": {"image": ("a.png", b"")}}, 400, "empty_image"),
    ("corrupt", {"files": {"image": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)}}, 400, "corrupt_image"),
    ("truncated", {"files": {"image": ("a.jpg", _truncated_jpeg())}}, 400, "corrupt_image"),
    ("no image field", {"files": {"picture": ("a.png", _degenerate())}}, 400, "missing_image"),
    ("too many pixels", {"files": {"image": ("a.png", _png_header_only(8000, 8000))}}, 413, "too_many_pixels"),
    ("too many images", {"files": [("image", ("a.png", _degenerate()))] * 2}, 413, "too_many_images"),
    ("body too large", {"files": {"image": ("a.bin", b"\x00" * (5 * 1024 * 1024))}}, 413, "body_too_large"),
    ("degenerate", {"files": {"image": ("a.png", _degenerate())}}, 422, "degenerate_image"),
    ("top_k zero", {"files": {"image": ("a.png", b"x")}, "data": {"top_k": "0"}}, 422, "invalid_top_k"),
    ("top_k too big", {"files": {"image": ("a.png", b"x")}, "data": {"top_k": "11"}}, 422, "invalid_top_k"),
    ("top_k text", {"files": {"image": ("a.png", b"x")}, "data": {"top_k": "five"}}, 422, "invalid_top_k"),
    ("attention", {"files": {"image": ("a.png", b"x")}, "data": {"attention": "all"}}, 422, "invalid_attention"),
    ("heatmap", {"files": {"image": ("a.png", b"x")}, "data": {"heatmap": "maybe"}}, 422, "invalid_heatmap"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "request_kwargs", "status", "code"), ERROR_TABLE, ids=[r[0] for r in ERROR_TABLE]
)
def test_error_table(
    server: Server, what: str, request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = httpx.post(f"{server.url}/classify", timeout=60, **request_kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert len(error["message"]) > 10


def test_too_many_images_in_batch(server: Server) -> None:
    files = [("images", ("a.png", _degenerate()))] * 33
    response = httpx.post(f"{server.url}/classify_batch", files=files)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_images"


def test_server_survives_the_errors(server: Server) -> None:
    """After all of the above, the same worker still answers and nothing crashed."""
    response = httpx.post(
        f"{server.url}/classify", files={"image": ("x.png", _digit_bytes(9, 64, False, "PNG"))}
    )
    assert response.status_code == 200
    assert server.process.poll() is None
    assert "Traceback" not in server.log_text()
