"""``verify_version``: what binds a registered version's tags to its signed manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from ballast.errors import IntegrityError
from ballast.hashing import sha256_file
from ballast.manifest import build_manifest, sign_manifest
from ballast.release import (
    TAG_ARTIFACT,
    TAG_ARTIFACT_SHA,
    TAG_BACKEND,
    TAG_CONTENT_KEY,
    verify_version,
)

KEY = "ab" * 32


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A folder signed for model ``m`` (content key KEY) and the tags a release gives it."""
    folder = tmp_path / "v3"
    folder.mkdir()
    (folder / "model.ort.onnx").write_bytes(b"onnx" * 100)
    key_path = tmp_path / "signing.key"
    manifest = build_manifest(
        folder,
        model_name="m",
        dataset_sha256="cd" * 32,
        backend="onnxruntime",
        precision="fp32",
        content_key=KEY,
    )
    sign_manifest(manifest, key_path).write(folder)
    tags = {
        TAG_ARTIFACT: "model.ort.onnx",
        TAG_ARTIFACT_SHA: sha256_file(folder / "model.ort.onnx"),
        TAG_BACKEND: "onnxruntime",
        TAG_CONTENT_KEY: KEY,
    }
    return folder, key_path, tags


def test_a_version_whose_tags_match_its_signed_manifest_verifies(
    signed: tuple[Path, Path, dict[str, str]],
) -> None:
    folder, key_path, tags = signed
    verified = verify_version(folder, tags, "3", key_path, model="m")
    assert verified.path == str(folder / "model.ort.onnx")
    assert (verified.sha256, verified.backend) == (tags[TAG_ARTIFACT_SHA], "onnxruntime")
    # The backend comes from what was signed; a version from before the tag existed has none.
    without = {k: v for k, v in tags.items() if k != TAG_BACKEND}
    assert verify_version(folder, without, "3", key_path, model="m").backend == "onnxruntime"


def test_another_models_signed_files_do_not_pass_as_this_model(
    signed: tuple[Path, Path, dict[str, str]],
) -> None:
    folder, key_path, tags = signed
    with pytest.raises(IntegrityError, match="signed manifest is for model 'm', not 'fraud'"):
        verify_version(folder, tags, "3", key_path, model="fraud")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({TAG_CONTENT_KEY: "ef" * 32}, "tag ballast.content_key does not match"),
        ({TAG_CONTENT_KEY: ""}, "tag ballast.content_key does not match"),
        ({TAG_BACKEND: "tensorrt"}, "tag ballast.backend='tensorrt' but its signed manifest"),
        ({TAG_ARTIFACT_SHA: "00" * 32}, "is not in its signed manifest with the tagged sha256"),
        ({TAG_ARTIFACT: "state_dict.pt"}, "is not in its signed manifest"),
    ],
    ids=["other-content-key", "no-content-key", "retagged-backend", "other-sha", "other-file"],
)
def test_tags_that_disagree_with_the_signed_manifest_are_refused(
    signed: tuple[Path, Path, dict[str, str]], change: dict[str, str], match: str
) -> None:
    folder, key_path, tags = signed
    with pytest.raises(IntegrityError, match=match):
        verify_version(folder, {**tags, **change}, "3", key_path, model="m")
