"""The label contract: named label sets, their canonical order, and how raw label values
(including CheXpert's uncertain ``-1`` and blanks) become float 1/0 targets plus a mask.

Every reader and the training/prediction code go through this module; nothing else
hard-codes a label list or an uncertainty rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# CXR-LT 2023 (MIMIC-CXR-JPG based): 26 labels, alphabetical, with training-set counts.
CXR_LT_2023_COUNTS: dict[str, int] = {
    "Atelectasis": 67597,
    "Calcification of the Aorta": 4361,
    "Cardiomegaly": 76900,
    "Consolidation": 16038,
    "Edema": 38574,
    "Emphysema": 4255,
    "Enlarged Cardiomediastinum": 30119,
    "Fibrosis": 1158,
    "Fracture": 11883,
    "Hernia": 4049,
    "Infiltration": 10218,
    "Lung Lesion": 2533,
    "Lung Opacity": 79931,
    "Mass": 5529,
    "No Finding": 41869,
    "Nodule": 7663,
    "Pleural Effusion": 69240,
    "Pleural Other": 675,
    "Pleural Thickening": 3369,
    "Pneumomediastinum": 788,
    "Pneumonia": 48093,
    "Pneumoperitoneum": 543,
    "Pneumothorax": 14983,
    "Subcutaneous Emphysema": 2453,
    "Support Devices": 89140,
    "Tortuous Aorta": 3499,
}
CXR_LT_2023_NUM_TRAIN = 264_849

# CXR-LT 2024 task 1 (40 labels; "Normal" replaces "No Finding").
CXR_LT_2024 = (
    "Adenopathy",
    "Atelectasis",
    "Azygos Lobe",
    "Calcification of the Aorta",
    "Cardiomegaly",
    "Clavicle Fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged Cardiomediastinum",
    "Fibrosis",
    "Fissure",
    "Fracture",
    "Granuloma",
    "Hernia",
    "Hydropneumothorax",
    "Infarction",
    "Infiltration",
    "Kyphosis",
    "Lobar Atelectasis",
    "Lung Lesion",
    "Lung Opacity",
    "Mass",
    "Nodule",
    "Normal",
    "Pleural Effusion",
    "Pleural Other",
    "Pleural Thickening",
    "Pneumomediastinum",
    "Pneumonia",
    "Pneumoperitoneum",
    "Pneumothorax",
    "Pulmonary Embolism",
    "Pulmonary Hypertension",
    "Rib Fracture",
    "Round(ed) Atelectasis",
    "Subcutaneous Emphysema",
    "Support Devices",
    "Tortuous Aorta",
    "Tuberculosis",
)

NIH = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

CHEXPERT = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "cxr-lt-2023": tuple(CXR_LT_2023_COUNTS),
    "cxr-lt-2024": CXR_LT_2024,
    "nih": NIH,
    "chexpert": CHEXPERT,
}

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


def label_set(name: str) -> tuple[str, ...]:
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set '{name}'; known: {', '.join(LABEL_SETS)}") from None


@dataclass(frozen=True)
class LabelPolicy:
    """How raw CSV label values map to (target, mask).

    ``uncertain`` applies to ``-1``; ``blank`` to an empty cell (CheXpert's "not mentioned").
    ``ignore`` yields target 0 with mask 0, so the loss skips that element.
    """

    uncertain: str = "zeros"
    blank: str = "zeros"

    def __post_init__(self) -> None:
        for field, v in (("uncertain", self.uncertain), ("blank", self.blank)):
            if v not in UNCERTAIN_POLICIES:
                raise ValueError(f"label policy {field}={v!r} is invalid; allowed: {' | '.join(UNCERTAIN_POLICIES)}")

    def convert(self, raw) -> tuple[float, float]:
        """Raw cell -> (target, mask). Raises ValueError for anything but 1, 0, -1 or blank."""
        if raw is None or (isinstance(raw, float) and math.isnan(raw)) or (isinstance(raw, str) and raw.strip() == ""):
            return _apply(self.blank)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"label value {raw!r} is not a number (expected 1, 0, -1 or blank)") from None
        if v == 1:
            return 1.0, 1.0
        if v == 0:
            return 0.0, 1.0
        if v == -1:
            return _apply(self.uncertain)
        raise ValueError(f"label value {raw!r} is not one of 1, 0, -1 or blank")


def _apply(policy: str) -> tuple[float, float]:
    return {"ones": (1.0, 1.0), "zeros": (0.0, 1.0), "ignore": (0.0, 0.0)}[policy]


def frequency_groups(counts, num_images: int, head: float = 0.10, tail: float = 0.01) -> list[str]:
    """Head/medium/tail per class by training-set frequency: head >= ``head``, tail < ``tail``."""
    if not 0 < tail <= head < 1:
        raise ValueError(f"group thresholds must satisfy 0 < tail ({tail}) <= head ({head}) < 1")
    out = []
    for c in counts:
        f = c / max(num_images, 1)
        out.append("head" if f >= head else "tail" if f < tail else "medium")
    return out
