"""The approval form's evidence: every figure an approver needs, in its section."""

from __future__ import annotations

import numpy as np

from ballast.cost import judge_cost
from ballast.data import ValidatedDataset
from ballast.quality import QualityDecision
from tasks.approval import approval_evidence, evidence_markdown


def _dataset() -> ValidatedDataset:
    return ValidatedDataset(
        name="d",
        features=np.zeros((4, 2), dtype=np.float32),
        labels=np.zeros(4, dtype=np.int64),
        feature_names=("a", "b"),
        sha256="0" * 64,
        n_rows=4,
        checks=("not_null", "in_range", "schema"),
    )


def _quality(champion: float | None) -> QualityDecision:
    return QualityDecision(
        passed=True,
        metric="accuracy",
        candidate=0.96,
        champion=champion,
        champion_version="3" if champion is not None else None,
        drop=None if champion is None else champion - 0.96,
        max_drop=0.01,
        floor=0.9,
        reasons=("ok",),
    )


def test_evidence_has_data_champion_parity_and_bench_figures() -> None:
    out = approval_evidence(
        _dataset(),
        {"accuracy": 0.96, "train_loss": 0.1},
        {"parity_max_rel_err": 1e-7, "bench_b1_p50_ms": 0.02},
        _quality(0.95),
        judge_cost({1: 1.05, 64: 0.98}, 2.0, "3"),
    )
    assert out["data_rows"] == 4 and out["data_checks_passed"] == 3
    assert (out["cost_vs_champion_b1"], out["cost_vs_champion_b64"]) == (1.05, 0.98)
    assert out["champion_accuracy"] == 0.95
    assert abs(out["accuracy_delta_vs_champion"] - 0.01) < 1e-12  # positive: candidate better
    md = evidence_markdown("m", "4", {"parity": True, "quality_gate": True}, out, "ops")
    sections = [line for line in md.splitlines() if line.startswith("### ")]
    assert sections == [
        "### Checks",
        "### Evaluation against the champion",
        "### Parity (compiled vs eager)",
        "### Benchmark",
        "### Data checks",
        "### Training and evaluation",
    ]
    champion_part = md.split("### Evaluation against the champion")[1].split("###")[0]
    assert "accuracy_delta_vs_champion" in champion_part and "champion_accuracy" in champion_part
    assert "| cost_vs_champion_b64 | 0.98 |" in champion_part
    assert "no champion yet" not in md


def test_a_first_release_says_there_is_no_champion() -> None:
    out = approval_evidence(
        _dataset(), {"accuracy": 0.96}, {}, _quality(None), judge_cost({}, 2.0, None)
    )
    assert "champion_accuracy" not in out and "accuracy_delta_vs_champion" not in out
    assert not any(k.startswith("cost_") for k in out)
    md = evidence_markdown("m", "1", {"parity": True}, out)
    assert "### Evaluation against the champion" in md and "no champion yet: first release" in md


def test_the_form_says_first_when_the_candidate_is_a_rehearsed_fault() -> None:
    md = evidence_markdown("m", "5", {"parity": True}, {"accuracy": 0.9}, "ops", "errors")
    assert md.index("injected fault `errors`") < md.index("### Checks")
    assert "injected fault" not in evidence_markdown("m", "5", {"parity": True}, {})
