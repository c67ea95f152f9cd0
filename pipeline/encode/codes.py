"""Every code the encoders write, in one table.

Standard codes (SCT, DCM, UCUM, LN) were checked against the DICOM PS3.16 tables that ship
with pydicom (``pydicom.sr._concepts_dict``) and PixelMed's context groups, the one UMLS code
against PixelMed's TID 1500; ``tests/test_encode.py`` re-checks them on every run. Concepts
without a standard code we could verify use the private scheme ``99SIJNODE`` (private
designators start with "99", PS3.16 §8.2), which every object we write declares in its
CodingSchemeIdentificationSequence.

Chains use :func:`concept` to name their findings and scores, e.g. ``concept("bone marrow edema")``.
"""

from __future__ import annotations

from types import MappingProxyType

import highdicom as hd
from pydicom import Dataset

from pipeline.results import Concept, Laterality, MapMeaning, Region, Site

PRIVATE_SCHEME = "99SIJNODE"
PRIVATE_SCHEME_NAME = "sijnode private codes"
PRIVATE_SCHEME_RESPONSIBLE = "sijnode"

# IHE Radiology AI Results (AIR): the purpose code of the contributing-equipment item that
# describes the algorithm. 99IHE is IHE's own private scheme, so it is declared like ours.
IHE_SCHEME = "99IHE"
IHE_SCHEME_NAME = "IHE Radiology private codes"
IHE_SCHEME_RESPONSIBLE = "IHE"


def _private(value: str, meaning: str) -> Concept:
    return Concept(value, PRIVATE_SCHEME, meaning)


CODES: MappingProxyType[str, Concept] = MappingProxyType(
    {
        # Finding sites (CID 4 "Anatomic Region").
        "sacroiliac joint": Concept("39723000", "SCT", "Sacroiliac joint"),
        "ilium": Concept("22356005", "SCT", "Ilium"),
        "sacrum": Concept("54735007", "SCT", "Sacrum"),
        # Laterality (CID 244 "Laterality").
        "left": Concept("7771000", "SCT", "Left"),
        "right": Concept("24028007", "SCT", "Right"),
        "bilateral": Concept("51440002", "SCT", "Bilateral"),
        # Concept names of the CID 210 modifiers of a qualitative evaluation (TID 1500 row 13b).
        "laterality": Concept("272741003", "SCT", "Laterality"),
        "topographical modifier": Concept("106233006", "SCT", "Topographical modifier"),
        # Topographical modifiers (CID 2 "Anatomic Modifier"): our upper/lower quadrants.
        "superior": Concept("264217000", "SCT", "Superior"),
        "inferior": Concept("261089000", "SCT", "Inferior"),
        # Measurements and evaluations.
        "probability": Concept("122157", "DCM", "Probability"),
        "no units": Concept("1", "UCUM", "no units"),
        "present": Concept("52101004", "SCT", "Present"),  # CID 241 "Present-Absent Only"
        "absent": Concept("272519000", "SCT", "Absent"),  # CID 241
        "comment": Concept("121106", "DCM", "Comment"),
        "device": Concept("121007", "DCM", "Device"),  # observer type (CID 270)
        # TID 1500 row 12's container. Not in pydicom's dictionary; PixelMed's TID 1500 names it.
        "qualitative evaluations": Concept("C0034375", "UMLS", "Qualitative Evaluations"),
        # Map quantities (CID 7180 "Abstract Multi-dimensional Image Model Component Semantics").
        "class activation": Concept("130402", "DCM", "Class activation"),
        "gradient-weighted class activation": Concept(
            "130403", "DCM", "Gradient-weighted class activation"
        ),
        "fractional probabilistic segmentation": Concept(
            "110854", "DCM", "Fractional Probabilistic Segmentation"
        ),
        # Procedure reported (CID 100 "Quantitative Diagnostic Imaging Procedures"), used when the
        # source carries no ProcedureCodeSequence.
        "MRI unspecified body region": Concept("25056-3", "LN", "MRI unspecified body region"),
        "CT unspecified body region": Concept("25045-6", "LN", "CT unspecified body region"),
        "imaging procedure": Concept("363679005", "SCT", "Imaging procedure"),
        # Contributing equipment, IHE AI Results.
        "processing algorithm": Concept("Newcode1", IHE_SCHEME, "Processing Algorithm"),
        # Thresholds and explanations (DCM, pydicom's PS3.16 tables).
        "threshold": Concept("122411", "DCM", "Threshold Value"),
        "equivalent meaning": Concept("121050", "DCM", "Equivalent Meaning of Concept Name"),
        "visual explanation": Concept("130401", "DCM", "Visual explanation"),
        "summary": Concept("121111", "DCM", "Summary"),
        "finding": Concept("121071", "DCM", "Finding"),
        "series": Concept("113015", "DCM", "Series"),
        "not performed": Concept("262008008", "SCT", "Not performed"),
        # Findings with a verified standard code: edema (SCT 79654002, "Edema"; with the finding
        # site ilium/sacrum it reads as bone marrow edema of that bone).
        "bone marrow edema": Concept("79654002", "SCT", "Edema"),
        # ---- The private codes: concepts with no standard code we could verify ------------------
        # Searched (by meaning, in pydicom's bundled PS3.16 code tables, SCT/DCM/LN/UMLS, and
        # highdicom's codes): "sacroiliitis", "spondyl", "arthritis", "erosion", "ankylos",
        # "scleros" (only vascular sclerosis), "fat" (only fat tissue and breast/liver fat),
        # "attention", "weight" (only body weight), "rank" (only percentile ranks). SNOMED CT has
        # sacroiliitis as a disorder, but no code could be verified offline (24700007, offered
        # for it, is "Multiple sclerosis"): these stay private until mapped with a SNOMED browser.
        "active sacroiliitis": _private("ACTIVE-SI", "Active sacroiliitis"),
        "sacroiliitis": _private("SACROILIITIS", "Sacroiliitis"),
        "erosion": _private("EROSION", "Erosion"),
        "sclerosis": _private("SCLEROSIS", "Subchondral sclerosis"),
        "fat lesion": _private("FAT-LESION", "Fat lesion (fat metaplasia)"),
        "ankylosis": _private("ANKYLOSIS", "Ankylosis"),
        "radiographic sacroiliitis": _private(
            "MNY-SI", "Radiographic sacroiliitis (modified New York criteria)"
        ),
        "inflammatory changes": _private("ASAS-MRI", "Active inflammatory lesions (ASAS MRI)"),
        "structural changes": _private("STRUCTURAL", "Structural lesions of sacroiliac joints"),
        "active inflammatory changes": _private("ACTIVE-INFL", "Active inflammatory lesions of sacroiliac joints"),
        # A slice's weight in a MIL attention pooling: not a class activation (130402), which
        # is a pixel map; no code found for attention.
        "attention weight": _private("ATTN-WEIGHT", "Attention weight"),
        # The share of a Grad-CAM map inside one joint box. The map itself is 130403; its share
        # in a region has no code. Reported as explanation (130401), never as a finding.
        "share of Grad-CAM in joint box": _private("CAM-SHARE", "Share of Grad-CAM in joint box"),
        # A joint line a contouring network traced (t1stir-quadrants): the structure is the
        # sacroiliac joint (39723000), but a finding type of "Sacroiliac joint" would read as a
        # finding; no code for "contour of a joint line" was found.
        "joint line contour": _private("JOINT-LINE", "Sacroiliac joint line contour"),
        # The traced contour's length (TID 300 in the TID 1410 group).
        "length": Concept("410668003", "SCT", "Length"),
        "millimetre": Concept("mm", "UCUM", "mm"),  # pydicom's codes.UCUM.Millimeter
    }
)


