"""Prepare a real chest X-ray dataset (or a synthetic one) for training: resize the images,
store JPEG bytes + labels in Parquet shards, write manifest.json. Runs the shards in parallel
as Ray Data tasks across the cluster's CPUs; re-running resumes (finished shards are skipped)."""
from __future__ import annotations

import sys

from workflows.common import main_for

DESCRIPTION = "Read CXR-LT/NIH/CheXpert data and write Parquet shards + manifest.json (resumable)."


def add_arguments(parser) -> None:
    from components.data.readers import FORMATS

    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--source", required=True, help="dataset root holding its CSV files and images")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--image-size", type=int, default=512, help="stored image side in pixels")
    parser.add_argument("--resize", default="pad", choices=("pad", "crop"), help="keep aspect: pad to square, or center-crop")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--rows-per-shard", type=int, default=1024)
    parser.add_argument("--row-group-size", type=int, default=256)
    parser.add_argument("--uncertain", default="zeros", choices=("ones", "zeros", "ignore"), help="CheXpert -1 policy")
    parser.add_argument("--blank", default="zeros", choices=("ones", "zeros", "ignore"), help="CheXpert blank policy")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="patient-level split where the format has none")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--head-threshold", type=float, default=0.10, help="head class: >= this training frequency")
    parser.add_argument("--tail-threshold", type=float, default=0.01, help="tail class: < this training frequency")
    parser.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of rejecting it")
    parser.add_argument("--local", action="store_true", help="process shards in this process, without Ray")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray)")


def run(args) -> int:
    from components.data.prepare import PrepareOptions, prepare_dataset
    from workflows.raylib import init_ray, map_with_ray_data

    opts = PrepareOptions(
        format=args.format, source=args.source, image_size=args.image_size, resize=args.resize,
        jpeg_quality=args.jpeg_quality, rows_per_shard=args.rows_per_shard, row_group_size=args.row_group_size,
        uncertain=args.uncertain, blank=args.blank, val_fraction=args.val_fraction, split_seed=args.split_seed,
        head_threshold=args.head_threshold, tail_threshold=args.tail_threshold, strict=args.strict,
    )
    mapper = None
    if not args.local:
        init_ray(args.address)
        mapper = map_with_ray_data
    manifest = prepare_dataset(opts, args.out, map_shards=mapper)
    groups = list(manifest["groups"].values())
    print(f"prepare: dataset {manifest['dataset_sha256'][:12]} in {args.out}: "
          + ", ".join(f"{k} {v['num_images']}" for k, v in manifest["splits"].items())
          + f"; {len(groups)} classes ({groups.count('head')} head, {groups.count('medium')} medium, {groups.count('tail')} tail)")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
