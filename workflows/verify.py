"""Check a prepared dataset against its manifest: the dataset checksum against the shard list,
every shard's SHA-256, the label width and the image size. Training and prediction run the same
check (hashing each shard file once per version); this command re-hashes every shard."""

from __future__ import annotations

import sys

from workflows.cli import main_for

DESCRIPTION = "Verify a prepared dataset (manifest.json and every shard's checksum)."


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset folder (manifest.json)")


def run(args) -> int:
    from components.data.manifest import Manifest

    manifest = Manifest.load(args.data)
    hashed = manifest.verify(full=True)
    images = sum(s.num_images for s in manifest.splits.values())
    print(f"verify: dataset {manifest.dataset_sha256[:12]} in {args.data}: {hashed} shards, {images} images: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
