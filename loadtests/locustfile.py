"""Locust scenarios for the ViT service: single images, batches, bad uploads, three load shapes.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:3000 \\
        -u 16 -r 8 -t 60s --csv results/loadtest --html results/loadtest.html --max-p95-ms 2000

Options added to locust's own: ``--bad-share`` (share of uploads that are deliberately bad, whose
expected 4xx counts as success; default 0.02), ``--max-p95-ms`` (exit non-zero above it),
``--shape`` (steady | ramp | spike; steady uses -u/-r/-t as given), ``--photos`` (include
photos up to 12 MP; on by default). At the end the run scrapes the service's /metrics, prints
the batch-size distribution and checks that the service counted exactly the images and requests
locust sent; any mismatch, any failure, or p95 above the threshold makes the exit code non-zero.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.env import Environment

from harness.samples import Sample, bad_samples, digit_samples, multipart, photo_samples
from harness.serving import scrape

_logger = logging.getLogger("vit-loadtest")

MODES = ("none", "cls", "cls", "rollout")  # cls is the default and the common case


class _Sent:
    """What this locust process sent and what got an answer, for the end-of-run check.

    A request still on the wire when locust stops its users may or may not have reached the
    service, so the check is a range: the service must have counted every answered request and
    none beyond those started.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = [0, 0]  # requests, images
        self.answered = [0, 0]

    def start(self, images: int) -> None:
        with self.lock:
            self.started[0] += 1
            self.started[1] += images

    def answer(self, images: int) -> None:
        with self.lock:
            self.answered[0] += 1
            self.answered[1] += images


SENT = _Sent()
BASELINE: dict[str, float] = {}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--bad-share", type=float, default=0.02, help="share of bad uploads")
    parser.add_argument("--max-p95-ms", type=float, default=0.0, help="fail above this p95 (0=off)")
    parser.add_argument(
        "--shape", choices=["steady", "ramp", "spike"], default="steady", help="load shape"
    )
    parser.add_argument(
        "--photos", choices=["on", "off"], default="on", help="photos up to 12 MP (slow on CPU)"
    )


def _counters(host: str) -> dict[str, float]:
    """Sum of vit_images_total and of vit_request_duration_seconds_count, and batch sizes."""
    totals = {"images": 0.0, "requests": 0.0}
    for key, value in scrape(host).items():
        if key.startswith("vit_images_total{"):
            totals["images"] += value
        elif key.startswith("vit_request_duration_seconds_count{"):
            totals["requests"] += value
        elif key.startswith("vit_batch_size_bucket{"):
            totals["le=" + key.split('le="')[1].split('"')[0]] = value
    return totals


@events.test_start.add_listener
def _baseline(environment: Environment, **_: Any) -> None:
    if environment.host:
        BASELINE.update(_counters(environment.host))


@events.quitting.add_listener
def _verdict(environment: Environment, **_: Any) -> None:
    stats = environment.stats.total
    options = environment.parsed_options
    problems = []
    if stats.num_requests == 0:
        problems.append("no request was made")
    if stats.fail_ratio > 0:
        problems.append(f"failure ratio {stats.fail_ratio:.4f} > 0")
    p95 = stats.get_response_time_percentile(0.95) or 0.0
    if options is not None and options.max_p95_ms and p95 > options.max_p95_ms:
        problems.append(f"p95 {p95:.0f} ms > {options.max_p95_ms:.0f} ms")
    if environment.host:
        after = _drained_counters(environment.host)
        counted = (
            after["requests"] - BASELINE.get("requests", 0.0),
            after["images"] - BASELINE.get("images", 0.0),
        )
        print(f"service counted {counted[0]:.0f} requests / {counted[1]:.0f} images; locust "
              f"got answers to {SENT.answered[0]} / {SENT.answered[1]} and started "
              f"{SENT.started[0]} / {SENT.started[1]}")  # fmt: skip
        for what, got, low, high in zip(("requests", "images"), counted, SENT.answered,
                                        SENT.started, strict=True):  # fmt: skip
            if not low <= got <= high:
                problems.append(f"service counted {got:.0f} {what}, expected {low}..{high}")
        print("batch-size distribution (forward passes of size <= N):")
        previous = 0.0
        for key in sorted((k for k in after if k.startswith("le=")), key=_bucket_order):
            count = after[key] - BASELINE.get(key, 0.0)
            print(f"  {key[3:]:>6}: {count - previous:8.0f}")
            previous = count
    for problem in problems:
        print(f"LOADTEST FAILED: {problem}")
    environment.process_exit_code = 1 if problems else 0


