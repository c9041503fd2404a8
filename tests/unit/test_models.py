"""Model specs: typed hyperparameters, both factories' contract ([batch, features] → logits), the
digits dataset and its spec, and an import closure that works without pydantic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ballast.datasets_extra import bundled_dataset, digits_csv_bytes, digits_frame, digits_spec
from ballast.errors import ConfigError, TrainingError
from ballast.models import (
    MODELS,
    SMALL_CNN,
    TABULAR_MLP,
    CNNParams,
    MLPParams,
    get_spec,
    params_as_dict,
)
from tests.child import run_python


def build(name: str, n_features: int, n_classes: int = 3, **overrides: object) -> torch.nn.Module:
    spec = get_spec(name)
    return spec.build(
        spec.params(overrides),
        n_features=n_features,
        n_classes=n_classes,
        mean=np.full(n_features, 2.0),
        std=np.full(n_features, 4.0),
    )


def test_registry_has_the_tabular_mlp_and_the_small_cnn_with_their_datasets() -> None:
    assert set(MODELS) >= {TABULAR_MLP, SMALL_CNN}
    assert get_spec(TABULAR_MLP).default_dataset == "breast-cancer"
    assert get_spec(SMALL_CNN).default_dataset == "digits"


def test_unknown_model_is_a_training_error_listing_the_known_ones() -> None:
    with pytest.raises(TrainingError, match=r"unknown model 'resnet'.*small-cnn.*tabular-mlp"):
        get_spec("resnet")


def test_params_apply_overrides_and_coerce_text_to_integers() -> None:
    p = get_spec(TABULAR_MLP).params({"hidden": "32", "layers": 3})
    assert p == MLPParams(hidden=32, layers=3)
    assert get_spec(TABULAR_MLP).params({"hidden": " +16 "}) == MLPParams(hidden=16)
    assert params_as_dict(get_spec(SMALL_CNN).params()) == {"channels": 16, "hidden": 64, "side": 8}


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        (TABULAR_MLP, {"width": 3}, r"no hyperparameter\(s\) \['width'\]"),
        (TABULAR_MLP, {"hidden": 0}, r"hidden must be a positive integer"),
        (TABULAR_MLP, {"hidden": 2.5}, r"hidden must be an integer"),
        (TABULAR_MLP, {"layers": True}, r"layers must be an integer"),
        (SMALL_CNN, {"side": 7}, r"side must be even"),
        (SMALL_CNN, {"channels": "many"}, r"channels must be an integer"),
        (TABULAR_MLP, {"hidden": "--5"}, r"hidden must be an integer"),
        (TABULAR_MLP, {"hidden": "²"}, r"hidden must be an integer"),
        (TABULAR_MLP, {"layers": "٣"}, r"layers must be an integer"),
    ],
)
def test_bad_hyperparameters_are_refused_with_the_field_named(
    name: str, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(TrainingError, match=message):
        get_spec(name).params(overrides)


@pytest.mark.parametrize(("name", "n_features"), [(TABULAR_MLP, 30), (SMALL_CNN, 64)])
def test_models_map_flat_rows_to_logits_at_any_batch_size(name: str, n_features: int) -> None:
    torch.manual_seed(0)
    model = build(name, n_features, n_classes=10).eval()
    for batch in (1, 5, 64):
        out = model(torch.randn(batch, n_features))
        assert out.shape == (batch, 10), f"{name} batch {batch}: {tuple(out.shape)}"


def test_normalisation_is_baked_in_as_buffers_with_constant_features_scaled_by_one() -> None:
    spec = get_spec(SMALL_CNN)
    std = np.ones(64)
    std[:8] = 0.0  # an always-blank image row
    model = spec.build(spec.params(), n_features=64, n_classes=10, mean=np.zeros(64), std=std)
    buffers = dict(model.named_buffers())
    assert set(buffers) == {"mean", "std"}
    assert torch.equal(buffers["std"][:8], torch.ones(8)), "zero std must become 1"
    assert torch.isfinite(model(torch.zeros(2, 64))).all()


def test_same_seed_builds_the_same_initial_weights() -> None:
    torch.manual_seed(5)
    a = build(TABULAR_MLP, 30)
    torch.manual_seed(5)
    b = build(TABULAR_MLP, 30)
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), name


def test_mlp_depth_follows_layers() -> None:
    model = build(TABULAR_MLP, 30, hidden=8, layers=4)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [8, 8, 8, 8, 3]


def test_cnn_refuses_rows_that_are_not_side_by_side_pixels() -> None:
    with pytest.raises(TrainingError, match=r"8×8 = 64 pixel features per row, the dataset has 30"):
        build(SMALL_CNN, 30)


def test_build_refuses_mismatched_statistics_and_params_of_another_model() -> None:
    spec = get_spec(TABULAR_MLP)
    with pytest.raises(TrainingError, match="normalisation statistics must have 30 entries"):
        spec.build(spec.params(), n_features=30, n_classes=2, mean=np.zeros(29), std=np.ones(29))
    with pytest.raises(TrainingError, match="takes MLPParams, got CNNParams"):
        spec.build(CNNParams(), n_features=30, n_classes=2, mean=np.zeros(30), std=np.ones(30))
    with pytest.raises(TrainingError, match="at least 2 classes"):
        spec.build(spec.params(), n_features=30, n_classes=1, mean=np.zeros(30), std=np.ones(30))


def test_digits_dataset_is_1797_rows_of_64_pixels_and_10_classes() -> None:
    ds = bundled_dataset("digits")
    assert ds.features.shape == (1797, 64) and ds.features.dtype == np.float32
    assert sorted(np.unique(ds.labels).tolist()) == list(range(10))
    assert ds.features.min() >= 0 and ds.features.max() <= 16
    assert ds.feature_names[0] == "pixel_0_0" and len(ds.sha256) == 64


def test_digits_spec_admits_the_real_digits_and_bounds_what_breaks() -> None:
    # The spec's own numbers against the data (running the Great Expectations suite over 64
    # columns takes about 15 s on this box, so the suite itself is exercised in test_validation).
    spec = digits_spec()
    frame = digits_frame()
    assert spec.features == tuple(frame.columns[:-1]) and spec.label == "label"
    assert set(frame["label"].unique()) == set(spec.classes) == set(range(10))
    lo, hi = spec.label_share
    assert lo < frame["label"].mean() < hi
    for col in spec.features:
        low, high = spec.ranges[col]
        assert low <= frame[col].min() and frame[col].max() <= high, col
    assert spec.ranges["pixel_0_0"] == (0.0, 16.0), "a value like 99 must fall outside"
    assert frame.duplicated().mean() <= spec.max_duplicate_fraction
    assert spec.min_rows <= len(frame) <= spec.max_rows
    assert digits_csv_bytes().startswith(b"pixel_0_0,")


def test_unknown_bundled_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown bundled dataset 'mnist'"):
        bundled_dataset("mnist")  # type: ignore[arg-type]  # the wrong name is the point


def test_models_and_training_import_without_pydantic_prefect_or_mlflow() -> None:
    # The GPU machine has torch, numpy, pandas and scikit-learn only: benchmarks/gpu_check.py
    # depends on these modules importing there.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'pydantic', 'pydantic_settings', 'prefect', 'mlflow',"
        " 'great_expectations', 'cryptography'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ballast.models, ballast.training, ballast.checkpoint, ballast.datasets_extra\n"
        "import ballast.compile.aotinductor, ballast.compile.parity, ballast.runtime\n"
        "print('ok')\n"
    )
    out = run_python(code, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
