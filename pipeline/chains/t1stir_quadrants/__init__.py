"""``t1stir-quadrants``: coronal T1 + STIR, joint contours by unit vector fields, five lesion types per joint quadrant (Jamaludin et al. 2026).

* :mod:`.annotators` -- annotator matrices in the paper's hierarchy (R1R2 -> R1, R2 -> sessions),
  cross-entropy (present labels optionally weighted) plus trace penalty (Tanno et al. 2019);
* :mod:`.model` -- the contouring U-Net (8 channels) and the lesion classifier (shared ResNet-34,
  14 heads per joint) at the published sizes;
* :mod:`.preprocess` -- canonical orientation from the geometry, zero-pad and bicubic 224;
* :mod:`.targets` -- heatmaps and unit vector fields from the phantom's joint-line masks;
* :mod:`.contour` -- the field walk's step, stop and failure rules; contour RMS error in mm;
* :mod:`.regions` -- levelling, static joint boxes, quadrants;
* :mod:`.data` -- phantom cases, canonical series, joint crops (right joint mirrored), reader labels;
* :mod:`.inference` -- the pack's networks, contouring with the consistency rule, regions,
  consensus probabilities, Grad-CAM and its way back to source pixels;
* :mod:`.chain` -- per-quadrant / per-side findings, SCOORD contours, overlays, Grad-CAM, "not analysed";
* :mod:`.train` -- the demonstration trainer and evaluation on the shared harness.

Torch is imported by the submodules only, so importing this package costs nothing.
"""
