"""``t1stir-quadrants``: coronal T1 + STIR, joint contours by unit vector fields, five lesion types per joint quadrant (Jamaludin et al. 2026).

Built so far (the chain is not registered in config.yaml yet):

* :mod:`.annotators` -- annotator matrices in the paper's hierarchy (consensus R1R2 ->
  intra-reader consensus R1, R2 -> read sessions), cross-entropy plus trace penalty
  (Tanno et al. 2019), for any number of binary outputs;
* :mod:`.model` -- the contouring U-Net (8 channels: per patient side start / end heatmaps and
  the unit vector field) and the lesion classifier (shared ResNet-34 over T1 and STIR, 14
  heads per joint) at the published sizes; the input layout (2-D slices, max over slices);
* :mod:`.preprocess` -- zero-pad to square and bicubic 224 x 224, the same mapping for points
  (:class:`~.preprocess.SquareFrame`); the patient's superior direction from the geometry;
* :mod:`.targets` -- joint polylines from joint-line masks (cranial start, caudal end),
  start / end Gaussian heatmaps, unit vector fields, the left/right flip that swaps joints;
* :mod:`.contour` -- walking the field from the start peak to the end peak (documented step,
  stop and failure rules) and the paper's contour RMS error in mm;
* :mod:`.regions` -- levelling rotation from the joints' upper / lower points, one static box
  per joint, quadrants (upper / lower by mid-height, ilium / sacrum by the joint line);
* :mod:`.data` -- phantom series as canonical 224-grid slices, contouring samples, levelled
  per-joint crops and the simulated readers' labels per joint;
* :mod:`.train` -- contouring augmentation (the paper's ranges, field vectors turned with the
  warp), loss, and contour errors of walked network outputs.

Not built yet: contouring / classifier trainers on the shared harness, inference and Grad-CAM,
``chain.py`` (findings through the result model), the demo pack; see issue 13.

Torch is imported by the submodules only, so importing this package costs nothing.
"""
