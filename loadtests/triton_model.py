"""The Python backend's ``model.py`` for Triton's own ``tritonserver`` binary: what
``loadtests/triton_peer.py`` copies into its model repository as ``vit-digits/1/model.py``.

Each instance (a stub process) loads the model once; ``execute`` takes every request of the
batch Triton's dynamic batcher formed, runs their images through the model in one pass and
answers each request with its rows.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from loadtests.triton_peer import Classifier


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters = json.loads(args["model_config"])["parameters"]
        self.classifier = Classifier(
            parameters["source"]["string_value"], int(parameters["threads"]["string_value"])
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        counts, images = [], []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            counts.append(len(rows))
            images += [bytes(row[0]) for row in rows]
        try:
            probs = self.classifier(images)
        except Exception as error:  # one bad image fails the requests of this batch
            message = pb_utils.TritonError(f"cannot classify: {error}")
            return [pb_utils.InferenceResponse(error=message) for _ in requests]
        responses, start = [], 0
        for count in counts:
            tensor = pb_utils.Tensor(
                "probabilities", np.ascontiguousarray(probs[start : start + count])
            )
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += count
        return responses
