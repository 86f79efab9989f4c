"""CT attenuation per tissue and contrast phase, liver lesion kinds, and the acquisition ranges of the synthetic CT.

The values are typical published figures for adult abdominal CT at 120 kVp, rounded (sources in docs/demo.md,
"The synthetic CT"): unenhanced tissue from radiology references (fat -100, muscle 50, liver 55-65, spleen 45-50,
kidney 30-35, blood 40-45, water 0-15 HU), arterial and portal-venous enhancement from multiphase liver CT protocols
(aorta 250-350 HU in the late arterial phase, 150-180 in the portal-venous; liver +10-20 arterial and +50 portal-venous
over unenhanced). Each case jitters every value (`case_hu`), so no tissue has one fixed number.
"""
from __future__ import annotations

import numpy as np

PHASES = ("non-contrast", "arterial", "portal-venous")
PHASE_SHARE = (0.15, 0.25, 0.60)  # LiTS and Task03 are mostly portal-venous scans; some arterial and unenhanced

# tissue: mean HU in the (non-contrast, arterial, portal-venous) phase
HU: dict[str, tuple[float, float, float]] = {
    "air": (-1000, -1000, -1000),
    "gas": (-950, -950, -950),  # bowel and stomach gas (partial volume keeps it above -1000)
    "lung": (-860, -860, -860),
    "fat": (-100, -100, -100),
    "muscle": (50, 55, 60),
    "liver": (60, 75, 110),
    "spleen": (48, 120, 115),
    "kidney_cortex": (33, 180, 160),
    "kidney_medulla": (33, 70, 150),  # corticomedullary difference in the arterial phase
    "pancreas": (45, 120, 100),
    "aorta": (42, 300, 160),
    "ivc": (40, 70, 130),  # unopacified below the renal veins in the arterial phase
    "portal_vein": (42, 110, 175),
    "hepatic_vein": (40, 55, 150),
    "heart_blood": (42, 260, 150),
    "myocardium": (45, 120, 105),
    "bowel_wall": (40, 80, 90),
    "bowel_content": (20, 20, 20),
    "stomach_fluid": (10, 10, 10),
    "bile": (8, 8, 8),  # gallbladder
    "urine": (8, 8, 12),
    "cyst": (5, 5, 5),  # simple hepatic cysts: water, labelled liver (not tumour)
    "csf": (10, 10, 10),
    "disc": (85, 85, 85),
    "cancellous_bone": (220, 220, 220),
    "cortical_bone": (800, 800, 800),
}

# lesion kind: (share, HU relative to the liver per phase, rim enhancement possible, necrotic core possible)
LESIONS: dict[str, tuple[float, tuple[float, float, float], bool, bool]] = {
    "hypovascular metastasis": (0.55, (-18, -25, -40), True, True),  # colorectal-type: hypodense, rim in A/PV
    "hepatocellular carcinoma": (0.30, (-12, 35, -18), False, True),  # arterial hyperenhancement, PV washout
    "hypervascular metastasis": (0.15, (-8, 45, 8), False, False),  # neuroendocrine-type: bright in the arterial phase
}
# a labelled lesion is one its reader saw: LiTS' and Task03's masks were drawn on the scan itself (one phase), so a
# lesion iso-attenuating in its scan's phase is not in them. 12 HU is above the 3-10 HU low-contrast targets of CT
# phantoms (Catphan, ACR), which readers see at routine dose only from 5-25 mm across: a floor, not a typical value.
VISIBLE_HU = 12.0
NECROSIS_HU = 20.0  # necrotic centre of a large lesion, absolute
RIM_HU = (15.0, 40.0)  # enhancing rim over the lesion's own value (arterial and portal-venous phases)

# lesions per scan and their size: many small, a few large, some scans with none (the shape of LiTS' lesion
# statistics: 0-75 lesions a scan, most under 10 ml and a long tail of large ones)
NO_TUMOUR_SHARE = 0.12
EXTRA_LESIONS_P = 0.35  # lesions beyond the first: geometric with this success probability (mean ~1.9 more)
MAX_LESIONS = 15  # cap, for generation time
INDEX_DIAMETER_MM = (30.0, 0.6, 10.0, 110.0)  # a scan's first (index) lesion: log-normal median, sigma; clipped
SATELLITE_DIAMETER_MM = (12.0, 0.7, 5.0, 60.0)  # the others: mostly small
CYST_SHARE, CYST_DIAMETER_MM = 0.2, (6.0, 20.0)

# acquisition
NOISE_HU = (10.0, 20.0)  # quantum noise sd at the reference voxel below, by dose (low dose and large patients high)
NOISE_REFERENCE_VOXEL_MM = (5.0, 0.75, 0.75)  # a standard abdominal read: 5 mm slices of 0.75 mm pixels
RECON_BLUR_MM = (0.4, 0.8)  # in-plane reconstruction-kernel blur, Gaussian sigma
SLICE_PROFILE = 0.42  # z blur sigma in slices: a slice as thick as its spacing (partial volume)


def voxel_noise(noise_hu: float, spacing) -> float:
    """Noise sd (HU) of a voxel of `spacing` (mm) for a dose whose noise is `noise_hu` at the reference voxel: white
    noise averages down with the square root of the voxel volume, so 4.5 mm voxels are far quieter than 0.75 mm."""
    return float(noise_hu * np.sqrt(np.prod(NOISE_REFERENCE_VOXEL_MM) / np.prod(np.asarray(spacing, float))))


def draw_phase(rng: np.random.Generator) -> int:
    """Index into PHASES, drawn with PHASE_SHARE."""
    return int(rng.choice(len(PHASES), p=PHASE_SHARE))


def case_hu(phase: int, rng: np.random.Generator) -> dict[str, float]:
    """Every tissue's HU for one case: the phase's value, enhancement scaled by this case's bolus (0.75-1.2) and
    jittered by +-4 HU."""
    bolus = rng.uniform(0.75, 1.2)
    out = {}
    for name, values in HU.items():
        base, v = values[0], values[phase]
        out[name] = float(base + (v - base) * bolus + (rng.uniform(-4, 4) if base > -900 else 0.0))
    return out


def lesion_kind(rng: np.random.Generator) -> str:
    """One lesion kind, drawn with its share."""
    names = list(LESIONS)
    return names[int(rng.choice(len(names), p=[LESIONS[n][0] for n in names]))]


def lesion_count(rng: np.random.Generator) -> int:
    """Lesions in one scan: 0 with NO_TUMOUR_SHARE, else 1 + a geometric number, capped."""
    if rng.random() < NO_TUMOUR_SHARE:
        return 0
    return int(min(MAX_LESIONS, rng.geometric(EXTRA_LESIONS_P)))


def lesion_contrast(kind: str, phase: int, rng: np.random.Generator) -> float:
    """A lesion's HU over the liver: its kind's phase value times 0.7-1.3, at least VISIBLE_HU either way."""
    delta = LESIONS[kind][1][phase] * rng.uniform(0.7, 1.3)
    return float(np.copysign(max(abs(delta), VISIBLE_HU), delta))


def lesion_diameter(rng: np.random.Generator, index: bool) -> float:
    """A lesion's diameter in mm (log-normal, clipped): the index lesion larger, satellites mostly small."""
    median, sigma, lo, hi = INDEX_DIAMETER_MM if index else SATELLITE_DIAMETER_MM
    return float(np.clip(median * np.exp(rng.normal(0, sigma)), lo, hi))
