"""Routing and loading edges of the gateway's versions a mutation-testing pass found unchecked
(2026-11-29): exact sticky shares and monotone weights, one-version deployments, the key salt,
what a load refuses and with which status, the private copy the runtime loads, warm-up shapes."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest

from ballast.serving import Backend, Deployment, VersionSpec
from infra.gateway.versions import (
    DeploymentRefusedError,
    Live,
    LoadedVersion,
    Slot,
    load_version,
)

DATA = b"model bytes \x00\x01\x02" * 100


def spec(
    v: str, path: str | None = None, sha: str = "0" * 64, backend: Backend = "onnxruntime"
) -> VersionSpec:
    return VersionSpec(version=v, artifact_path=path or f"/a/{v}.onnx", sha256=sha, backend=backend)


class FakePredictor:
    """Answers zeros ``[rows, classes]`` (or ``out`` as given); records the batches it saw."""

    backend = "onnxruntime"

    def __init__(
        self,
        n_features: object = 3,
        classes: int = 3,
        out: object = None,
        max_rows: int | None = None,
        bad_rows_at: int | None = None,
    ) -> None:
        self.n_features = n_features
        self.classes = classes
        self.out = out
        self.max_rows = max_rows
        self.bad_rows_at = bad_rows_at
        self.seen: list[tuple[tuple[int, ...], str, float]] = []

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.seen.append((x.shape, str(x.dtype), float(np.abs(x).sum())))
        rows = x.shape[0]
        if self.max_rows is not None and rows > self.max_rows:
            raise RuntimeError(f"fixed batch of {self.max_rows}")
        if self.out is not None:
            return np.asarray(self.out)
        if rows == self.bad_rows_at:
            return np.zeros((rows, self.classes + 1), np.float32)
        return np.zeros((rows, self.classes), np.float32)


def loaded(v: str) -> LoadedVersion:
    return LoadedVersion(
        spec=spec(v),
        predictor=FakePredictor(),
        n_features=3,
        fault_rng=random.Random(0),
        window=4,
        n_classes=3,
    )


def live(
    champion: str | None = "1",
    canary: str | None = "2",
    weight: int = 0,
    salt: str | None = None,
    shadow: str | None = None,
) -> Live:
    ch = None if champion is None else spec(champion)
    ca = None if canary is None else spec(canary)
    sh = None if shadow is None else spec(shadow)
    dep = Deployment(
        model="m",
        champion=ch,
        canary=ca,
        canary_weight=weight,
        key_salt=salt,
        shadow=sh,
        shadow_fraction=0.5 if sh else 0.0,
    )
    return Live(
        dep,
        None if ch is None else Slot("champion", ch, loaded(ch.version)),
        None if ca is None else Slot("canary", ca, loaded(ca.version)),
        None if sh is None else Slot("shadow", sh, loaded(sh.version)),
    )


# -- routing -----------------------------------------------------------------------------------


def test_10000_consecutive_key_ids_split_exactly_and_a_higher_weight_only_adds_keys() -> None:
    base = 0x8000_0000_0000_0000 + 12_345
    ids = [f"{base + i:016x}" for i in range(10_000)]
    rng = random.Random(0)
    before: set[str] = set()
    for weight in (1, 5, 10, 37, 50, 99):
        lv = live(weight=weight)
        on_canary = {k for k in ids if lv.route(k, rng) is lv.canary}
        assert len(on_canary) == weight * 100  # exact to 0.01 %, no sampling error
        assert before <= on_canary  # no key flaps back to the champion
        before = on_canary


def test_a_keyed_request_goes_where_its_key_goes_whatever_the_random_draw() -> None:
    lv = live(weight=30)
    for i in range(200):
        kid = lv.key_id(f"user-{i}")
        got = {lv.route(kid, random.Random(seed)) for seed in range(5)}
        assert len(got) == 1
    keyed = sum(lv.route(lv.key_id(f"u{i}"), random.Random(i)) is lv.canary for i in range(4000))
    assert 1000 <= keyed <= 1400  # ~1200 expected


@pytest.mark.parametrize("weight", [0, 100])
def test_weights_0_and_100_send_everything_to_one_side(weight: int) -> None:
    lv = live(weight=weight)
    want = lv.canary if weight == 100 else lv.champion
    rng = random.Random(1)
    assert all(lv.route(None, rng) is want for _ in range(2000))
    assert all(lv.route(lv.key_id(f"k{i}"), rng) is want for i in range(2000))


def test_unkeyed_split_follows_the_weight() -> None:
    lv = live(weight=25)
    rng = random.Random(7)
    n = sum(lv.route(None, rng) is lv.canary for _ in range(8000))
    assert 1700 <= n <= 2300  # ~2000 expected


def test_one_version_deployments_route_to_it_and_nothing_routes_to_none() -> None:
    rng = random.Random(3)
    only_champion = live(canary=None, shadow="9")
    assert only_champion.slots == (only_champion.champion,)
    assert only_champion.all_slots == (only_champion.champion, only_champion.shadow)
    only_canary = live(champion=None, weight=100)
    assert only_canary.slots == (only_canary.canary,)
    for lv, want in ((only_champion, only_champion.champion), (only_canary, only_canary.canary)):
        assert want is not None
        assert all(lv.route(None, rng) is want for _ in range(500))
        assert all(lv.route(lv.key_id(f"k{i}"), rng) is want for i in range(500))
    nothing = live(champion=None, canary=None)
    assert nothing.slots == () and nothing.all_slots == ()
    assert nothing.route(None, rng) is None


def test_key_id_salt_is_the_deployment_salt_else_the_canary_else_empty() -> None:
    def h(salt: bytes, key: str) -> str:
        return hashlib.blake2b(salt + b"\0" + key.encode("latin-1"), digest_size=8).hexdigest()

    assert live(weight=10, salt="abc123").key_id("user-1") == h(b"abc123", "user-1")
    assert live(canary=None).key_id("user-1") == h(b"", "user-1")
    kid = live(weight=10).key_id("\xe9t\xe9")
    assert kid == h(b"2", "\xe9t\xe9") and len(kid) == 16


# -- loading -----------------------------------------------------------------------------------


def artefact(tmp_path: Path, name: str = "m.onnx", data: bytes = DATA) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def load(
    s: VersionSpec, predictor: FakePredictor, *, seed: int = 0, warm_batch: int | None = None
) -> LoadedVersion:
    def loader(path: Path, backend: str, threads: int) -> FakePredictor:
        return predictor

    if warm_batch is None:
        return load_version(s, loader=loader, intra_op_threads=1, seed=seed, window=4)
    return load_version(
        s, loader=loader, intra_op_threads=1, seed=seed, window=4, warm_batch=warm_batch
    )


def good_spec(tmp_path: Path, v: str = "1", backend: Backend = "onnxruntime") -> VersionSpec:
    p = artefact(tmp_path, f"{v}.bin")
    return spec(v, str(p), hashlib.sha256(DATA).hexdigest(), backend)


def refused(s: VersionSpec, predictor: FakePredictor, **kw: int) -> DeploymentRefusedError:
    with pytest.raises(DeploymentRefusedError) as exc:
        load(s, predictor, **kw)
    return exc.value


def test_a_good_load_is_warmed_with_one_zero_row_and_starts_with_clean_counters(
    tmp_path: Path,
) -> None:
    s = good_spec(tmp_path)
    pred = FakePredictor(n_features=5, classes=3)
    v = load(s, pred)
    assert pred.seen == [((1, 5), "float32", 0.0)]  # default warm_batch: no batch warm-up
    assert (v.spec, v.version, v.n_features, v.n_classes) == (s, "1", 5, 3)
    assert (v.inflight, v.requests, v.errors, v.client_errors) == (0, 0, 0, 0)
    assert (v.mirrored, v.shadow_rows, v.shadow_agree, v.shadow_failed) == (0, 0, 0, 0)
    assert v.classes == {} and v.retired is False and v.batcher is None
    assert v.latency_ms() == {"p50": None, "p95": None, "p99": None}


def test_a_model_with_a_fixed_batch_of_one_loads_by_default(tmp_path: Path) -> None:
    assert load(good_spec(tmp_path), FakePredictor(max_rows=1)).n_classes == 3


def test_the_runtime_loads_a_private_0600_copy_of_the_hashed_bytes(tmp_path: Path) -> None:
    s = good_spec(tmp_path, backend="tensorrt")
    sidecar = Path(s.artifact_path + ".json")
    sidecar.write_text('{"sm": "9.0"}')
    seen: dict[str, object] = {}

    def loader(path: Path, backend: str, threads: int) -> FakePredictor:
        seen.update(
            path=path,
            backend=backend,
            threads=threads,
            data=path.read_bytes(),
            mode=stat.S_IMODE(os.stat(path).st_mode),
            sidecar=Path(str(path) + ".json").read_text(),
        )
        return FakePredictor()

    load_version(s, loader=loader, intra_op_threads=3, seed=0, window=4)
    assert seen["path"] != Path(s.artifact_path)
    assert (seen["backend"], seen["threads"], seen["data"]) == ("tensorrt", 3, DATA)
    assert seen["mode"] == 0o600
    assert seen["sidecar"] == '{"sm": "9.0"}'
    assert not Path(str(seen["path"])).exists()  # the copy goes once loaded


def test_a_missing_or_unreadable_artefact_is_refused_422(tmp_path: Path) -> None:
    pred = FakePredictor()
    err = refused(spec("1", str(tmp_path / "nope.onnx")), pred)
    assert err.status == 422 and "not found" in err.message
    err = refused(spec("1", str(tmp_path / ("x" * 300))), pred)  # ENAMETOOLONG
    assert err.status == 422 and "cannot read artefact" in err.message
    if Path("/proc/self/mem").is_file():  # a regular file whose read fails (EIO), even as root
        err = refused(spec("1", "/proc/self/mem"), pred)
        assert err.status == 422 and "cannot read artefact" in err.message
    assert pred.seen == []


def test_a_sha256_mismatch_is_refused_409_before_the_runtime_sees_it(tmp_path: Path) -> None:
    s = spec("1", str(artefact(tmp_path)), "f" * 64)
    calls: list[Path] = []

    def loader(path: Path, backend: str, threads: int) -> FakePredictor:
        calls.append(path)
        return FakePredictor()

    with pytest.raises(DeploymentRefusedError) as exc:
        load_version(s, loader=loader, intra_op_threads=1, seed=0, window=4)
    assert exc.value.status == 409 and "sha256 mismatch" in exc.value.message
    assert hashlib.sha256(DATA).hexdigest() in exc.value.message and calls == []


def test_a_runtime_that_cannot_load_it_is_refused_422(tmp_path: Path) -> None:
    def loader(path: Path, backend: str, threads: int) -> FakePredictor:
        raise ValueError("bad protobuf")

    with pytest.raises(DeploymentRefusedError) as exc:
        load_version(good_spec(tmp_path), loader=loader, intra_op_threads=1, seed=0, window=4)
    assert exc.value.status == 422 and "ValueError: bad protobuf" in exc.value.message


@pytest.mark.parametrize("n_features", [None, 0, 2.0])
def test_no_fixed_feature_count_is_refused_422(tmp_path: Path, n_features: object) -> None:
    err = refused(good_spec(tmp_path), FakePredictor(n_features=n_features))
    assert err.status == 422 and "feature count" in err.message


@pytest.mark.parametrize(
    "out",
    [
        np.zeros(1, np.float32),  # 1-D
        np.zeros((1, 1, 3), np.float32),  # 3-D
        np.zeros((1, 0), np.float32),  # no classes
        np.zeros((2, 3), np.float32),  # a row it was not asked for
    ],
    ids=["1d", "3d", "no-classes", "two-rows"],
)
def test_a_warm_up_answer_of_the_wrong_shape_is_refused_422(tmp_path: Path, out: object) -> None:
    err = refused(good_spec(tmp_path), FakePredictor(out=out))
    assert err.status == 422 and "warm-up returned shape" in err.message


def test_a_single_logit_answer_is_a_valid_shape(tmp_path: Path) -> None:
    assert load(good_spec(tmp_path), FakePredictor(out=[[0.5]])).n_classes == 1


@pytest.mark.parametrize("row", [[float("nan"), 1.0], [1.0, float("inf")], [float("-inf")]])
def test_any_non_finite_warm_up_logit_is_refused_422(tmp_path: Path, row: list[float]) -> None:
    err = refused(good_spec(tmp_path), FakePredictor(out=[row]))
    assert err.status == 422 and "non-finite" in err.message


def test_a_failing_warm_up_is_refused_422(tmp_path: Path) -> None:
    err = refused(good_spec(tmp_path), FakePredictor(max_rows=0))
    assert err.status == 422 and "warm-up inference failed: RuntimeError" in err.message


def test_warm_up_at_the_largest_batch(tmp_path: Path) -> None:
    s = good_spec(tmp_path)
    pred = FakePredictor(n_features=4)
    load(s, pred, warm_batch=4)
    assert [shape for shape, _, _ in pred.seen] == [(1, 4), (4, 4)]
    err = refused(s, FakePredictor(max_rows=1), warm_batch=2)
    assert err.status == 422 and "warm-up at batch 2 failed" in err.message
    err = refused(s, FakePredictor(bad_rows_at=8), warm_batch=8)
    assert err.status == 422 and "warm-up at batch 8 returned shape (8, 4)" in err.message


def test_the_fault_rng_is_reproducible_per_seed_and_version(tmp_path: Path) -> None:
    def draws(v: str, seed: int) -> list[float]:
        rng = load(good_spec(tmp_path, v), FakePredictor(), seed=seed).fault_rng
        return [rng.random() for _ in range(3)]

    assert draws("1", 0) == draws("1", 0)
    assert draws("1", 0) != draws("1", 1)
    assert draws("1", 0) != draws("2", 0)
