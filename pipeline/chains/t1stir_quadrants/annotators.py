"""Annotator matrices for multi-reader training (Tanno et al. 2019, as modified by Jamaludin et al. 2026).

Tanno et al. learn one confusion matrix ``A_r`` per annotator so that the annotator's
labels are modelled as ``p_r(x) = A_r p(x)`` while ``p(x)`` is pushed towards the truth by a
penalty on the sum of the matrices' traces.  Jamaludin et al. change three things, all
followed here:

1. ``A_r`` is a rank-1 outer product ``a_r (x) b_r`` (LoRA-like) and
2. the matrix applied is ``B_r = I + A_r``.  For a binary output (classes absent/present)
   every column-stochastic 2x2 matrix is exactly of this form with ``a = (-1, 1)`` and
   ``b = (f, -m)``::

       B = [[1 - f,     m],      f: false-call rate, P(label present | truth absent)
            [    f, 1 - m]]      m: miss rate,       P(label absent  | truth present)

   so we learn ``f, m`` in (0, 1) through a sigmoid -- nothing of the paper's form is lost
   and ``B`` always maps probabilities to probabilities (the paper does not say how it
   keeps ``I + A`` stochastic; this is our choice).
3. The matrices form a tree (:data:`PAPER_HIERARCHY`): the network's output ``p`` goes
   through ``B_R1R2`` (inter-reader consensus), then ``B_R1`` / ``B_R2`` (intra-reader
   consensus), then one matrix per read session::

       p_R1R2 = B_R1R2 p;  p_R1 = B_R1 p_R1R2;  p_R1S1 = B_R1S1 p_R1;  ...

Loss: binary cross-entropy of every label set against its node's prediction (labels < 0,
the unused consensus labels, are left out), summed over the nodes, plus ``trace_weight``
times the sum of the traces of all ``B`` (Tanno's regulariser).  At inference the paper uses
``p_R1R2``.

Nothing here is specific to sacroiliac joints: any number of binary outputs, any tree.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

BASE = "base"
"""The tree's root: the network's own prediction ``p``."""

PAPER_HIERARCHY: dict[str, str] = {
    "R1R2": BASE,
    "R1": "R1R2",
    "R2": "R1R2",
    "R1S1": "R1",
    "R1S2": "R1",
    "R1S3": "R1",
    "R2S1": "R2",
    "R2S2": "R2",
    "R2S3": "R2",
}
"""Label set -> the label set (or ``BASE``) whose prediction its matrix transforms."""

INFERENCE_NODE = "R1R2"
"""The prediction the paper reports and the chain uses: the inter-reader consensus."""

_EPS = 1e-6


def _topological(tree: Mapping[str, str]) -> list[str]:
    order: list[str] = []
    placed = {BASE}
    pending = dict(tree)
    while pending:
        ready = [node for node, parent in pending.items() if parent in placed]
        if not ready:
            raise ValueError(f"annotator tree has a cycle or an unknown parent: {pending}")
        for node in ready:
            order.append(node)
            placed.add(node)
            del pending[node]
    return order


class AnnotatorHierarchy(nn.Module):
    """Per tree node and binary output, a learnt 2x2 annotator matrix ``B = I + a (x) b``.

    ``forward(p)`` takes the network's probabilities of "present" (N, outputs) and returns
    every node's probabilities (same shape), keyed by node name.
    """

    def __init__(self, n_outputs: int, tree: Mapping[str, str] = PAPER_HIERARCHY, initial_rate: float = 0.02) -> None:
        super().__init__()
        if not 0.0 < initial_rate < 0.5:
            raise ValueError(f"initial_rate must be in (0, 0.5), got {initial_rate}")
        self.tree = dict(tree)
        self.order = _topological(self.tree)
        self.n_outputs = n_outputs
        start = float(torch.logit(torch.tensor(initial_rate)))
        # row 0: false-call logits, row 1: miss logits; starting near the identity (a reliable reader)
        self.rate_logits = nn.ParameterDict(
            {node: nn.Parameter(torch.full((2, n_outputs), start)) for node in self.order}
        )

    def rates(self, node: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(false-call rate, miss rate) of ``node``'s matrix per output."""
        rates = torch.sigmoid(self.rate_logits[node])
        return rates[0], rates[1]

    def matrix(self, node: str) -> torch.Tensor:
        """``B = I + a (x) b`` per output, shape (outputs, 2, 2), indexed [label class, input class]."""
        false_call, miss = self.rates(node)
        a = torch.tensor([-1.0, 1.0], device=false_call.device)
        b = torch.stack([false_call, -miss], dim=-1)  # (outputs, 2)
        identity = torch.eye(2, device=false_call.device)
        return identity + a[None, :, None] * b[:, None, :]

    def composed_matrix(self, node: str) -> torch.Tensor:
        """The product of the matrices from the base prediction to ``node`` (outputs, 2, 2)."""
        product = self.matrix(node)
        parent = self.tree[node]
        while parent != BASE:
            product = product @ self.matrix(parent)
            parent = self.tree[parent]
        return product

    def forward(self, probability: torch.Tensor) -> dict[str, torch.Tensor]:
        predictions = {BASE: probability}
        for node in self.order:
            false_call, miss = self.rates(node)
            incoming = predictions[self.tree[node]]
            # second row of B applied to (1 - p, p)
            predictions[node] = false_call * (1.0 - incoming) + (1.0 - miss) * incoming
        return predictions

    def trace_penalty(self) -> torch.Tensor:
        """Sum over nodes and outputs of trace(B) = 2 - f - m (Tanno et al.'s regulariser)."""
        return sum(self.matrix(node).diagonal(dim1=-2, dim2=-1).sum() for node in self.order)


def multi_reader_loss(
    predictions: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    annotators: AnnotatorHierarchy,
    trace_weight: float = 0.01,
    positive_weight: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of each label set against its node's prediction plus the trace penalty.

    ``positive_weight`` weighs the "present" labels' terms (rare lesions: a short training run
    otherwise learns only that most quadrants are healthy); 1 is the plain cross-entropy.

    ``labels[node]`` holds 0/1 per (case, output); negative values (unused consensus labels,
    missing readings) are left out.  Each node's term is the mean over its used labels.
    """
    total = torch.zeros((), device=next(iter(predictions.values())).device)
    for node, target in labels.items():
        used = target >= 0
        if not used.any():
            continue
        probability = predictions[node][used].clamp(_EPS, 1.0 - _EPS)
        labels = target[used].to(probability.dtype)
        weight = torch.where(labels > 0.5, torch.full_like(labels, positive_weight), torch.ones_like(labels))
        total = total + nn.functional.binary_cross_entropy(probability, labels, weight=weight)
    return total + trace_weight * annotators.trace_penalty()
