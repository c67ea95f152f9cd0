"""Synthetic sacroiliac-joint studies with exact ground truth, written as a PACS would send them.

No labeled SIJ imaging can be downloaded, so the node is tested and demonstrated with
phantoms: one analytic 3-D pelvis per study (sacrum, ilia, joint clefts, fat, muscle,
viscera; per-study size, shape, joint angle, position and small rotation), sampled by
every series in its own geometry so that all planes of a study agree.

Series (``kinds``):

* ``mri`` -- semicoronal T1 TSE and STIR (15-20 slices of 3-4 mm, tilted to the long
  axis of the sacrum) and axial T2 TSE fat-suppressed (25-60 slices of ~3.3 mm), with
  acquisition blur, coil bias field and Rician noise; vendor-flavoured headers.
* ``ct`` -- axial pelvis in Hounsfield units, 1-3 mm, 512 x 512, bone kernel.
* ``xr`` -- AP pelvic radiograph (DX, FOR PRESENTATION), a divergent projection through
  the same phantom, 2000-2900 pixels of 0.148-0.2 mm, PatientOrientation ``L\\F``.

The vendor (Siemens, GE, Philips, Canon) rotates with the seed: ``seed % 4``.

Usage::

    from pipeline.phantom import generate_study, write_studies
    study = generate_study(7, kinds=("mri",), lesions="random")
    for info, datasets in study.series: ...
    write_studies(Path("out"), seed=0, count=20, lesions="random", transfer_syntax="jpeg-ls")

``write_studies`` writes ``out/SYNTH-0007/<NNN>_<ROLE>/<NNNN>.dcm`` plus
``ground_truth.json`` and ``masks.npz`` per study; study ``i`` uses seed ``seed + i``
so any study can be regenerated on its own.  The same seed, kinds, lesions and
generator version give identical pixel data and UIDs.

Lesions SPEC
------------
``lesions`` is ``"none"`` (healthy), ``"random"`` (seeded: about a quarter healthy, the
rest active, structural or both), or a SPEC -- a dict, a path to a JSON file, or the
JSON text -- of this form::

    {
      "lesions": [
        {"type": "edema", "side": "left", "quadrant": "upper_ilium"},
        {"type": "erosion", "side": "right", "quadrant": "lower_ilium", "severity": "severe", "size_mm": 5},
        {"type": "ankylosis", "side": "right", "region": "upper"},
        {"type": "widening", "side": "left"}
      ],
      "mny_grade": {"left": 3, "right": 0}
    }

Lesion keys:

* ``type`` (required): ``edema`` (subchondral bone marrow edema: bright on STIR/T2FS,
  dark on T1), ``erosion`` (cortical defect at the joint), ``sclerosis`` (dense
  subchondral bone: dark on MRI, dense on CT and radiograph), ``fat`` (fat lesion:
  bright on T1, dark on STIR), ``ankylosis`` (bone bridging the joint), ``narrowing``
  and ``widening`` (of the joint space).
* ``side`` (required): ``left`` or ``right`` -- the patient's.
* ``quadrant``: ``upper_ilium``, ``lower_ilium``, ``upper_sacrum``, ``lower_sacrum``;
  required for edema, erosion, sclerosis and fat.  Upper / lower halve the joint's
  cranio-caudal extent.
* ``region``: ``upper``, ``lower`` or ``whole`` (default) -- for the joint-space
  lesions ankylosis, narrowing and widening, which span both bones (a quadrant given
  for them only selects its half).  Ankylosis of the whole joint is total, of one half
  partial.
* ``severity``: ``mild``, ``moderate`` (default) or ``severe``: lesion intensity; mild
  erosions / sclerosis alone make mNY grade 1.
* ``size_mm`` (diameter along the joint), ``depth_mm`` (into the bone) and
  ``position`` (0..1, bottom to top within the quadrant's half): optional, else seeded.

``mny_grade`` (optional) asks for a modified New York grade per side.  For a side
without listed erosion / sclerosis / ankylosis / narrowing / widening, matching
structural lesions are generated; if lesions are listed, the grade they give must equal
the requested one (else ``ValueError``).  The grading rules and all derived labels
(active inflammation, ASAS-positive MRI, structural change, radiographic sacroiliitis)
are in :mod:`pipeline.phantom.labels`.

Ground truth (``ground_truth.json``): generator version, seed, the normalised SPEC,
anatomy parameters and landmarks, every series (role ``T1``/``STIR``/``T2FS``/``CT``/
``XR``, plane ``axial``/``coronal``/..., semicoronal tilt in degrees, geometry, UIDs),
every lesion (type, side, quadrant, region, centre in LPS, size, mask bit, affected
slice indices per series, radiograph pixels), per-side mNY grade and derived labels, and
``readers``: simulated gradings by 2 readers x 3 sessions of the 14 per-joint outputs
(edema / erosion / fat per quadrant, sclerosis, ankylosis) with known confusion, plus the
consensus labels ``R1R2``, ``R1``, ``R2`` (see :mod:`pipeline.phantom.readers`).
Masks (``masks.npz``): ``<ROLE>_anatomy`` (labels in ``ANATOMY_LABELS``),
``<ROLE>_joint_line``, ``<ROLE>_lesions`` (bit field) for slice series;
``XR_sacrum``, ``XR_left_ilium``, ``XR_right_ilium``, ``XR_left_joint``,
``XR_right_joint`` and ``XR_lesions`` on the radiograph grid.
"""

from .anatomy import ANATOMY_LABELS, JOINT_LINE_LABELS
from .dicom import TRANSFER_SYNTAXES
from .lesions import LESION_TYPES, QUADRANTS, SIDES
from .series import PLANES, ROLES
from .study import (
    KINDS,
    PhantomSeries,
    PhantomStudy,
    SeriesInfo,
    generate_study,
    write_studies,
    write_study,
)
from .version import GENERATOR_VERSION

__all__ = [
    "ANATOMY_LABELS",
    "GENERATOR_VERSION",
    "JOINT_LINE_LABELS",
    "KINDS",
    "LESION_TYPES",
    "PLANES",
    "QUADRANTS",
    "ROLES",
    "SIDES",
    "TRANSFER_SYNTAXES",
    "PhantomSeries",
    "PhantomStudy",
    "SeriesInfo",
    "generate_study",
    "write_studies",
    "write_study",
]
