"""Settings: environment parsing, validation, and the README table kept in step."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from service.runtime.settings import DEFAULT_MODEL, Settings
from tests.conftest import DEFAULT_MODEL_DIR, REPO


def test_defaults_serve_the_bundled_model() -> None:
    settings = Settings()
    assert settings.model == DEFAULT_MODEL == f"local-dir:{DEFAULT_MODEL_DIR}"
    assert (DEFAULT_MODEL_DIR / "config.json").is_file()
    assert settings.device == "auto" and settings.dtype == "auto"


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_MODEL", "hf-hub:acme/x")
    monkeypatch.setenv("VIT_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("VIT_DEVICE", "cuda:1")
    monkeypatch.setenv("VIT_ACCESS_LOG", "false")
    settings = Settings()
    assert settings.model == "hf-hub:acme/x"
    assert settings.max_batch_size == 8
    assert settings.device == "cuda:1"
    assert settings.access_log is False


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("VIT_DEVICE", "gpu", "VIT_DEVICE must be"),
        ("VIT_DTYPE", "int8", "dtype"),
        ("VIT_MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("VIT_MAX_QUEUE_IMAGES", "4", "must be at least"),
        ("VIT_DEFAULT_ATTENTION", "all", "default_attention"),
        ("VIT_CANARY_PERCENT", "100", "canary_percent"),
        ("VIT_CACHE_BYTES", "-1", "cache_bytes"),
    ],
)
def test_invalid_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `(VIT_[A-Z_]+)` \|", readme, flags=re.MULTILINE))
    fields = {f"VIT_{name.upper()}" for name in Settings.model_fields}
    assert documented == fields


def test_a_canary_at_start_needs_the_replicas_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_CANARY_MODEL", "local-dir:/v2")
    monkeypatch.setenv("VIT_TOPOLOGY", "split")
    with pytest.raises(ValidationError, match="VIT_CANARY_MODEL needs the replicas topology"):
        Settings()


def test_the_admin_token_is_kept_out_of_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_ADMIN_TOKEN", "hunter2-secret")
    settings = Settings()
    assert settings.admin_token == "hunter2-secret"
    assert "hunter2-secret" not in repr(settings) and "hunter2-secret" not in str(settings)
