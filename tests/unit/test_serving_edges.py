"""Edges of the gateway's wire contract (ballast/serving.py) that a mutation-testing pass found
unchecked (2026-11-29): field bounds taken inclusively, the lease at its exact expiry, what
each consistency rule refuses and accepts, and If-Match over an expired trial."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from ballast.serving import (
    Deployment,
    PredictRequest,
    VersionSpec,
    deployment_etag,
    if_match_header,
    precondition_holds,
)


def spec(v: str, path: str | None = None) -> VersionSpec:
    return VersionSpec(version=v, artifact_path=path or f"/a/{v}.onnx", sha256=v * 64)


CH, CA, SH = spec("1"), spec("2"), spec("3")


def dep(**kw: Any) -> Deployment:
    return Deployment(model="m", **kw)


# -- field bounds --------------------------------------------------------------------------------


def test_canary_weight_bounds_are_inclusive() -> None:
    assert dep(champion=CH, canary=CA, canary_weight=0).canary_weight == 0
    assert dep(champion=CH, canary=CA, canary_weight=100).canary_weight == 100
    for bad in (-1, 101):
        with pytest.raises(ValidationError):
            dep(champion=CH, canary=CA, canary_weight=bad)


def test_shadow_fraction_bounds_are_inclusive() -> None:
    assert dep(champion=CH, shadow=SH, shadow_fraction=0.0).shadow_fraction == 0.0
    assert dep(champion=CH, shadow=SH, shadow_fraction=1.0).shadow_fraction == 1.0
    for bad in (-0.01, 1.01):
        with pytest.raises(ValidationError):
            dep(champion=CH, shadow=SH, shadow_fraction=bad)


def test_a_lease_is_a_finite_positive_time() -> None:
    assert (
        dep(champion=CH, canary=CA, canary_weight=5, lease_expires_at=0.5).lease_expires_at == 0.5
    )
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValidationError):
            dep(champion=CH, canary=CA, canary_weight=5, lease_expires_at=bad)


def test_an_artifact_path_may_be_one_character_but_not_empty() -> None:
    assert spec("1", "x").artifact_path == "x"
    with pytest.raises(ValidationError):
        VersionSpec(version="1", artifact_path="", sha256="1" * 64)


def test_specs_and_deployments_are_frozen_and_hashable() -> None:
    # Frozen pydantic models hash by value; a mutable one would not hash at all.
    assert hash(spec("1")) == hash(spec("1"))
    assert len({dep(champion=CH), dep(champion=spec("1"))}) == 1
    with pytest.raises(ValidationError):
        CH.version = "9"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        dep(champion=CH).canary_weight = 5  # type: ignore[misc]


def test_predict_request_takes_1_to_4096_rows() -> None:
    assert len(PredictRequest(instances=[[1.0]]).instances) == 1
    assert len(PredictRequest(instances=[[1.0]] * 4096).instances) == 4096
    for bad in ([], [[1.0]] * 4097):
        with pytest.raises(ValidationError):
            PredictRequest(instances=bad)


# -- consistency rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"champion": CH, "canary_weight": 5}, "canary_weight must be 0"),
        ({"canary": CA, "canary_weight": 99}, "canary must take 100%"),
        ({"champion": CH, "canary": spec("1", "/b"), "canary_weight": 5}, "different versions"),
        ({"champion": CH, "shadow_fraction": 0.5}, "shadow_fraction must be 0"),
        ({"shadow": SH, "shadow_fraction": 0.5}, "needs a champion or canary"),
        ({"champion": CH, "shadow": spec("1", "/b")}, "does not serve traffic"),
        (
            {"champion": CH, "canary": CA, "canary_weight": 5, "shadow": spec("2", "/b")},
            "does not serve traffic",
        ),
        ({"champion": CH, "lease_expires_at": 10.0}, "can hold a lease"),
        ({"champion": CH, "shadow": SH, "key_salt": "ab"}, "can hold a key_salt"),
    ],
    ids=[
        "weight-without-canary",
        "canary-alone-below-100",
        "canary-is-champion",
        "fraction-without-shadow",
        "shadow-alone",
        "shadow-is-champion",
        "shadow-is-canary",
        "lease-without-trial",
        "salt-without-canary",
    ],
)
def test_inconsistent_deployments_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        dep(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"champion": CH},
        {"canary": CA, "canary_weight": 100},
        {"champion": CH, "canary": CA},  # a canary at weight 0 (before its first step)
        {"champion": CH, "canary": CA, "canary_weight": 100},
        {"champion": CH, "shadow": SH},
        {"canary": CA, "canary_weight": 100, "shadow": SH, "shadow_fraction": 0.5},
        {"champion": CH, "shadow": SH, "shadow_fraction": 0.25, "lease_expires_at": 10.0},
        {"champion": CH, "canary": CA, "canary_weight": 5, "lease_expires_at": 10.0},
        {"champion": CH, "canary": CA, "canary_weight": 5, "key_salt": "0f"},
    ],
    ids=[
        "empty",
        "champion",
        "first-release",
        "canary-at-0",
        "canary-at-100",
        "shadow",
        "shadow-of-a-lone-canary",
        "leased-shadow",
        "leased-canary",
        "salted-canary",
    ],
)
def test_consistent_deployments_are_accepted(kw: dict[str, Any]) -> None:
    assert dep(**kw).model_dump(exclude_defaults=True) == {
        "model": "m",
        **{
            k: (v.model_dump(exclude_defaults=True) if isinstance(v, VersionSpec) else v)
            for k, v in kw.items()
            if v
        },
    }


# -- trials and leases ---------------------------------------------------------------------------


def test_has_trial() -> None:
    assert dep(champion=CH).has_trial() is False
    assert dep(champion=CH, canary=CA).has_trial() is True
    assert dep(champion=CH, shadow=SH).has_trial() is True


def test_a_lease_expires_at_its_exact_time() -> None:
    d = dep(champion=CH, canary=CA, canary_weight=5, lease_expires_at=100.0)
    assert d.lease_expired(99.999) is False
    assert d.lease_expired(100.0) is True
    assert dep(champion=CH, canary=CA, canary_weight=5).lease_expired(1e12) is False


def test_without_trial_keeps_the_champion_alone() -> None:
    d = dep(champion=CH, canary=CA, canary_weight=5, shadow=SH, lease_expires_at=10.0)
    assert d.without_trial() == dep(champion=CH)
    assert d.versions() == (CH, CA, SH)
    assert dep().versions() == ()


# -- content, fingerprints and etags -------------------------------------------------------------


def test_same_as_ignores_paths_but_not_versions() -> None:
    a = dep(champion=CH, canary=CA, canary_weight=5)
    moved = dep(champion=spec("1", "/elsewhere/1.onnx"), canary=CA, canary_weight=5)
    assert a.same_as(moved) is True
    assert a.fingerprint() == moved.fingerprint()
    assert a.same_as(dep(champion=CH, canary=CA, canary_weight=6)) is False
    assert a.same_as(None) is False
    assert a.content().champion == CH.model_copy(update={"artifact_path": "sha256:" + "1" * 64})
    assert a.content().shadow is None


def test_etags_are_16_hex_digits_or_none() -> None:
    tag = deployment_etag(dep(champion=CH))
    assert len(tag) == 16
    assert int(tag, 16) >= 0
    assert deployment_etag(None) == "none"
    assert if_match_header([None, dep(champion=CH)]) == f'"none", "{tag}"'


def test_if_match_sees_an_expired_trial_as_its_champion_from_its_exact_expiry() -> None:
    trial = dep(champion=CH, canary=CA, canary_weight=5, lease_expires_at=100.0)
    alone = frozenset({deployment_etag(dep(champion=CH))})
    assert precondition_holds(alone, trial, 99.0) is False
    assert precondition_holds(alone, trial, 100.0) is True
    # The trial's own tag stops matching once its lease ran out.
    own = frozenset({deployment_etag(trial)})
    assert precondition_holds(own, trial, 99.0) is True
    assert precondition_holds(own, trial, 100.0) is False


def test_if_match_star_and_nothing_deployed() -> None:
    assert precondition_holds(frozenset({"*"}), dep(champion=CH), 0.0) is True
    assert precondition_holds(frozenset({"none"}), None, 0.0) is True
    assert precondition_holds(frozenset({"none"}), dep(champion=CH), 0.0) is False
    # A trial without a lease never expires into its champion.
    unleased = dep(champion=CH, canary=CA, canary_weight=5)
    assert (
        precondition_holds(frozenset({deployment_etag(dep(champion=CH))}), unleased, 1e12) is False
    )
