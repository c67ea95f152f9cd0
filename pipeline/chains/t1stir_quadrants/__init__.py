"""``t1stir-quadrants``: coronal T1 + STIR, joint contours by unit vector fields, five lesion types per joint quadrant (Jamaludin et al. 2026).

Built so far (the chain is not registered in config.yaml yet):

* :mod:`.annotators` -- annotator matrices in the paper's hierarchy (consensus R1R2 ->
  intra-reader consensus R1, R2 -> read sessions), cross-entropy plus trace penalty
  (Tanno et al. 2019), for any number of binary outputs.

Torch is imported by the submodules only, so importing this package costs nothing.
"""
