"""xr-anatomy: the anatomy-aware radiograph chain of Dorfner et al. (2024).

An AP pelvic radiograph is segmented (MONAI UNet: sacrum, left and right ilium), the region of
both sacroiliac joints is cropped from it (:mod:`.joints`), and a ResNet-50 classifies the crop
for radiographic sacroiliitis by the modified New York criteria. Modules:

* :mod:`.model` -- the two networks, built from manifest hyperparameters (published or demo sizes);
* :mod:`.preprocess` -- DICOM to grayscale, the segmenter's and the classifier's input pipelines;
* :mod:`.joints` -- the joint region (sacrum dilated by 5 % of its width ∩ each ilium) and fallbacks;
* :mod:`.inference` -- one radiograph through all steps (shared by the chain, evaluation, bench);
* :mod:`.overlay` -- the segmentation, joint boxes and side letters as a map for the heatmap writer;
* :mod:`.importer` -- the published checkpoints to a pack (``sijnode packs import-anatomy-aware``);
* :mod:`.chain` -- ``XRAnatomyChain``, the node's chain;
* :mod:`.data`, :mod:`.train` -- phantom data, training and evaluation of the demonstration pack.
"""