def _drained_counters(host: str) -> dict[str, float]:
    """Counters once the service has finished what is in flight (bounded wait)."""
    for _ in range(40):
        if scrape(host).get("vit_inflight_requests", 0.0) == 0:
            break
        time.sleep(0.25)
    return _counters(host)


def _bucket_order(key: str) -> float:
    value = key[3:]
    return float("inf") if value == "+Inf" else float(value)


class _ClassifyBase(FastHttpUser):
    abstract = True
    wait_time = between(0.05, 0.3)

    def _uploads(self) -> list[Sample]:
        options = self.environment.parsed_options
        samples = list(digit_samples())
        if options is None or options.photos == "on":
            samples += list(photo_samples())
        return samples

    def _pick(self) -> Sample:
        options = self.environment.parsed_options
        share = 0.02 if options is None else options.bad_share
        if random.random() < share:
            return random.choice(bad_samples())
        return random.choice(self._uploads())

    def _post(self, path: str, files: list[tuple[str, str, bytes]], name: str,
              expected: int) -> None:  # fmt: skip
        fields = {"attention": random.choice(MODES), "top_k": str(random.randint(1, 5))}
        body, content_type = multipart(fields, files)
        SENT.start(len(files))
        with self.client.post(
            path, data=body, headers={"Content-Type": content_type}, name=name,
            catch_response=True,
        ) as response:  # fmt: skip
            if response.status_code:
                SENT.answer(len(files))
            if response.status_code == expected:
                response.success()
            else:
                response.failure(f"expected {expected}, got {response.status_code}: "
                                 f"{(response.text or '')[:200]}")  # fmt: skip


class SingleImageUser(_ClassifyBase):
    """Posts one image at a time: digits, photos up to 12 MP, and a share of bad uploads."""

    weight = 4

    @task
    def classify(self) -> None:
        sample = self._pick()
        name = "/classify [bad upload]" if sample.status != 200 else f"/classify [{sample.name}]"
        self._post("/classify", [("image", sample.filename, sample.data)], name, sample.status)


class BatchUser(_ClassifyBase):
    """Posts 2 to 16 images per request; a bad one only fails its own slot (status 200)."""

    weight = 1

    @task
    def classify_batch(self) -> None:
        count = random.randint(2, 16)
        picks = [self._pick() for _ in range(count)]
        files = [("images", s.filename, s.data) for s in picks]
        self._post("/classify_batch", files, "/classify_batch [2-16 images]", 200)


class SelectedShape(LoadTestShape):
    """--shape: steady (-u users), ramp (4 equal steps up to -u), or spike (-u/2, then 4x -u for
    the middle fifth of the run, then back); all end after -t."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        if options is None or options.shape == "steady":
            return self._steady(options)
        users, duration = options.num_users or 8, options.run_time or 60
        elapsed = self.get_run_time()
        if elapsed >= duration:
            return None
        fraction = elapsed / duration
        if options.shape == "ramp":
            step = min(3, int(fraction * 4))
            return max(1, users * (step + 1) // 4), users
        if 0.4 <= fraction < 0.6:
            return users * 4, users * 4
        return max(1, users // 2), users

    def _steady(self, options: Any) -> tuple[int, float] | None:
        if options is None:
            return None
        duration = options.run_time or 60
        if self.get_run_time() >= duration:
            return None
        return options.num_users or 8, options.spawn_rate or 8
