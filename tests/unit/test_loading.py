"""Model loading: every source kind round-trips; every refusal says what to do."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.model import loading
from service.model.loading import (
    ModelLoadError,
    load_model,
    parse_source,
    resolve_dtype,
)
from tests.conftest import REPO
from tests.utils import TINY_ARGS, make_tiny_dir, tiny_model

X = torch.rand(2, 3, 32, 32) * 2 - 1


def _same_outputs(reference: torch.nn.Module, loaded: torch.nn.Module) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(loaded(X), reference(X), rtol=1e-5, atol=1e-5)


# --- round trips ---------------------------------------------------------------------------


def test_local_dir_round_trip(tmp_path: Path) -> None:
    reference = make_tiny_dir(tmp_path / "m", label_names=[f"l{i}" for i in range(7)])
    loaded = load_model(f"local-dir:{tmp_path / 'm'}", device="cpu", dtype="float32")
    _same_outputs(reference, loaded.model)
    info = loaded.info
    assert info.name == "m"
    assert info.label_names == tuple(f"l{i}" for i in range(7))
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())


def _hf_cache(cache: Path, repo_id: str, source_dir: Path) -> None:
    """Lay out a Hugging Face cache entry exactly as hf_hub_download leaves one."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((source_dir / name).read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_hf_hub_round_trip_from_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reference = make_tiny_dir(tmp_path / "src")
    _hf_cache(tmp_path / "hf", "acme/tiny-vit", tmp_path / "src")
    loaded = load_model(
        "hf-hub:acme/tiny-vit", device="cpu", dtype="float32", cache_dir=tmp_path / "hf"
    )
    _same_outputs(reference, loaded.model)
    assert loaded.info.source == "hf-hub:acme/tiny-vit"
    assert loaded.info.name == "acme/tiny-vit"


def test_hf_hub_not_cached_offline_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        load_model("hf-hub:acme/absent", cache_dir=tmp_path / "hf")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_architecture_plus_file_round_trip(tmp_path: Path, suffix: str) -> None:
    reference = tiny_model(
        num_classes=1000, embed_dim=192, num_heads=3, depth=12, img_size=224, patch_size=16
    )
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_model(f"vit_tiny_patch16_224@{path}", device="cpu", dtype="float32")
    with torch.inference_mode():
        x = torch.rand(1, 3, 224, 224)
        torch.testing.assert_close(loaded.model(x), reference(x))
    # 1000 classes and no names given: ImageNet's.
    assert loaded.info.label_names[1].startswith("goldfish")
    assert loaded.info.num_classes == 1000


