"""Reading a site's or a paper's checkpoint files for ``sijnode packs import-…``: one loader and
one strict key/shape check shared by every chain's importer, so each importer only maps its
published layout onto the chain's module tree."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["WeightsImportError", "check_state_dict", "load_checkpoint"]


class WeightsImportError(ValueError):
    """The published files do not match the published architecture."""


def load_checkpoint(path: Path, trust_pickle: bool) -> Any:
    """The object saved in ``path``, read with ``torch.load(weights_only=True)`` unless the user
    trusts the file's source (pickles can run code)."""
    if not Path(path).is_file():
        raise WeightsImportError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... depending on the file
        hint = "" if trust_pickle else " (if the file comes from a source you trust, retry with trust_pickle=True)"
        raise WeightsImportError(f"cannot read {path}: {error}{hint}") from error


def check_state_dict(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Every expected key present with its shape, nothing else: else an error naming the keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} has shape {tuple(found[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing key(s): {', '.join(missing[:8])}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected key(s): {', '.join(unexpected[:8])}" + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    if wrong:
        problems.append("; ".join(wrong[:8]))
    if problems:
        raise WeightsImportError(f"{what} does not match the published architecture: " + "; ".join(problems))
