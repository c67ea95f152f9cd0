"""ct-slices: sacroiliitis on axial CT, after Fu et al. (2024), over the slices through the joints.

Modules:

* :mod:`.model` -- ResNeXt-50 32×4d and Inception-v4 in plain torch (torchvision / timm module trees);
* :mod:`.joints` -- which axial slices cross the sacroiliac joints (bone HU and anatomy);
* :mod:`.preprocess` -- order, HU, joint slices, crop, bone window, resize, three channels, normalisation;
* :mod:`.inference` -- per-slice probabilities, the slice → study rule, Grad-CAM (chain, evaluate, bench);
* :mod:`.importer` -- torchvision / timm checkpoints to a pack (``sijnode packs import-ct-slices``);
* :mod:`.chain` -- ``CTSlicesChain``, the node's chain;
* :mod:`.data`, :mod:`.train` -- phantom data, training and evaluation of the demonstration pack.
"""
