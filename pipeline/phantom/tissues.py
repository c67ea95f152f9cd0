"""Signal of each tissue in each contrast.

MR values are relative signal (fat on T1 = 1).  They follow the textbook appearance
the lesions are defined by: edema bright on STIR / T2FS and dark on T1, sclerosis dark
on every sequence, fat lesions bright on T1 and dark on STIR, erosions filled with
fluid-rich tissue.  CT values are Hounsfield units; the radiograph's linear
attenuation is derived from them so CT and radiograph always agree.
"""

from __future__ import annotations

import numpy as np

from .anatomy import TISSUES

# relative MR signal and CT number per tissue
_TABLE: dict[str, dict[str, float]] = {
    #              T1     STIR   T2FS    HU
    "air":        {"T1": 0.00, "STIR": 0.00, "T2FS": 0.00, "HU": -1000.0},
    "fat":        {"T1": 1.00, "STIR": 0.05, "T2FS": 0.09, "HU": -100.0},
    "muscle":     {"T1": 0.30, "STIR": 0.20, "T2FS": 0.18, "HU": 50.0},
    "viscera":    {"T1": 0.45, "STIR": 0.26, "T2FS": 0.28, "HU": 20.0},
    "disc":       {"T1": 0.33, "STIR": 0.50, "T2FS": 0.55, "HU": 80.0},
    "cortex":     {"T1": 0.03, "STIR": 0.02, "T2FS": 0.02, "HU": 1300.0},
    "marrow":     {"T1": 0.78, "STIR": 0.10, "T2FS": 0.13, "HU": 230.0},
    "cleft":      {"T1": 0.28, "STIR": 0.42, "T2FS": 0.46, "HU": 60.0},
    "edema":      {"T1": 0.30, "STIR": 0.78, "T2FS": 0.72, "HU": 240.0},
    "sclerosis":  {"T1": 0.06, "STIR": 0.04, "T2FS": 0.05, "HU": 900.0},
    "fat_lesion": {"T1": 1.05, "STIR": 0.03, "T2FS": 0.07, "HU": -30.0},
    "erosion":    {"T1": 0.24, "STIR": 0.62, "T2FS": 0.60, "HU": 45.0},
}

# texture amplitude (relative for MR, HU for CT): trabecular marrow, striated muscle, bowel
_FINE_TEXTURE = {"marrow": 0.10, "edema": 0.12, "sclerosis": 0.06, "fat_lesion": 0.05}
_COARSE_TEXTURE = {"muscle": 0.07, "viscera": 0.18, "fat": 0.03, "disc": 0.05}
_FINE_TEXTURE_HU = {"marrow": 45.0, "edema": 45.0, "sclerosis": 80.0, "fat_lesion": 25.0}
_COARSE_TEXTURE_HU = {"muscle": 8.0, "viscera": 35.0, "fat": 10.0}

MU_WATER_PER_MM = 0.0205  # linear attenuation of water near 60 keV, the effective energy of a pelvis AP


def contrast_vector(contrast: str) -> np.ndarray:
    """Per-tissue value for ``contrast`` ("T1", "STIR", "T2FS" or "HU"), in TISSUES order."""
    return np.array([_TABLE[tissue][contrast] for tissue in TISSUES], dtype=np.float32)


def texture_vectors(contrast: str) -> tuple[np.ndarray, np.ndarray]:
    """(fine, coarse) texture weights per tissue: multiply by the texture field and add."""
    base = contrast_vector(contrast)
    if contrast == "HU":
        fine = np.array([_FINE_TEXTURE_HU.get(t, 0.0) for t in TISSUES], dtype=np.float32)
        coarse = np.array([_COARSE_TEXTURE_HU.get(t, 0.0) for t in TISSUES], dtype=np.float32)
        return fine, coarse
    fine = np.array([_FINE_TEXTURE.get(t, 0.0) for t in TISSUES], dtype=np.float32) * base
    coarse = np.array([_COARSE_TEXTURE.get(t, 0.0) for t in TISSUES], dtype=np.float32) * base
    return fine, coarse


def attenuation_vector() -> np.ndarray:
    """Linear attenuation (1/mm) per tissue, from the CT numbers: mu = mu_water (1 + HU/1000)."""
    return (MU_WATER_PER_MM * (1.0 + contrast_vector("HU") / 1000.0)).astype(np.float32)


def signal(fractions: np.ndarray, fine_texture: np.ndarray, coarse_texture: np.ndarray, contrast: str) -> np.ndarray:
    """Signal of each sample: tissue values weighted by their fractions, plus texture."""
    fine, coarse = texture_vectors(contrast)
    # einsum, not @ or np.dot: `@` takes a slow generic path for vector x matrix, and BLAS
    # dot pays a thread wake-up of several ms when called between long non-BLAS stretches
    values = np.einsum("t,tn->n", contrast_vector(contrast), fractions)
    values += np.einsum("t,tn->n", fine, fractions) * fine_texture
    values += np.einsum("t,tn->n", coarse, fractions) * coarse_texture
    return values
