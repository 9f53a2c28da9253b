"""Prepare a real chest X-ray dataset (or a synthetic one) for training: resize the images,
store JPEG bytes + labels in Parquet shards, write manifest.json. Runs the shards in parallel
as Ray Data tasks across the cluster's CPUs; re-running resumes (finished shards are skipped)."""

from __future__ import annotations

import sys

from workflows.cli import add_address_flag, main_for

DESCRIPTION = "Read CXR-LT/NIH/CheXpert data and write Parquet shards + manifest.json (resumable)."


def add_arguments(parser) -> None:
    from components.data.prepare import PrepareOptions
    from components.flags import add_dataclass_flags

    add_dataclass_flags(parser, PrepareOptions)
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--local", action="store_true", help="process shards in this process, without Ray")
    add_address_flag(parser)


def run(args) -> int:
    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.flags import dataclass_values
    from components.runtime import init_ray, map_with_ray_data

    if not args.local:
        init_ray(args.address)
    opts = PrepareOptions(**dataclass_values(args, PrepareOptions))
    manifest = prepare_dataset(opts, args.out, map_shards=None if args.local else map_with_ray_data)
    groups = manifest.group_list()
    splits = ", ".join(f"{k} {v.num_images}" for k, v in manifest.splits.items())
    print(
        f"prepare: dataset {manifest.dataset_sha256[:12]} in {args.out}: {splits}; {len(groups)} classes "
        f"({groups.count('head')} head, {groups.count('medium')} medium, {groups.count('tail')} tail)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
