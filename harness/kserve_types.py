"""Validate KServe objects against KServe's own API types, offline: run in ``.venv/kserve``.

    .venv/kserve/bin/python -m harness.kserve_types < objects.json

Reads a JSON list of rendered objects (``kubectl kustomize`` output) and prints a JSON object:
``{"versions": {...}, "checked": N, "problems": [...]}``. Each ``serving.kserve.io`` object is
walked against the generated models of KServe's Python SDK (the ``kserve`` wheel from PyPI,
installed without its server's dependencies) and, below them, the Kubernetes client's models
(``V1Container``, ``V1Probe``, ...): both are generated from the Go types that KServe's CRDs
are generated from. A field a type does not declare is a problem (as a cluster with field
validation ``Strict`` refuses it), and so is a value of the wrong JSON type; every object is then
built through the models' constructors, which refuse a missing required field or a value outside
an enumeration.

The SDK's package ``__init__`` starts KServe's model server and imports what that needs (FastAPI,
pandas, ...); only its ``models`` are imported here, through a bare package entry.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import sys
import types
from typing import Any

_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "object": (object,),
    "datetime": (str,),
    "date": (str,),
    "bytes": (str,),
    # resource quantities and int-or-string fields
    "ResourceQuantity": (str, int, float),
}


def _models() -> tuple[Any, Any]:
    spec = importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the kserve SDK is not installed here (make install puts it in .venv/kserve)"
        )
    package = types.ModuleType("kserve")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = package
    import kserve.models as kserve_models
    import kubernetes.client.models as kubernetes_models

    return kserve_models, kubernetes_models


KSERVE, KUBERNETES = _models()
KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
}


def _class(name: str) -> Any:
    for module in (KSERVE, KUBERNETES):
        found = getattr(module, name, None)
        if found is not None:
            return found
    return None


def build(value: Any, kind: str, path: str, problems: list[str]) -> Any:
    """``value`` checked against the SDK type ``kind``; returns it as the SDK would hold it."""
    if (inner := re.fullmatch(r"[lL]ist\[(.+)\]", kind)) is not None:
        if not isinstance(value, list):
            problems.append(f"{path}: a list expected, got {type(value).__name__}")
            return None
        return [build(item, inner[1], f"{path}[{i}]", problems) for i, item in enumerate(value)]
    # the SDK writes dict(str, T); the Kubernetes client Dict[str, T]
    if (inner := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", kind)) is not None:
        if not isinstance(value, dict):
            problems.append(f"{path}: a map expected, got {type(value).__name__}")
            return None
        item_kind = inner[1] or inner[2]
        return {k: build(v, item_kind, f"{path}.{k}", problems) for k, v in value.items()}
    if kind in _PRIMITIVES:
        wrong_bool = isinstance(value, bool) and kind in ("int", "float")
        if not isinstance(value, _PRIMITIVES[kind]) or wrong_bool:
            problems.append(f"{path}: {kind} expected, got {type(value).__name__} {value!r}")
        return value
    model = _class(kind)
    if model is None:
        problems.append(f"{path}: the SDK has no type {kind}")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path}: an object ({kind}) expected, got {type(value).__name__}")
        return None
    attributes = {json_key: attr for attr, json_key in model.attribute_map.items()}
    fields = {}
    for key, item in value.items():
        if key not in attributes:
            problems.append(f"{path}.{key}: unknown field (not in {kind})")
            continue
        attr = attributes[key]
        fields[attr] = build(item, model.openapi_types[attr], f"{path}.{key}", problems)
    try:
        return model(**fields)
    except (ValueError, TypeError) as error:
        problems.append(f"{path}: {kind}: {error}")
        return None


def validate(objects: list[dict[str, Any]]) -> dict[str, Any]:
    problems: list[str] = []
    checked = 0
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if not str(key[0]).startswith("serving.kserve.io/"):
            continue
        name = f"{key[1]}/{obj.get('metadata', {}).get('name')}"
        if key not in KINDS:
            problems.append(f"{name}: no SDK type for {key}")
            continue
        build(obj, KINDS[key], name, problems)
        checked += 1
    versions = {name: importlib.metadata.version(name) for name in ("kserve", "kubernetes")}
    return {"versions": versions, "checked": checked, "problems": problems}


if __name__ == "__main__":
    print(json.dumps(validate(json.load(sys.stdin))))
