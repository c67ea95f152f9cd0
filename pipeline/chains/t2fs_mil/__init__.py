"""``t2fs-mil``: active sacroiliitis from an axial T2 fat-suppressed MRI series (Keskin et al. 2026).

ResNet-18 slice features, gated attention over the slices, a bag classifier, horizontal-flip
test-time augmentation; slice attention weights and Grad-CAM maps as evidence.

* :mod:`.model` -- the network (``build_model`` from manifest hyperparameters; the seed's are
  ``SEED_HYPERPARAMETERS``);
* :mod:`.preprocess` -- slice order along the patient axis and the seed's per-slice preprocessing;
* :mod:`.inference` -- prediction with TTA, Grad-CAM, loading a pack;
* :mod:`.chain` -- ``T2FSMILChain``, what the node runs;
* :mod:`.data`, :mod:`.train` -- phantom studies as cases, ``sijnode train`` / ``sijnode evaluate``.

Torch is imported by the submodules only, so importing this package costs nothing.
"""