def test_bento_store_round_trip(tmp_path: Path) -> None:
    """import_model puts a model in the store; 'bento:NAME' serves the same weights."""
    make_tiny_dir(tmp_path / "m")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    imported = subprocess.run(
        [sys.executable, "-m", "models.import_model", f"local-dir:{tmp_path / 'm'}", "--name", "tiny"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    tag = imported.stdout.strip().splitlines()[-1]
    assert tag.startswith("tiny:")
    probe = (
        "import json, torch; from service.model.loading import load_model;"
        f"m = load_model('bento:{tag}', device='cpu', dtype='float32');"
        "torch.manual_seed(1); x = torch.rand(2, 3, 32, 32);"
        "print(json.dumps({'out': m.model(x).tolist(), 'labels': m.info.label_names}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    served = json.loads(result.stdout.strip().splitlines()[-1])
    direct = load_model(f"local-dir:{tmp_path / 'm'}", device="cpu", dtype="float32")
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(
            torch.tensor(served["out"]), direct.model(x), rtol=1e-5, atol=1e-5
        )
    assert served["labels"] == [f"class_{i}" for i in range(7)]
    # The stored folder is plain timm's format too.
    folder = next((tmp_path / "bentoml" / "models" / "tiny").glob("*/config.json")).parent
    import timm

    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    _same_outputs(direct.model, plain)


def test_bento_missing_tag_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    probe = "from service.model.loading import load_model; load_model('bento:nothing:here')"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "No model 'nothing:here' in the BentoML model store" in result.stderr


# --- the ViT family -----------------------------------------------------------------------

FAMILY = [
    # (architecture, overrides, prefix tokens, registers, position embedding kind)
    ("vit_tiny_patch16_224", {}, 1, 0, "learned"),
    ("deit_tiny_distilled_patch16_224", {}, 2, 0, "learned"),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "patch_size": 14}, 5, 4, "learned"),
    ("eva02_tiny_patch14_224", {"img_size": 28, "patch_size": 14}, 1, 0, "learned+rope"),
    ("beit_base_patch16_224", {}, 1, 0, "relative"),
]


@pytest.mark.parametrize(("arch", "overrides", "prefix", "registers", "pos_kind"), FAMILY)
def test_family_metadata(
    tmp_path: Path,
    arch: str,
    overrides: dict[str, int],
    prefix: int,
    registers: int,
    pos_kind: str,
) -> None:
    make_tiny_dir(tmp_path / "m", architecture=arch, **overrides)
    info = load_model(f"local-dir:{tmp_path / 'm'}", device="cpu", dtype="float32").info
    img, patch = overrides.get("img_size", 32), overrides.get("patch_size", 8)
    side = img // patch
    assert info.grid == (side, side)
    assert info.num_patches == side * side
    assert info.patch_dim == 3 * patch * patch
    assert info.embed_dim == TINY_ARGS["embed_dim"]
    assert info.depth == TINY_ARGS["depth"]
    assert info.num_heads == TINY_ARGS["num_heads"]
    assert info.num_prefix_tokens == prefix
    assert info.num_register_tokens == registers
    assert info.sequence_length == prefix + side * side
    assert info.position_embedding_kind == pos_kind


# --- refusals -----------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist: give the folder"):
        load_model(f"local-dir:{tmp_path / 'nope'}")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        load_model(f"local-dir:{tmp_path / 'm'}")


def test_config_without_architecture(tmp_path: Path) -> None:
    make_tiny_dir(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_classes": 7}))
    with pytest.raises(ModelLoadError, match="has no 'architecture'"):
        load_model(f"local-dir:{tmp_path / 'm'}")


def test_folder_with_only_a_pickle_is_refused(tmp_path: Path) -> None:
    make_tiny_dir(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors.*convert it to safetensors"):
        load_model(f"local-dir:{tmp_path / 'm'}")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated download
        lambda data: os.urandom(len(data)),  # not safetensors at all
        lambda data: b"",  # empty file
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_corrupt_safetensors(tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    make_tiny_dir(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(f"local-dir:{tmp_path / 'm'}")


def test_shape_mismatch(tmp_path: Path) -> None:
    make_tiny_dir(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_args"]["embed_dim"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match the architecture"):
        load_model(f"local-dir:{tmp_path / 'm'}")


def test_file_does_not_match_architecture(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError, match="does not match architecture 'vit_small_patch16_224'"):
        load_model(f"vit_small_patch16_224@{tmp_path / 'w.safetensors'}")


def test_non_vit_is_refused(tmp_path: Path) -> None:
    import timm

    resnet = timm.create_model("resnet10t", num_classes=3)
    save_file(
        {k: v.contiguous() for k, v in resnet.state_dict().items()}, str(tmp_path / "r.safetensors")
    )
    with pytest.raises(
        ModelLoadError, match=r"ResNet, which has no ViT patch embedding.*Supported: timm"
    ):
        load_model(f"resnet10t@{tmp_path / 'r.safetensors'}")


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"x": _Evil()}, handle)
    with pytest.raises(ModelLoadError, match="pickled code is refused"):
        load_model(f"vit_tiny_patch16_224@{path}")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("just-a-name", "Cannot tell what kind of model source"),
        ("not_a_model@/tmp/x.safetensors", "not a registered timm architecture"),
        ("vit_tiny_patch16_224@/definitely/missing.safetensors", "does not exist"),
        ("vit_tiny_patch16_224@/etc/hostname", "Unsupported checkpoint"),
    ],
)
def test_bad_sources(source: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(source)


def test_parse_source() -> None:
    assert parse_source("local-dir:/a/b") == ("local-dir", "/a/b", None)
    assert parse_source("hf-hub:timm/x") == ("hf-hub", "timm/x", None)
    assert parse_source("bento:vit:abc") == ("bento", "vit:abc", None)
    assert parse_source("vit_small_patch16_224@/w.safetensors") == (
        "file",
        "/w.safetensors",
        "vit_small_patch16_224",
    )


def test_cuda_requested_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model("local-dir:/nope", device="cuda")


def test_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    has_amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if has_amx else torch.float32)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_picks_bf16_on_amx_only_for_models_wide_enough(
    monkeypatch: pytest.MonkeyPatch, amx: bool
) -> None:
    monkeypatch.setattr(loading, "_cpu_has_amx", lambda: amx)
    cpu = torch.device("cpu")
    wide = torch.bfloat16 if amx else torch.float32
    assert resolve_dtype("auto", cpu, width=loading.AMX_MIN_WIDTH) == wide
    assert resolve_dtype("auto", cpu, width=384) == wide
    assert resolve_dtype("auto", cpu, width=64) == torch.float32  # the default model's width
    assert resolve_dtype("bfloat16", cpu, width=64) == torch.bfloat16  # asked for: given
    # The default model loads as float32 whatever the CPU.
    assert load_model(f"local-dir:{REPO / 'models' / 'vit-digits'}").info.dtype == "float32"
