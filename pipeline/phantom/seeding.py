"""Deterministic random streams for the phantom generator.

Every component (anatomy, lesions, each series' noise, vendor choice, ...) draws from
its own stream, keyed by the study seed and a name.  Keeping the streams separate
means that asking for more kinds, or a different lesion SPEC, never changes the
anatomy or the noise of the other parts of the same seed -- which the tests rely on
(a study with one lesion minus the same study without it shows only the lesion).
"""

from __future__ import annotations

import zlib

import numpy as np


def stream_key(name: str) -> int:
    """Stable 32-bit key for a stream name (Python's ``hash`` is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A numpy Generator that depends only on ``seed`` and the stream ``names``."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    entropy = [int(seed)] + [stream_key(name) for name in names]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
