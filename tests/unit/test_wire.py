"""The model hop's wire format: every kind of message survives encode -> frames -> decode, as the
sockets carry it (a JSON header frame, then raw buffers), with no pickle anywhere."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from service.errors import ApiError, overloaded
from service.link import wire
from service.model.engine import Outcome, Work
from service.model.loading import ModelInfo, load_model
from tests.utils import make_tiny_dir

RNG = np.random.default_rng(3)


def _frames(encoded: list[Any]) -> tuple[dict[str, Any], list[memoryview]]:
    """What the receiving socket hands over: the header parsed, each buffer as bytes."""
    raw = [bytes(memoryview(frame)) for frame in encoded]
    return wire.read_header(raw[0]), [memoryview(buffer) for buffer in raw[1:]]


@pytest.fixture(scope="module")
def info(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    folder = tmp_path_factory.mktemp("tiny") / "m"
    make_tiny_dir(folder, label_names=["a", "b", "c", "d", "e", "f", "g"])
    return load_model(f"local-dir:{folder}", device="cpu", dtype="float32").info


def test_images_round_trip_as_pixels_and_jpegs() -> None:
    pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    works = [
        Work("cls", pixels=pixels),
        Work("none", jpeg=b"\xff\xd8fake"),
        Work("rollout", pixels, version="3"),  # routed to a version (a canary serves)
    ]
    header, buffers = _frames(wire.encode_request(41, works))
    assert header == {
        "id": 41,
        "items": [
            {"mode": "cls", "shape": [5, 7, 3]},
            {"mode": "none", "jpeg": 1},
            {"mode": "rollout", "shape": [5, 7, 3], "v": "3"},
        ],
    }
    decoded = wire.decode_request(header, buffers)
    assert [work.mode for work in decoded] == ["cls", "none", "rollout"]
    assert [work.version for work in decoded] == [None, None, "3"]
    np.testing.assert_array_equal(decoded[0].pixels, pixels)  # type: ignore[arg-type]
    assert decoded[1].jpeg == b"\xff\xd8fake" and decoded[1].pixels is None
    np.testing.assert_array_equal(decoded[2].pixels, pixels)  # type: ignore[arg-type]


def test_a_reply_round_trips_outcomes_and_per_image_errors() -> None:
    probs = RNG.random(7, dtype=np.float32)
    attention = RNG.random((4, 4), dtype=np.float32)
    corrupt = ApiError(400, "corrupt_image", "Not a JPEG.", {"X-Why": "test"})
    results: list[Outcome | ApiError] = [
        Outcome(probs, attention, 3, 2.5, 0.004),
        corrupt,
        Outcome(probs, None, 3, 2.5, 0.001),
    ]
    header, buffers = _frames(wire.encode_reply(9, results, model_s=0.01, queued=5, bound=64))
    # The keys the docstring promises (``q`` for the queue seconds, not ``queue_s``).
    assert set(header) == {"id", "items", "model_s", "queued", "bound"}
    assert set(header["items"][0]) == {"batch", "ms", "q", "att", "v"}
    reply = wire.decode_reply(header, buffers)
    assert (reply.message_id, reply.error, reply.model_s) == (9, None, 0.01)
    assert (reply.queued, reply.bound) == (5, 64)
    first, error, last = reply.results
    assert isinstance(first, Outcome) and isinstance(last, Outcome)
    np.testing.assert_array_equal(first.probs, probs)
    np.testing.assert_array_equal(first.attention, attention)  # type: ignore[arg-type]
    assert (first.batch_size, first.inference_ms, first.queue_s) == (3, 2.5, 0.004)
    assert last.attention is None and last.queue_s == 0.001
    assert isinstance(error, ApiError)
    assert (error.status, error.code, error.message, error.headers) == (
        400,
        "corrupt_image",
        "Not a JPEG.",
        {"X-Why": "test"},
    )


def test_a_reply_says_which_version_answered(info: ModelInfo) -> None:
    v2 = dataclasses.replace(info, version="2")
    probs = RNG.random(7, dtype=np.float32)
    results: list[Outcome | ApiError] = [
        Outcome(probs, None, 1, 1.0, 0.0, v2),
        Outcome(probs, None, 1, 1.0, 0.0, info),
        Outcome(probs, None, 1, 1.0, 0.0),
    ]
    header, buffers = _frames(wire.encode_reply(3, results, model_s=0.0, queued=0, bound=8))
    assert [item["v"] for item in header["items"]] == ["2", "1", None]
    known = wire.decode_reply(header, buffers, {"1": info, "2": v2}).results
    assert [out.model for out in known] == [v2, info, None]  # type: ignore[union-attr]
    # A version not heard of yet: no model info (the worker answers with the one it knows).
    unknown = wire.decode_reply(header, buffers, {"1": info}).results
    assert [out.model for out in unknown] == [None, info, None]  # type: ignore[union-attr]


def test_a_failed_message_round_trips_its_error_and_the_queue() -> None:
    frame = wire.encode_failure(12, overloaded("Full.", 3), queued=64, bound=64)
    reply = wire.decode_reply(*_frames([frame]))
    assert reply.message_id == 12 and reply.results == []
    assert (reply.queued, reply.bound) == (64, 64)
    assert reply.error is not None
    assert (reply.error.status, reply.error.code, reply.error.headers) == (
        503,
        "overloaded",
        {"Retry-After": "3"},
    )


def test_the_model_info_round_trips(info: ModelInfo) -> None:
    frame = wire.encode_info(
        info, warmup_ms=12.5, decodes_on_device=True, runtime={"pid": 7, "device": "cpu"}
    )
    said = wire.decode_info(wire.read_header(frame))
    assert said.info == info and said.load_error is None
    assert (said.warmup_ms, said.decodes_on_device, said.runtime) == (
        12.5,
        True,
        {"pid": 7, "device": "cpu"},
    )
    assert asdict(said.info) == asdict(info)  # tuples come back as tuples
    assert said.canary is None and said.percent == 0
    canary = dataclasses.replace(info, version="2", source="local-dir:/v2")
    frame = wire.encode_info(
        info, warmup_ms=1.0, decodes_on_device=False, runtime={}, canary=(canary, 15)
    )
    said = wire.decode_info(wire.read_header(frame))
    assert (said.info, said.canary, said.percent) == (info, canary, 15)


def test_a_load_error_round_trips() -> None:
    said = wire.decode_info(wire.read_header(wire.encode_load_error("No such folder.")))
    assert said.info is None and said.load_error == "No such folder."


def test_the_control_messages_are_plain_json() -> None:
    assert orjson.loads(wire.INFO) == {"op": "info"}
    assert orjson.loads(wire.BYE) == {"op": "bye"}


def test_ipc_endpoints_live_in_the_servers_run_folder(tmp_path: Path) -> None:
    assert wire.ipc_endpoint(1, run_id=4242).endswith("/vit-serve-4242/model-1.sock")
