"""Several models at once (``VIT_MODELS``): the setting, the names a request gives, admission by
the model asked, the plan made once for all the weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import prometheus_client
import pytest
from pydantic import ValidationError

from service.backend import Models
from service.errors import ApiError
from service.metrics import create_metrics
from service.runtime import plan as plan_module
from service.runtime.runfolder import model_folder
from service.runtime.settings import Settings
from service.web.admission import Admission, model_asked


def test_models_are_named_sources_the_first_the_default() -> None:
    settings = Settings(models=" a=local-dir:/x , b.2=hf-hub:org/name,")
    assert settings.model_sources == [("a", "local-dir:/x"), ("b.2", "hf-hub:org/name")]
    # VIT_MODEL alone: one model, named by its checkpoint.
    assert Settings(model="local-dir:/y").model_sources == [("", "local-dir:/y")]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("a=x,a=y", "given twice"),
        ("a", "not NAME=SOURCE"),
        ("a=", "not NAME=SOURCE"),
        ("=x", "not a model name"),
        ("-a=x", "not a model name"),
        ("a/b=x", "not a model name"),
    ],
)
def test_a_bad_models_setting_is_refused_naming_the_entry(value: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        Settings(models=value)


def test_several_models_need_this_servers_own_model_processes() -> None:
    with pytest.raises(ValidationError, match="serves one model"):
        Settings(models="a=x,b=y", topology="split", model_endpoints="tcp://m:5555")
    Settings(models="a=x", topology="split", model_endpoints="tcp://m:5555")  # one is fine


def test_the_name_a_request_gives() -> None:
    headers = [(b"x-model", b"from-header")]
    assert model_asked(b"/classify?model=b&top_k=3", headers) == "b"
    assert model_asked(b"/classify?top_k=3", headers) == "from-header"
    assert model_asked(b"/classify", []) is None
    assert model_asked(b"/v2/models/b%2Dx/versions/2/infer", headers) == "b-x"


class _Backend:
    """What ``Models`` and admission ask of a backend."""

    def __init__(self, name: str, full: bool = False) -> None:
        self.name, self.queue_full, self.ready = name, full, True

    @property
    def info(self) -> Any:
        if not self.name:
            raise ApiError(503, "not_ready", "loading")
        return SimpleNamespace(name=self.name)

    def repository(self) -> list[dict[str, Any]]:
        return [{"name": self.info.name, "version": "1", "traffic_percent": 100}]


def test_a_full_queue_refuses_only_its_own_models_requests() -> None:
    models = Models([("a", _Backend("a", full=True)), ("b", _Backend("b"))])  # type: ignore[list-item]
    metrics = create_metrics(4, prometheus_client.CollectorRegistry())
    admission = Admission(8, models, metrics)
    gate = admission.gate
    refused = gate(b"POST", b"/classify?model=a", {"headers": []})
    assert refused is not None and b"queue is full" in refused
    assert gate(b"POST", b"/classify", {"headers": []}) is not None  # the default: a
    scope: dict[str, Any] = {"headers": [(b"x-model", b"b")]}
    assert gate(b"POST", b"/classify", scope) is None and scope["vit.reserved"]
    assert gate(b"POST", b"/v2/models/b/infer", {"headers": []}) is None
    # A name not served is let in, to be refused by its route in its own words.
    assert gate(b"POST", b"/classify?model=zzz", {"headers": []}) is None
    assert admission.active == 3


def test_names_resolve_and_an_unknown_one_is_a_404_listing_the_served() -> None:
    a, b = _Backend("a"), _Backend("b")
    models = Models([("a", a), ("b", b)])  # type: ignore[list-item]
    assert models.get() is a and models.get("") is a and models.get("b") is b
    with pytest.raises(ApiError) as caught:
        models.get("c")
    assert caught.value.status == 404 and caught.value.code == "unknown_model"
    assert "'a', 'b'" in caught.value.message
    # One model named by its checkpoint: known by that name once loaded, 503 before.
    loading = _Backend("")
    one = Models([("", loading)])  # type: ignore[list-item]
    with pytest.raises(ApiError) as caught:
        one.get("vit")
    assert caught.value.status == 503
    assert one.listing()[0]["state"] == "loading"
    loading.name = "vit"
    assert one.get("vit") is loading and one.names() == ["vit"]


def test_the_plan_is_made_once_for_every_models_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {"x": 300 * 2**20, "y": 200 * 2**20, "z": 10}
    monkeypatch.setattr(plan_module, "weight_bytes", sizes.get)
    assert plan_module._all_weight_bytes(Settings(models="a=x,b=z")) == sizes["x"] + sizes["z"]
    # Each alone is under the replicas limit; together they are not: one copy, split.
    together = plan_module._all_weight_bytes(Settings(models="a=x,b=y"))
    assert together is not None and together > plan_module.SMALL_MODEL_BYTES
    plan = plan_module.make_plan(
        Settings(device="cpu"), cpus=4, cuda_devices=0, model_bytes=together
    )
    assert plan.topology == "split"
    assert plan_module._all_weight_bytes(Settings(models="a=x,b=unknown")) is None


def test_each_model_past_the_first_keeps_its_files_in_a_folder_of_its_own(tmp_path: Path) -> None:
    assert model_folder(tmp_path, 0) == tmp_path
    assert model_folder(None, 0) is None
    own = model_folder(tmp_path, 2)
    assert own == tmp_path / "model-2" and own.is_dir()


def test_each_model_runs_under_its_own_source_and_only_the_first_takes_the_canary() -> None:
    settings = Settings(models="a=local-dir:/x,b=local-dir:/y", canary_model="local-dir:/c")
    (first, a), (second, b) = settings.per_model()
    assert (first, a.model, a.canary_model) == ("a", "local-dir:/x", "local-dir:/c")
    assert (second, b.model, b.canary_model) == ("b", "local-dir:/y", "")
    assert a.max_batch_size == b.max_batch_size == settings.max_batch_size