def concept(name: str) -> Concept:
    """The coded concept for ``name`` (a key of :data:`CODES`); KeyError names the known keys."""
    try:
        return CODES[name]
    except KeyError:
        raise KeyError(f"no code named {name!r}; known: {', '.join(sorted(CODES))}") from None


def coded(item: Concept) -> hd.sr.CodedConcept:
    """The highdicom form of a concept (the one the SR, SC and PM builders take)."""
    return hd.sr.CodedConcept(value=item.value, scheme_designator=item.scheme, meaning=item.meaning)


def site_code(site: Site) -> Concept:
    return concept(site.value)


def laterality_code(laterality: Laterality) -> Concept:
    return concept(laterality.value)


def region_code(region: Region) -> Concept:
    """Upper/lower quadrant → the SNOMED CT topographical modifier superior/inferior."""
    return concept({Region.UPPER: "superior", Region.LOWER: "inferior"}[region])


def presence_code(present: bool) -> Concept:
    return concept("present" if present else "absent")


def map_quantity_code(meaning: MapMeaning) -> Concept:
    """The Parametric Map quantity for a map's meaning."""
    return concept(
        {
            MapMeaning.ATTENTION: "class activation",
            MapMeaning.GRAD_CAM: "gradient-weighted class activation",
            MapMeaning.SEGMENTATION: "fractional probabilistic segmentation",
        }[meaning]
    )


def procedure_code_for_modality(modality: str) -> Concept:
    """A CID 100 procedure for a source modality, for sources without a ProcedureCodeSequence."""
    by_modality = {"MR": "MRI unspecified body region", "CT": "CT unspecified body region"}
    # Radiographs (CR/DX) and anything else: CID 100 has no radiograph code in our dictionary.
    return concept(by_modality.get(modality, "imaging procedure"))


_CID_100_PROCEDURES = (
    "MRI unspecified body region",
    "CT unspecified body region",
    "imaging procedure",
)


def is_cid_100_procedure(value: str, scheme: str) -> bool:
    """Whether a procedure code is one of the CID 100 codes in our table."""
    return any(
        (concept(name).value, concept(name).scheme) == (value, scheme)
        for name in _CID_100_PROCEDURES
    )


def coding_scheme_identification(schemes: set[str]) -> list[Dataset]:
    """CodingSchemeIdentificationSequence items for the private schemes among ``schemes``."""
    declared = {
        PRIVATE_SCHEME: (PRIVATE_SCHEME_NAME, PRIVATE_SCHEME_RESPONSIBLE),
        IHE_SCHEME: (IHE_SCHEME_NAME, IHE_SCHEME_RESPONSIBLE),
    }
    items = []
    for designator in sorted(schemes & declared.keys()):
        name, responsible = declared[designator]
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = responsible
        items.append(item)
    return items
