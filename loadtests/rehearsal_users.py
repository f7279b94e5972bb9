"""The locust users of the cluster rehearsal (``loadtests/rehearsal.py``): each posts one digit
to ``/classify`` through the load balancer, back to back, and every request is logged as it ends
(to ``$REHEARSAL_LOG``, one ``start end status error`` line each) so the rehearsal can tell which
requests failed and when, against the moments it stopped or killed a replica.

A request fails when the answer is not a 200 with predictions, or when none came back.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from locust import FastHttpUser, constant, events, task

from harness.samples import digit, multipart

_BODY, _CONTENT_TYPE = multipart({}, [("image", "d.png", digit(7, 64, False))])
_LOG = open(os.environ["REHEARSAL_LOG"], "a", buffering=1)  # noqa: SIM115  (lives with locust)
_LOCK = threading.Lock()


@events.request.add_listener
def _log(
    start_time: float,
    response_time: float,
    response: Any,
    exception: BaseException | None,
    **_: Any,
) -> None:
    status = getattr(response, "status_code", 0) or 0
    error = "" if exception is None else repr(exception).replace("\n", " ")
    with _LOCK:
        _LOG.write(f"{start_time:.4f} {time.time():.4f} {status} {error}\n")


class Client(FastHttpUser):
    """An application sending one image per request, as fast as answers come."""

    wait_time = constant(0)

    @task
    def classify(self) -> None:
        with self.client.post(
            "/classify",
            data=_BODY,
            headers={"Content-Type": _CONTENT_TYPE},
            catch_response=True,
        ) as response:
            if response.status_code == 200 and b'"predictions"' in (response.content or b""):
                response.success()
            else:
                error = getattr(response, "error", None)
                response.failure(
                    f"HTTP {response.status_code} {error!r} {(response.content or b'')[:80]!r}"
                )
