"""Schemathesis over the whole HTTP surface, from the OpenAPI document a real server publishes.

The document comes from the running ``bentoml serve`` (``/docs.json``): BentoML's probes and
``/metrics``, our ``/classify``, ``/classify_batch``, ``/model`` and ``/models`` with their documented
answers, and the Open Inference Protocol's ``/v2`` routes (``service/web/routes.py``
``_protocol_routes``; the inference request as ``service/web/schemas.py`` ``oip_infer_request``
describes it). Three in four of a protocol case's paths name the served model; a positive
inference case carries our uploads as its ``image`` tensor three times in four; a positive
``?model=`` on our routes names the served model three times in four too. Our two POST routes read the raw request; the service documents their request by hand
(``service/schemas.py`` ``classify_request``: multipart field ``image`` / ``images`` or a raw
body, and the ``top_k``, ``attention`` and ``heatmap`` options as ``service/options.py`` reads
them, an empty value meaning the default), and the test checks that it does.

Three positive cases in four carry uploads from ``tests/utils/image_fuzz.py`` (the sample
images, as is or damaged), so they reach the decoder and the model; the rest keep
schemathesis's own files (1×1 PNG/JPEG/GIF/WebP, which are 422 ``degenerate_image``, a PDF, a ZIP)
or random bytes. Negative cases are schemathesis's invalid options and bodies. Every answer must:

- be no 5xx other than the designed ones: 503 ``overloaded`` / ``not_ready`` with Retry-After,
  and 504 (the request timeout);
- from our routes, when 4xx/5xx, be JSON of exactly ``{"error": {"code": str, "message": str}}``
  (from a protocol route ``{"error": "<code>: <message>"}``; an inference answer has one row per
  image in every output);
  a ``/classify_batch`` answer's per-image error slot is ``{"index", "filename", "error",
  "status"}`` with the same ``error`` shape, one slot per uploaded image, in order;
- conform to the documented response schema, content type and headers (schemathesis's checks),
  and negative data must be refused (``negative_data_rejection``, 4xx only) unless what reached
  the wire is options the service accepts (see ``_valid_on_the_wire``).

BentoML's ``/healthz``, ``/livez`` and ``/readyz`` answer ``text/plain`` (a newline) and
``/metrics`` the Prometheus text format, all outside our JSON error shape by design: they are
Kubernetes and Prometheus endpoints, documented with no response body. For them the test checks
the status (200 on a ready server), the content type and, for ``/metrics``, that it parses.

Methods the document does not list get our 405 shape too (``test_undocumented_methods_*``).

``FUZZ_API_CASES`` (default 1,000) is the number of generated cases, shared by the operations
that take input; each operation without input (a probe, ``GET /model``) has exactly one case and
counts too, and each protocol route that names a model in its path ``OIP_NAMED_CASES``. Derandomized: every run sends the same requests. Run with ``-s`` for the counts.
"""

from __future__ import annotations

import base64
import collections
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks

from harness.serving import Server, parse_exposition
from service.errors import ApiError
from service.web.options import parse_options
from tests.utils.image_fuzz import image_seeds, uploads

CASES = int(os.environ.get("FUZZ_API_CASES", "1000"))
# The share of an operation's cases that are negative (invalid options or bodies).
NEGATIVE_SHARE = 0.4

OUR_ROUTES = frozenset({"/classify", "/classify_batch", "/model", "/models"})
# The Open Inference Protocol's routes: errors are {"error": "<code>: <message>"}.
OIP_MODEL = "/v2/models/{model_name}"
OIP_VERSION = f"{OIP_MODEL}/versions/{{model_version}}"
OIP_INFER = frozenset({f"{OIP_MODEL}/infer", f"{OIP_VERSION}/infer"})
OIP_ROUTES = frozenset({"/v2", "/v2/health/live", "/v2/health/ready", OIP_MODEL, OIP_VERSION,
                        f"{OIP_MODEL}/ready", f"{OIP_VERSION}/ready", *OIP_INFER})  # fmt: skip
