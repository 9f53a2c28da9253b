"""Write a synthetic chest X-ray dataset in the real CXR-LT 2023 format (train.csv,
development.csv and JPEGs in a MIMIC-CXR-JPG-like folder tree), deterministic given --seed."""
from __future__ import annotations

import sys
import time

from workflows.common import main_for

DESCRIPTION = "Write a synthetic CXR-LT-2023-format dataset (CSV files + JPEG images)."


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (the dataset root)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-noise", type=float, default=0.02, help="rate of missed (and spurious) labels in the CSV")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="patients in development.csv")
    parser.add_argument("--workers", type=int, default=0, help="processes (0 = all CPUs)")


def run(args) -> int:
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt

    t0 = time.perf_counter()
    opts = SynthOptions(num_images=args.num_images, image_size=args.image_size, seed=args.seed,
                        label_noise=args.label_noise, val_fraction=args.val_fraction, workers=args.workers)
    summary = write_synthetic_cxr_lt(args.out, opts)
    print(f"synth: wrote {summary['train']} train + {summary['development']} development images "
          f"({summary['labels_per_image']:.2f} labels/image) to {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
