"""The model card logged with every registered model: what it was trained on (with the data's
checksum), what it outputs, how well it did per class and per frequency group on validation,
its decision thresholds when it has them, and what it is not for."""

from __future__ import annotations

import math


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def model_card(
    *,
    model_name: str,
    loss: str,
    run_id: str,
    dataset: dict,
    label_names,
    groups,
    train_counts,
    per_class_ap,
    metrics: dict,
    epoch: int,
    image_size: int,
    thresholds: dict | None = None,
    calibration: dict | None = None,
) -> str:
    """Markdown. ``dataset``: source/format, dataset_sha256 and per-split image counts."""
    lines = [
        f"# Model card: {model_name} trained with {loss}",
        "",
        f"MLflow run `{run_id}`, best epoch {epoch}. Input: a chest radiograph (PNG, JPEG or DICOM bytes, or "
        f"uint8 grayscale pixels of any size); the model pads it to a square and resizes it to {image_size} px. "
        "Output: one independent probability per finding (multi-label), in the order below.",
        "",
        "## Data",
        "",
        f"- source: {dataset.get('source', 'n/a')} (format `{dataset.get('format', 'n/a')}`)",
        f"- dataset_sha256: `{dataset.get('dataset_sha256', 'n/a')}`",
        f"- images: {dataset.get('num_train', 'n/a')} training, {dataset.get('num_val', 'n/a')} validation",
        "",
        "## Validation",
        "",
        f"- mAP {_fmt(metrics.get('val_mAP'))}, AUROC {_fmt(metrics.get('val_AUROC'))}",
        f"- by training frequency: head mAP {_fmt(metrics.get('val_mAP_head'))}, medium "
        f"{_fmt(metrics.get('val_mAP_medium'))}, tail {_fmt(metrics.get('val_mAP_tail'))}",
        "",
        "| finding | group | training images | validation AP |" + (" threshold |" if thresholds else ""),
        "|---|---|---:|---:|" + ("---:|" if thresholds else ""),
    ]
    for name, g, n, ap in zip(label_names, groups, train_counts, per_class_ap):
        row = f"| {name} | {g} | {int(n)} | {_fmt(ap)} |"
        if thresholds:
            row += f" {_fmt(thresholds.get(name))} |"
        lines.append(row)
    lines += [
        "",
        "## Intended use and limits",
        "",
        "- A research model for ranking chest radiographs by the probability of each finding, for review by "
        "qualified readers. It is not a medical device and must not be used alone to diagnose or to rule out.",
        (
            f"- Probabilities are calibrated on validation ({calibration['method']} scaling); calibration keeps "
            "every finding's ranking. Rare findings (the tail group) are the least reliable."
            if calibration and calibration.get("method", "none") != "none"
            else "- Probabilities are scores from a multi-label classifier trained on the data above, not calibrated; "
            "rare findings (the tail group) are the least reliable."
        ),
        "- Performance was measured on the validation split of the same source only; other hospitals, devices, "
        "views (e.g. portable AP films) and populations may differ. Validate locally before any use.",
        "- No thresholds are part of this model unless a threshold column is shown above."
        if not thresholds
        else "- The thresholds above were chosen on validation; re-check them on local data.",
        "",
    ]
    return "\n".join(lines)