# Cases for each protocol route that names a model (three in four name the served one).
OIP_NAMED_CASES = 12
PROBES = frozenset({"/healthz", "/livez", "/readyz"})
FILE_FIELDS = {"/classify": "image", "/classify_batch": "images"}
DESIGNED_503 = frozenset({"overloaded", "not_ready"})

CHECKS = [
    openapi_checks.response_schema_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
]

pytestmark = pytest.mark.timeout(max(300, CASES // 4))


# --------------------------------------------------------------------------- the document


def documented(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc``, checked to describe our POST routes' request (the upload field and the options,
    ``service/schemas.py`` ``classify_request``): what schemathesis generates from."""
    for path, file_field in FILE_FIELDS.items():
        operation = doc["paths"][path]["post"]
        body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["required"] == [file_field], body
        names = {parameter["name"] for parameter in operation["parameters"]}
        assert names == {"top_k", "attention", "heatmap", "model"}, names
    return doc


def _name_the_model(case: Any, name: str) -> None:
    """A protocol case's path names the served model (and its one version)."""
    if case.path_parameters:
        case.path_parameters = {**case.path_parameters, "model_name": name}
        if "model_version" in case.path_parameters:
            case.path_parameters["model_version"] = "1"


def _with_images(case: Any, images: list[bytes]) -> int | None:
    """Put our uploads into a positive inference case's ``image`` tensor (base64, as JSON
    carries BYTES); the number of images it now carries."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        return None
    data = [base64.b64encode(image).decode("ascii") for image in images]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": data}
    case.body = {**body, "inputs": [tensor]}
    return len(images)


def _with_uploads(case: Any, path: str, images: Any) -> int | None:
    """Put our uploads into a positive case's body; the number of images it now carries."""
    if path in OIP_INFER:
        return _with_images(case, images)
    file_field = FILE_FIELDS.get(path)
    if file_field is None or case.body is None:
        return None
    if isinstance(case.body, dict) and file_field in case.body:
        if file_field == "images":
            case.body = {**case.body, file_field: images}
            return len(images)
        case.body = {**case.body, file_field: images[0]}
        return 1
    if case.media_type == "application/octet-stream":
        case.body = images[0]
        return 1
    return None


def _images(max_images: int) -> st.SearchStrategy[list[bytes]]:
    """One to a few uploads (intact samples favoured, so most reach the model), or one too many
    intact samples."""
    intact = st.sampled_from(image_seeds())
    return st.lists(intact | uploads(), min_size=1, max_size=4) | st.lists(
        intact, min_size=max_images + 1, max_size=max_images + 1
    )


# --------------------------------------------------------------------------- the checks


def _error_shape(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body


def _status_is_designed(status: int, code: str | None, retry_after: str | None) -> None:
    """A 5xx is a 503 overloaded / not_ready, with Retry-After on a response (``retry_after``
    "slot" for a batch answer's per-image slot, which has no headers), or a 504."""
    if status == 503:
        assert code in DESIGNED_503, f"503 {code}"
        assert retry_after == "slot" or (retry_after or "").isdigit(), "503 without Retry-After"
    elif status >= 500:
        assert status == 504, f"{status} {code}"


def _header(response: schemathesis.Response, name: str) -> str | None:
    values = {k.lower(): v for k, v in response.headers.items()}.get(name)
    return values[0] if values else None


def check_oip(path: str, response: schemathesis.Response, images: int | None) -> str:
    """A protocol route's answer: an error is ``{"error": "<code>: <message>"}`` with a designed
    status; an inference answer has one row per image in every output."""
    status = response.status_code
    ctype = _header(response, "content-type") or ""
    if status >= 400:
        assert ctype.startswith("application/json"), (status, ctype)
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert isinstance(body["error"], str), body
        code, colon, message = body["error"].partition(": ")
        assert colon and code and message and " " not in code, body
        _status_is_designed(status, code, _header(response, "retry-after"))
        return f"{status} {code}"
    assert status == 200, status
    if path in OIP_INFER and images is not None and ctype.startswith("application/json"):
        outputs = response.json()["outputs"]
        assert outputs and all(o["shape"][0] == images for o in outputs), (images, outputs)
    return "200"


def check(path: str, response: schemathesis.Response, images: int | None) -> str:
    """Our own checks on one answer; its outcome label."""
    status = response.status_code
    ctype = _header(response, "content-type") or ""
    if path in OIP_ROUTES:
        return check_oip(path, response, images)
    if path in PROBES:
        assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
        return "200"
    if path == "/metrics":
        assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
        assert parse_exposition(response.text), "empty exposition"
        return "200"
    assert path in OUR_ROUTES, path
    if status >= 400:
        assert ctype.startswith("application/json"), (status, ctype)
        body = response.json()
        _error_shape(body)
        code = body["error"]["code"]
        _status_is_designed(status, code, _header(response, "retry-after"))
        return f"{status} {code}"
    assert status == 200, status
    if path != "/classify_batch":
        return "200"
    items = response.json()
    assert isinstance(items, list) and items, items
    if images is not None:
        assert len(items) == images, (len(items), images)
    codes = []
    for index, item in enumerate(items):
        assert item["index"] == index, item
        if "error" in item:
            assert set(item) == {"index", "filename", "error", "status"}, item
            _error_shape({"error": item["error"]})
            assert isinstance(item["status"], int) and 400 <= item["status"] < 600, item
            _status_is_designed(item["status"], item["error"]["code"], "slot")
            codes.append(item["error"]["code"])
        else:
            assert "predictions" in item, item
    return "200" + (f" with {', '.join(sorted(set(codes)))}" if codes else "")


def _valid_on_the_wire(case: Any, response: schemathesis.Response, num_classes: int) -> bool:
    """Whether a negative case whose only negative part is its query sent options the service
    accepts: ``service/options.py`` reads an empty value as the default and strips and lower-cases
    ``heatmap``, and some of schemathesis's negative values serialise to such strings (``top_k=``,
    ``heatmap=%09``). Such a request is valid, and its 200 no failure."""
    negative = {loc for loc, info in case.meta.components.items() if info.mode.is_negative}
    if negative != {ParameterLocation.QUERY}:
        return False
    query = urllib.parse.urlsplit(response.request.url or "").query
    fields = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    try:
        parse_options(fields, num_classes, default_top_k=1, default_attention="cls")
    except ApiError:
        return False
    return True


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Cases and outcomes per operation and generation mode."""

    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def report(self) -> str:
        return "\n".join(
            f"  {label}: {n} cases; " + ", ".join(f"{k}: {v}" for k, v in self.outcomes[label].most_common())
            for label, n in self.cases.items()
        )  # fmt: skip


def fuzz_api(url: str, cases: int) -> Run:
    """Generate ``cases`` requests (plus one per operation without input) from the server's
    own OpenAPI document, send them to ``url`` and check every answer."""
    model = httpx.get(f"{url}/model", timeout=30).json()
    doc = documented(httpx.get(f"{url}/docs.json", timeout=30).json())
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "413", "415", "422"]}}}
    )
    schema = schemathesis.openapi.from_dict(doc, config=config)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    paths = {operation.path for operation in operations}
    assert paths >= OUR_ROUTES | PROBES | {"/metrics"} | OIP_ROUTES, paths
    with_input = [op for op in operations if op.path in FILE_FIELDS or op.path in OIP_INFER]
    share = -(-cases // len(with_input))
    max_images = int(model["batching"]["max_images_per_request"])
    run = Run()
    session = requests.Session()

    def one(operation: Any, mode: GenerationMode, examples: int) -> None:
        label = f"{operation.method.upper()} {operation.path} {mode.value}"
        negative = mode is GenerationMode.NEGATIVE

        @settings(
            max_examples=examples,
            derandomize=True,
            database=None,
            deadline=None,
            print_blob=True,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.filter_too_much,
            ],
        )
        @given(
            case=operation.as_strategy(generation_mode=mode),
            images=_images(max_images),
            ours=st.integers(0, 3),
        )
        def test(case: Any, images: list[bytes], ours: int) -> None:
            # Three positive cases in four carry our uploads; negative ones keep their own.
            # A protocol case names the served model, but for one positive case in four (not
            # those without uploads: those are the ones Hypothesis makes most).
            if operation.path in OIP_ROUTES and (negative or ours != 3):
                _name_the_model(case, model["model"]["name"])
            # ``?model=`` names the served model (so a negative case is judged by the rest of
            # it), but for one positive case in four.
            served = operation.path in FILE_FIELDS and (negative or ours != 3)
            if served and case.query and "model" in case.query:
                case.query = {**case.query, "model": model["model"]["name"]}
            if operation.path in OIP_INFER and ours == 1:
                images = images[:1]  # a request fails whole on one bad image: more pass this way
            count = None if negative or ours == 0 else _with_uploads(case, operation.path, images)
            response = case.call(base_url=url, session=session, timeout=60)
            run.cases[label] += 1
            outcome = check(operation.path, response, count)
            run.outcomes[label][outcome] += 1
            strict = negative and not _valid_on_the_wire(case, response, len(model["labels"]))
            extra = [openapi_checks.negative_data_rejection] if strict else []
            case.validate_response(response, checks=CHECKS + extra)

        test()

    for operation in operations:
        if operation in with_input:
            negative = round(share * NEGATIVE_SHARE)
            one(operation, GenerationMode.POSITIVE, share - negative)
            one(operation, GenerationMode.NEGATIVE, negative)
        elif operation.path_parameters:
            one(operation, GenerationMode.POSITIVE, OIP_NAMED_CASES)
        else:
            one(operation, GenerationMode.POSITIVE, 1)
    return run


def test_fuzz_api(server: Server) -> None:
    logged = len(server.log_text())
    started = time.perf_counter()
    run = fuzz_api(server.url, CASES)
    print(f"fuzzed the API with {run.total} cases in {time.perf_counter() - started:.1f} s:")
    print(run.report())
    assert run.total >= CASES, run.report()
    log = server.log_text()[logged:]
    assert "Traceback" not in log, log[-4000:]


# --------------------------------------------------------------------------- beyond the document

_ROUTE_METHODS = {"/classify": "POST", "/classify_batch": "POST", "/model": "GET", "/models": "GET"}


@pytest.mark.parametrize("path", sorted(_ROUTE_METHODS))
def test_undocumented_methods_answer_in_our_shape(server: Server, path: str) -> None:
    """Schemathesis sends only documented methods; the others get our 405, not FastAPI's."""
    allowed = _ROUTE_METHODS[path]
    for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - {allowed}):
        response = httpx.request(method, f"{server.url}{path}", timeout=30)
        assert response.status_code == 405, (method, response.status_code, response.text)
        assert response.headers["allow"] == allowed
        _error_shape(response.json())


@pytest.mark.parametrize("charset", ["punycode", "undefined"])
def test_multipart_charset_that_cannot_decode_is_400(server: Server, charset: str) -> None:
    """Found by tests/unit/test_decoder_fuzz.py: these charsets made Starlette raise a plain
    UnicodeError, answered 500 ``internal_error``."""
    body = b'--XB\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    response = httpx.post(
        f"{server.url}/classify",
        content=body + b"abc\r\n--XB--\r\n",
        headers={"content-type": f"multipart/form-data; boundary=XB; charset={charset}"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    _error_shape(response.json())
    assert response.json()["error"]["code"] == "malformed_multipart"
