"""Vendor flavour: how Siemens, GE, Philips and Canon name and describe the same series.

The values follow what these scanners typically write, so that series classifiers can
be tested against realistic headers.  The vendor of a study rotates with its seed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MRSequence:
    """Header flavour and timing ranges of one MR sequence on one vendor."""

    description: str  # SeriesDescription
    protocol: str  # ProtocolName
    sequence_name: str  # SequenceName
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    image_type: tuple[str, ...]
    repetition_ms: tuple[float, float]
    echo_ms: tuple[float, float]
    echo_train: int
    flip_deg: float
    inversion_ms: dict[float, tuple[float, float]] | None = None  # by field strength


@dataclass(frozen=True)
class MRScanner:
    model: str
    field_tesla: float
    software: str


@dataclass(frozen=True)
class Vendor:
    """Everything vendor-specific the generator writes."""

    name: str  # short name used in the ground truth: Siemens, GE, Philips, Canon
    manufacturer: str  # the (0008,0070) string
    mr_scanners: tuple[MRScanner, ...]
    mr: dict[str, MRSequence]
    mr_body_part: str
    mr_max_value: tuple[int, int]  # typical brightest stored value range
    mr_bits_stored: int
    ct_model: str
    ct_software: str
    ct_kernel: str
    ct_description: str  # format string with {thickness}
    ct_bits_stored: int
    xr_manufacturer: str
    xr_model: str
    xr_software: str
    xr_description: str
    xr_pixel_pitch_mm: float
    xr_detector_type: str  # DIRECT or SCINTILLATOR
    station: str
    institution: str = "SIJNODE SYNTHETIC HOSPITAL"
    coronal_ascending: bool = True  # slice order: towards posterior (True) or anterior
    axial_ascending: bool = False  # slice order: towards head (True) or feet


SIEMENS = Vendor(
    name="Siemens",
    manufacturer="SIEMENS",
    mr_scanners=(MRScanner("MAGNETOM Aera", 1.5, "syngo MR E11"), MRScanner("MAGNETOM Vida", 3.0, "syngo MR XA50")),
    mr={
        "T1": MRSequence("t1_tse_cor", "t1_tse_cor", "*tse2d1_3", ("SE",), ("SK", "SP", "OSP"), (),
                         ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), (550, 750), (10, 13), 3, 150),
        "STIR": MRSequence("t2_tirm_cor", "t2_tirm_cor", "*tir2d1_15", ("SE", "IR"), ("SK", "SP", "MP"), ("IR",),
                           ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), (3500, 5000), (38, 60), 15, 150,
                           {1.5: (145, 160), 3.0: (210, 230)}),
        "T2FS": MRSequence("t2_tse_tra_fs", "t2_tse_tra_fs", "*tse2d1_11", ("SE",), ("SK", "SP", "OSP"), ("FS",),
                           ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), (2220, 2220), (66, 66), 11, 150),
    },
    mr_body_part="PELVIS",
    mr_max_value=(900, 1600),
    mr_bits_stored=12,
    ct_model="SOMATOM Force",
    ct_software="syngo CT VB20A",
    ct_kernel="Br64",
    ct_description="SIJ {thickness:.1f} Br64 bone",
    ct_bits_stored=12,
    xr_manufacturer="SIEMENS",
    xr_model="Ysio Max",
    xr_software="VF11",
    xr_description="Pelvis a.p.",
    xr_pixel_pitch_mm=0.148,
    xr_detector_type="SCINTILLATOR",
    station="SIJ-MRC40123",
    coronal_ascending=True,
    axial_ascending=False,
)

GE = Vendor(
    name="GE",
    manufacturer="GE MEDICAL SYSTEMS",
    mr_scanners=(MRScanner("SIGNA Explorer", 1.5, "27\\LX\\MR Software release:RX27.0_R02"),
                 MRScanner("SIGNA Architect", 3.0, "29\\LX\\MR Software release:MR29.1_EA")),
    mr={
        "T1": MRSequence("Cor T1 FSE", "SI JOINTS", "fse-xl", ("SE",), ("SK",), ("FAST_GEMS",),
                         ("ORIGINAL", "PRIMARY", "OTHER"), (450, 650), (8, 12), 3, 111),
        "STIR": MRSequence("Cor STIR", "SI JOINTS", "fse-ir", ("SE", "IR"), ("SK", "MP"), ("FAST_GEMS", "IR_GEMS"),
                           ("ORIGINAL", "PRIMARY", "OTHER"), (3800, 5500), (40, 55), 12, 111,
                           {1.5: (145, 160), 3.0: (200, 225)}),
        "T2FS": MRSequence("Ax T2 FSE FS", "SI JOINTS", "fse-xl", ("SE",), ("SK",), ("FAST_GEMS", "FS"),
                           ("ORIGINAL", "PRIMARY", "OTHER"), (2500, 4200), (60, 80), 14, 111),
    },
    mr_body_part="SIJ",
    mr_max_value=(2000, 4000),
    mr_bits_stored=16,
    ct_model="Revolution CT",
    ct_software="revo_ct_22bw.32",
    ct_kernel="BONE",
    ct_description="BONE {thickness:.2f}mm",
    ct_bits_stored=16,
    xr_manufacturer="GE Healthcare",
    xr_model="Definium 656 HD",
    xr_software="DM_Platform_Release_Version 11.1",
    xr_description="PELVIS AP",
    xr_pixel_pitch_mm=0.2,
    xr_detector_type="SCINTILLATOR",
    station="GEMR1",
    coronal_ascending=False,
    axial_ascending=False,
)

PHILIPS = Vendor(
    name="Philips",
    manufacturer="Philips Medical Systems",
    mr_scanners=(MRScanner("Ingenia", 1.5, "5.4.1\\5.4.1.0"), MRScanner("Achieva dStream", 3.0, "5.3.1\\5.3.1.1")),
    mr={
        "T1": MRSequence("T1W_TSE_COR", "T1W_TSE_COR", "TSE", ("SE",), ("SK",), (),
                         ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), (450, 700), (8, 15), 4, 90),
        "STIR": MRSequence("STIR_COR", "STIR_COR", "IR_TSE", ("IR",), ("SK",), ("IR",),
                           ("ORIGINAL", "PRIMARY", "M_IR", "M", "IR"), (3000, 4500), (50, 70), 14, 90,
                           {1.5: (160, 170), 3.0: (220, 230)}),
        "T2FS": MRSequence("T2W_TSE_SPAIR_TRA", "T2W_TSE_SPAIR_TRA", "TSE", ("SE",), ("SK",), ("FS",),
                           ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), (2500, 4000), (70, 90), 16, 90),
    },
    mr_body_part="SIJ",
    mr_max_value=(1500, 3500),
    mr_bits_stored=12,
    ct_model="IQon - Spectral CT",
    ct_software="4.7.5",
    ct_kernel="YB",
    ct_description="Bone {thickness:.1f}mm",
    ct_bits_stored=12,
    xr_manufacturer="Philips Medical Systems",
    xr_model="DigitalDiagnost C90",
    xr_software="1.4.3",
    xr_description="Pelvis AP",
    xr_pixel_pitch_mm=0.148,
    xr_detector_type="SCINTILLATOR",
    station="PHMR01",
    coronal_ascending=True,
    axial_ascending=True,
)

CANON = Vendor(
    name="Canon",
    manufacturer="CANON_MEC",
    mr_scanners=(MRScanner("Vantage Orian", 1.5, "V6.0*R006"), MRScanner("Vantage Galan 3T", 3.0, "V7.0*R004")),
    mr={
        "T1": MRSequence("T1 FSE COR", "SIJ T1 FSE COR", "FSE", ("SE",), ("SK",), (),
                         ("ORIGINAL", "PRIMARY", "OTHER"), (450, 650), (10, 14), 3, 90),
        "STIR": MRSequence("STIR COR", "SIJ STIR COR", "FSE_IR", ("SE", "IR"), ("SK", "MP"), ("IR",),
                           ("ORIGINAL", "PRIMARY", "OTHER"), (4000, 5500), (40, 60), 13, 90,
                           {1.5: (150, 165), 3.0: (210, 230)}),
        "T2FS": MRSequence("T2 FSE FS AX", "SIJ T2 FSE FS AX", "FSE", ("SE",), ("SK",), ("FS",),
                           ("ORIGINAL", "PRIMARY", "OTHER"), (3000, 4500), (70, 85), 15, 90),
    },
    mr_body_part="PELVIS",
    mr_max_value=(1000, 2500),
    mr_bits_stored=12,
    ct_model="Aquilion ONE",
    ct_software="V10.6",
    ct_kernel="FC30",
    ct_description="SIJ BONE {thickness:.1f}",
    ct_bits_stored=12,
    xr_manufacturer="CANON_MEC",
    xr_model="RADREX-i",
    xr_software="V5.00",
    xr_description="SIJ AP",
    xr_pixel_pitch_mm=0.16,
    xr_detector_type="SCINTILLATOR",
    station="CMSMR1",
    coronal_ascending=False,
    axial_ascending=True,
)

VENDORS: tuple[Vendor, ...] = (SIEMENS, GE, PHILIPS, CANON)


def vendor_for_seed(seed: int) -> Vendor:
    """Vendors rotate with the seed: 0 Siemens, 1 GE, 2 Philips, 3 Canon, 4 Siemens, ..."""
    return VENDORS[seed % len(VENDORS)]
