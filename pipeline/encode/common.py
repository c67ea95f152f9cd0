"""What every encoder shares: who made the object, how it is named, and which source it shows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pydicom import Dataset
from pydicom.uid import generate_uid

from pipeline.classify import SIJNODE_MANUFACTURER
from pipeline.encode.codes import coded, coding_scheme_identification, concept
from pipeline.results import ChainResult, ImageRef, Provenance

# The receiver recognizes results coming back by it (pipeline.classify.sijnode_result_evidence).
MANUFACTURER = SIJNODE_MANUFACTURER
# ASCII hyphen: Pillow's built-in font has no en dash, and ISO_IR 100 text has none either.
NOT_FOR_DIAGNOSIS = "AI - not for diagnosis"
DEMONSTRATION = "DEMONSTRATION"

# Value lengths of DICOM's string VRs: LO (SeriesDescription, ManufacturerModelName, ...) and SH
# (LUTLabel). Names we write where a reader expects an LO-sized name get the LO limit too.
LONG_STRING_MAX = 64
SHORT_STRING_MAX = 16


def device_uid(provenance: Provenance) -> str:
    """A UID for the pack build: the same build always gets the same one, a new build a new one."""
    return generate_uid(entropy_srcs=[provenance.device_uid_seed])


def derived_uid(*parts: str) -> str:
    """A UID determined by ``parts``: re-encoding the same thing reproduces it."""
    return generate_uid(entropy_srcs=list(parts))


def algorithm_label(provenance: Provenance) -> str:
    """'<pack name> <pack version>', the algorithm as readers and PACS lists see it."""
    return f"{provenance.pack_name} {provenance.pack_version}"


def series_description(provenance: Provenance, kind: str, version: int = 1, custom: str | None = None) -> str:
    """A SeriesDescription naming the algorithm (or the site's ``custom`` name) and the result
    version ("result 2"), led by the demo mark if any.

    The demo mark goes first and the result version last, so that truncation to the 64
    characters of LO drops neither: PACS users tell the current result by that number.
    """
    mark = f"{DEMONSTRATION} " if provenance.demonstration else ""
    suffix = f" result {version}"
    text = f"{mark}{custom or f'AI {kind} {algorithm_label(provenance)}'}"
    return text[: LONG_STRING_MAX - len(suffix)] + suffix


def demonstration_notice(provenance: Provenance) -> str:
    return (
        f"{DEMONSTRATION}: produced by the demonstration pack {algorithm_label(provenance)}. "
        "Its results are illustrative only and must not be used for diagnosis."
    )


def algorithm_equipment(provenance: Provenance) -> Dataset:
    """The IHE AI Results contributing-equipment item that identifies the algorithm.

    Hand-written: highdicom's ContributingEquipment accepts only DCM purposes of reference and
    has no Device UID, and IHE AIR needs (Newcode1, 99IHE, "Processing Algorithm") and one.
    """
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [coded(concept("processing algorithm"))]
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = provenance.pack_name[:LONG_STRING_MAX]
    item.SoftwareVersions = provenance.pack_version[:LONG_STRING_MAX]
    item.DeviceUID = device_uid(provenance)
    return item


def add_algorithm_equipment(dataset: Dataset, provenance: Provenance) -> None:
    """Append the algorithm item to the ContributingEquipmentSequence highdicom wrote."""
    existing = list(dataset.get("ContributingEquipmentSequence", []))
    dataset.ContributingEquipmentSequence = [*existing, algorithm_equipment(provenance)]


def _coding_schemes(dataset: Dataset) -> Iterator[str]:
    for element in dataset:
        if element.keyword == "CodingSchemeDesignator":
            yield str(element.value)
        elif element.VR == "SQ":
            for item in element.value:
                yield from _coding_schemes(item)


def declare_private_schemes(dataset: Dataset, sources: Sequence[Dataset] = ()) -> None:
    """Declare, in CodingSchemeIdentificationSequence, each private scheme the object uses:
    ours and IHE's from our table, a site's (e.g. of a copied procedure code) from the sources'
    own declarations."""
    used = set(_coding_schemes(dataset))
    items = coding_scheme_identification(used)
    declared = {str(item.CodingSchemeDesignator) for item in items}
    for source in sources:
        for item in source.get("CodingSchemeIdentificationSequence", []):
            designator = str(item.get("CodingSchemeDesignator", ""))
            if designator in used and designator not in declared:
                items.append(item)
                declared.add(designator)
    if items:
        dataset.CodingSchemeIdentificationSequence = items


def find_source(result: ChainResult, ref: ImageRef) -> Dataset:
    """The source an ImageRef points at; ValueError when the chain referenced a stranger."""
    for source in result.sources:
        if str(source.SOPInstanceUID) == ref.sop_instance_uid:
            return source
    raise ValueError(f"image {ref.sop_instance_uid} is not among the result's sources")


def image_laterality(source: Dataset) -> str:
    """The source's laterality if it states one, else B (both): a sacroiliac image shows both
    sides. (The SC needs one of Laterality and ImageLaterality; ImageLaterality is per image.)"""
    for keyword in ("ImageLaterality", "Laterality"):
        if source.get(keyword):
            return str(source.get(keyword))
    return "B"


def instance_number(source: Dataset) -> str:
    """The source's InstanceNumber as readers see it in PACS ('?' when it has none)."""
    number = source.get("InstanceNumber")
    return str(number) if number not in (None, "") else "?"


def instance_uids(series_instance_uid: str, count: int) -> list[str]:
    """SOP Instance UIDs for a series: derived from the series UID, so a retry reproduces them."""
    return [derived_uid(series_instance_uid, str(number)) for number in range(1, count + 1)]
