"""The shared evaluation report: binary metrics with bootstrap CIs, per-subgroup sensitivity and
specificity, ROC plots, ``evaluation.json`` / ``EVALUATION.md`` in one schema for every chain.

A chain's ``evaluate`` runs its model on each held-out study and hands over one
:class:`CaseResult` per study (probability and label per output, subgroups of the case mix,
chain-only details) and one :class:`OutputSpec` per scored output; :func:`evaluation_report`
and :func:`write_evaluation` do the rest; :func:`compare_reports` checks a regeneration. Hand-written because none of the allowed
libraries (MONAI has ROCAUC but no bootstrap CIs or threshold metrics) covers it, and
scikit-learn is not a dependency.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: bootstrap resamples behind every confidence interval in the evaluation reports
BOOTSTRAP_RESAMPLES = 2000


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds, from the strictest threshold to the loosest."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # One point per distinct score: ties move together.
    distinct = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    tps = np.cumsum(labels)[distinct]
    fps = np.cumsum(~labels)[distinct]
    positives, negatives = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    tpr = np.r_[0.0, tps / positives]
    fpr = np.r_[0.0, fps / negatives]
    thresholds = np.r_[np.inf, scores[distinct]]
    return fpr, tpr, thresholds


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal; ties count half). NaN when one class is absent."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The cut-off maximising sensitivity + specificity - 1 on validation scores."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    finite = np.isfinite(thresholds)
    best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
    return float(np.clip(thresholds[best], 0.01, 0.99))


def specific_threshold(labels: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """The lowest cut-off (``score >= cut-off`` is positive) at which at least ``specificity`` of the negatives stay
    below, on the manifest's 4-decimal grid (rounded up, so that the rounded threshold still keeps them below)."""
    negatives = np.sort(np.asarray(scores, dtype=float)[np.asarray(labels) == 0])
    if negatives.size == 0:
        return 0.5
    allowed = int(np.floor((1.0 - specificity) * negatives.size + 1e-9))  # negatives that may reach the cut-off
    above = negatives[negatives.size - allowed - 1]  # the highest negative that must stay below
    return float(np.ceil(float(above) * 1e4 + 1e-6) / 1e4)


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, balanced accuracy and F1 at ``score >= threshold``."""
    labels = np.asarray(labels, dtype=bool)
    predicted = np.asarray(scores, dtype=float) >= threshold
    tp = int((predicted & labels).sum())
    tn = int((~predicted & ~labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    sensitivity, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "accuracy": ratio(tp + tn, labels.size),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci95_low": self.low, "ci95_high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.3f} (95% CI {self.low:.3f}–{self.high:.3f})"


def evaluate_binary(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    threshold: float,
    n_bootstrap: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Every metric at ``threshold`` plus AUC, each with a percentile bootstrap 95 % CI (patients resampled)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    point = {**threshold_metrics(labels, scores, threshold), "auc": auc(labels, scores)}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(n_bootstrap):
        index = rng.integers(0, labels.size, labels.size)
        resampled = {**threshold_metrics(labels[index], scores[index], threshold), "auc": auc(labels[index], scores[index])}
        for name, value in resampled.items():
            samples[name].append(value)
    estimates = {}
    for name, value in point.items():
        finite = np.asarray([v for v in samples[name] if np.isfinite(v)])
        low, high = (np.percentile(finite, [2.5, 97.5]) if finite.size else (float("nan"), float("nan")))
        estimates[name] = Estimate(float(value), float(low), float(high))
    return estimates


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """Write a ROC plot with one curve per entry (label → (labels, scores)) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot(fpr, tpr, label=f"{name} (AUC {auc(labels, scores):.3f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="1 − specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


# ------------------------------------------------------------------ the evaluation report, one schema
#: what every chain's ``sijnode evaluate`` writes into the report folder
EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "EVALUATION.md"
ROC_PNG = "roc.png"
REPORT_SCHEMA = "sijnode-evaluation/1"
#: metrics reported for every output, each with a bootstrap CI
METRICS = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1")


@dataclass(frozen=True)
class OutputSpec:
    """One scored output of a chain in an evaluation.

    ``label``: which of a case's labels it is scored against (default: its own name), so a
    variant of an output (e.g. without test-time augmentation) is one more OutputSpec on the
    same label.
    """

    name: str
    threshold: float
    label: str | None = None
    description: str = ""

    @property
    def label_key(self) -> str:
        return self.label or self.name


@dataclass
class CaseResult:
    """One evaluated study: its probability and ground-truth label per output, the subgroups of
    the case mix it belongs to (e.g. "healthy", "structural only", "joint-space widening"), and
    whatever else the chain measured on it (``details``: Dice, crop box, ...).

    ``error``: the chain did not analyse the study (it says why); its probabilities are ``None``
    and it counts as a negative call in the metrics, as the node would report no finding.
    """

    study: str
    probabilities: dict[str, float | None]
    labels: dict[str, int]
    subgroups: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def score(self, output: OutputSpec) -> float:
        value = self.probabilities.get(output.name)
        return 0.0 if value is None else float(value)

    def as_dict(self, outputs: Sequence[OutputSpec]) -> dict[str, Any]:
        row: dict[str, Any] = {
            "study": self.study,
            "subgroups": list(self.subgroups),
            "outputs": {
                o.name: {
                    "probability": None if self.probabilities.get(o.name) is None else round(float(self.probabilities[o.name]), 6),  # type: ignore[arg-type]
                    "label": int(self.labels[o.label_key]),
                }
                for o in outputs
            },
        }
        if self.error:
            row["error"] = self.error
        return {**row, **self.details}


def phantom_subgroups(truth: Mapping[str, Any]) -> tuple[str, ...]:
    """The case-mix subgroups of a phantom study from its ``ground_truth.json``: one of
    "healthy", "active only", "structural only", "active and structural", plus each joint-space
    lesion it has ("joint-space widening", ...) -- the hard negatives of an activity chain are
    "structural only" studies, those of a radiographic chain low mNY grades ("mNY max 1/2")."""
    from pipeline.phantom.lesions import JOINT_LESIONS, STRUCTURAL_TYPES

    types = {lesion["type"] for lesion in truth.get("lesions", [])}
    active, structural = "edema" in types, bool(types & set(STRUCTURAL_TYPES))
    kind = {(False, False): "healthy", (True, False): "active only", (False, True): "structural only", (True, True): "active and structural"}
    groups = [kind[(active, structural)]]
    groups += [f"joint-space {t}" for t in JOINT_LESIONS if t in types]
    grades = truth.get("mny_grade") or {}
    if grades:
        groups.append(f"mNY max grade {max(int(grades.get('left', 0)), int(grades.get('right', 0)))}")
    return tuple(groups)


def subgroup_metrics(cases: Sequence[CaseResult], output: OutputSpec) -> dict[str, dict[str, Any]]:
    """Per subgroup: studies, positives, and sensitivity / specificity at the output's threshold
    (NaN-free: ``None`` where the subgroup has no positives or no negatives)."""
    names = sorted({name for case in cases for name in case.subgroups})
    table: dict[str, dict[str, Any]] = {}
    for name in ["all", *names]:
        members = [c for c in cases if name == "all" or name in c.subgroups]
        labels = np.asarray([c.labels[output.label_key] for c in members], dtype=bool)
        called = np.asarray([c.score(output) >= output.threshold for c in members], dtype=bool)
        positives, negatives = int(labels.sum()), int((~labels).sum())
        table[name] = {
            "studies": len(members),
            "positives": positives,
            "called_positive": int(called.sum()),
            "sensitivity": round(float((called & labels).sum()) / positives, 4) if positives else None,
            "specificity": round(float((~called & ~labels).sum()) / negatives, 4) if negatives else None,
        }
    return table


def evaluation_report(
    cases: Sequence[CaseResult],
    outputs: Sequence[OutputSpec],
    *,
    pack: Mapping[str, Any],
    data: Mapping[str, Any],
    seconds: float,
    n_bootstrap: int = BOOTSTRAP_RESAMPLES,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation report as a dict (the schema of ``evaluation.json``, the same for every chain).

    ``pack``: name, version, chain, weights sha256, demo; ``data``: where the studies come from
    (folder, seeds, generator); ``extra``: chain-only summaries (e.g. segmentation Dice).
    """
    if not cases:
        raise ValueError("no studies to evaluate")
    scored: dict[str, Any] = {}
    for output in outputs:
        labels = np.asarray([c.labels[output.label_key] for c in cases], dtype=bool)
        scores = np.asarray([c.score(output) for c in cases], dtype=float)
        estimates = evaluate_binary(labels, scores, output.threshold, n_bootstrap=n_bootstrap)
        scored[output.name] = {
            "label": output.label_key,
            "description": output.description,
            "threshold": output.threshold,
            "studies": int(labels.size),
            "positives": int(labels.sum()),
            "metrics": {name: {k: _finite(v) for k, v in estimates[name].as_dict().items()} for name in METRICS},
            "subgroups": subgroup_metrics(cases, output),
        }
    return {
        "schema": REPORT_SCHEMA,
        "pack": dict(pack),
        "data": dict(data),
        "bootstrap": {"resamples": n_bootstrap, "interval": "percentile 95 %", "unit": "study (patient)", "seed": 0},
        "outputs": scored,
        "not_analysed": [{"study": c.study, "error": c.error} for c in cases if c.error],
        "seconds": round(float(seconds), 1),
        **dict(extra or {}),
        "cases": [c.as_dict(outputs) for c in cases],
    }


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def write_evaluation(
    out: Path,
    report: Mapping[str, Any],
    cases: Sequence[CaseResult],
    outputs: Sequence[OutputSpec],
    *,
    title: str,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``evaluation.json``, ``EVALUATION.md`` (the metrics, per-subgroup table and ``notes``)
    and ``roc.png`` (one curve per output) into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / EVALUATION_JSON, "markdown": out / EVALUATION_MD, "roc_png": out / ROC_PNG}
    paths["report"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    curves = {}
    for output in outputs:
        labels = np.asarray([c.labels[output.label_key] for c in cases], dtype=bool)
        curves[output.name] = (labels, np.asarray([c.score(output) for c in cases]))
    plot_roc(curves, paths["roc_png"], title)
    paths["markdown"].write_text(report_markdown(report, title, notes), encoding="utf-8")
    return paths


def pack_identity(manifest: Any, parameters: int | Mapping[str, int] | None = None) -> dict[str, Any]:
    """The ``pack`` block of an evaluation report: which pack (name, version, chain, weights
    sha256, demonstration or not), its architecture and training data as the manifest declares
    them, and the parameter count of the networks evaluated (a total or one per network)."""
    identity: dict[str, Any] = {
        "name": manifest.name,
        "version": manifest.version,
        "chain": manifest.chain,
        "weights_sha256": manifest.weights.sha256,
        "demo": manifest.demo,
        "architecture": manifest.architecture.model_dump(),
        "training_data": manifest.training_data,
    }
    if parameters is not None:
        identity["parameters"] = dict(parameters) if isinstance(parameters, Mapping) else int(parameters)
    return identity


def report_markdown(report: Mapping[str, Any], title: str, notes: Sequence[str] = ()) -> str:
    """``EVALUATION.md``: one metrics table per output with CIs, then sensitivity/specificity per subgroup."""

    def cell(m: Mapping[str, Any]) -> str:
        if m["value"] is None:
            return "–"
        low, high = m["ci95_low"], m["ci95_high"]
        return f"{m['value']:.3f} ({low:.3f}–{high:.3f})" if low is not None and high is not None else f"{m['value']:.3f}"

    def rate(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    pack = report["pack"]
    lines = [f"# {title}", "", *notes, ""] if notes else [f"# {title}", ""]
    lines += [
        f"Pack {pack.get('name')} {pack.get('version')} (weights sha256 `{pack.get('weights_sha256')}`); "
        f"95 % CIs by percentile bootstrap over studies ({report['bootstrap']['resamples']} resamples).",
        "",
    ]
    for name, scored in report["outputs"].items():
        lines += [
            f"## {name} (p ≥ {scored['threshold']:g}; {scored['studies']} studies, {scored['positives']} positive)",
            "",
            "| metric | value (95 % CI) |",
            "|---|---|",
            *(f"| {metric} | {cell(m)} |" for metric, m in scored["metrics"].items()),
            "",
            "| subgroup | studies | positive | called positive | sensitivity | specificity |",
            "|---|---|---|---|---|---|",
            *(
                f"| {sub} | {row['studies']} | {row['positives']} | {row['called_positive']} | {rate(row['sensitivity'])} | {rate(row['specificity'])} |"
                for sub, row in scored["subgroups"].items()
            ),
            "",
        ]
    if report.get("not_analysed"):
        lines += ["Not analysed (counted as negative calls): " + ", ".join(f"{r['study']} ({r['error']})" for r in report["not_analysed"]), ""]
    lines += [f"ROC curves: [{ROC_PNG}]({ROC_PNG}); per-study numbers: [{EVALUATION_JSON}]({EVALUATION_JSON}).", ""]
    return "\n".join(lines)


def manifest_summary(report: Mapping[str, Any], data: str) -> dict[str, Any]:
    """The held-out evaluation as a manifest records it (``evaluation.held_out``): per output the
    threshold and each metric's value and CI, rounded to 4 places, and the report's file name."""
    first = next(iter(report["outputs"].values()))
    return {
        "data": data,
        "studies": first["studies"],
        "positives": first["positives"],
        **{
            name: {
                "threshold": scored["threshold"],
                **{
                    metric: {k: (None if v is None else round(v, 4)) for k, v in m.items()}
                    for metric, m in scored["metrics"].items()
                },
            }
            for name, scored in report["outputs"].items()
        },
        "report": EVALUATION_JSON,
    }


#: how far a regenerated probability may lie from the committed one (``sijnode evaluate --check``)
CHECK_TOLERANCE = 1e-4


def compare_reports(
    committed: Mapping[str, Any], regenerated: Mapping[str, Any], tolerance: float = CHECK_TOLERANCE, *, subset: bool = False
) -> list[str]:
    """Differences between two evaluation reports of the same pack: every case's probability
    per output (to ``tolerance``) and decision, and, when both hold the same studies, every
    metric's point value. ``subset``: ``regenerated`` covers only some of the committed studies
    (a quick check); each of them must be in ``committed``. An empty list means the committed
    numbers were regenerated (``sijnode evaluate --check``)."""
    problems: list[str] = []
    if committed.get("schema") != REPORT_SCHEMA:
        return [f"the committed report is not in the {REPORT_SCHEMA} schema; regenerate it with sijnode evaluate"]
    old_cases = {c["study"]: c for c in committed.get("cases", [])}
    new_cases = {c["study"]: c for c in regenerated.get("cases", [])}
    only = set(new_cases) - set(old_cases) if subset else set(old_cases) ^ set(new_cases)
    for study in sorted(only):
        problems.append(f"{study}: in only one of the two reports")
    for study in sorted(set(old_cases) & set(new_cases)):
        for name, old in old_cases[study]["outputs"].items():
            new = new_cases[study]["outputs"].get(name)
            if new is None:
                problems.append(f"{study}: output {name} missing")
                continue
            a, b = old["probability"], new["probability"]
            if (a is None) != (b is None) or (a is not None and abs(a - b) > tolerance):
                problems.append(f"{study} {name}: probability {a} → {b}")
            threshold = committed["outputs"][name]["threshold"]
            if a is not None and b is not None and (a >= threshold) != (b >= threshold):
                problems.append(f"{study} {name}: decision changed at threshold {threshold}")
    if set(old_cases) == set(new_cases):
        for name, scored in committed.get("outputs", {}).items():
            for metric, m in scored["metrics"].items():
                other = regenerated.get("outputs", {}).get(name, {}).get("metrics", {}).get(metric, {}).get("value")
                if (m["value"] is None) != (other is None) or (m["value"] is not None and abs(m["value"] - other) > max(tolerance, 1e-6) * 10):
                    problems.append(f"{name} {metric}: {m['value']} → {other}")
    return problems
