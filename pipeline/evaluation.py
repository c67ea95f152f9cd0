"""Binary classification metrics with bootstrap confidence intervals, and ROC curve plots.

Shared by every chain's ``sijnode evaluate``. Hand-written because none of the allowed
libraries (MONAI has ROCAUC but no bootstrap CIs or threshold metrics) covers it, and
scikit-learn is not a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
