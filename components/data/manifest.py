"""The prepared dataset's contract: ``manifest.json``, loaded once into a typed ``Manifest`` and
passed to every stage (training, tuning, prediction) instead of a folder path and string keys.

``label_names`` orders every label vector (the columns of ``labels``/``mask`` in the shards and
of the model's output); ``groups`` gives each label's head/medium/tail group from its training
frequency; ``dataset_sha256`` identifies the content (labels + shard checksums).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SplitStats:
    num_images: int
    num_patients: int
    class_counts: dict[str, int]  # positives per label (labelled ones only)
    labeled_counts: dict[str, int]  # images whose label is known (mask 1)


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset folder
    split: str
    num_rows: int
    sha256: str


@dataclass
class Manifest:
    dataset_sha256: str
    label_names: list[str]
    groups: dict[str, str]
    image_size: int
    splits: dict[str, SplitStats]
    shards: list[ShardInfo]
    source: dict
    options: dict
    created_unix: int
    channels: int = 1
    num_rejects: int = 0
    manifest_version: int = MANIFEST_VERSION
    root: str = field(default="", compare=False)  # the folder it was loaded from; not stored

    @classmethod
    def load(cls, data_dir: str | Path) -> Manifest:
        path = Path(data_dir) / MANIFEST
        if not path.is_file():
            raise UserError(
                f"{data_dir}: no {MANIFEST} (not a prepared dataset, or preparation did not finish; "
                "run `ralflow prepare`)"
            )
        try:
            return cls.from_dict(json.loads(path.read_text()), root=str(data_dir))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a valid ralflow manifest ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_dict(cls, d: dict, root: str = "") -> Manifest:
        names = {f.name for f in dataclasses.fields(cls)} - {"splits", "shards", "root"}
        return cls(
            **{k: v for k, v in d.items() if k in names},
            splits={k: SplitStats(**v) for k, v in d["splits"].items()},
            shards=[ShardInfo(**s) for s in d["shards"]],
            root=root,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("root")
        return d

    def write(self, data_dir: str | Path) -> None:
        """Write ``manifest.json`` atomically: its presence means the dataset is complete."""
        path = Path(data_dir) / MANIFEST
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    def split(self, name: str) -> SplitStats:
        if name not in self.splits:
            raise UserError(
                f"{self.root}: the prepared dataset has no '{name}' split (it has: {', '.join(self.splits)})"
            )
        return self.splits[name]

    def class_counts(self, split: str = "train") -> list[int]:
        """Positives per label of ``split``, in label order."""
        counts = self.split(split).class_counts
        return [counts[n] for n in self.label_names]

    def group_list(self) -> list[str]:
        """Each label's frequency group, in label order."""
        return [self.groups[n] for n in self.label_names]

    def check_shards(self) -> None:
        """Cheap consistency check (one shard per split, its schema only): the shards' label
        vectors have one value per label name."""
        import pyarrow.fs
        import pyarrow.parquet as pq

        for split in self.splits:
            path = self.shard_paths(split)[0]
            fs, inner = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)
            try:
                with fs.open_input_file(inner) as f:
                    width = pq.read_schema(f).field("labels").type.list_size
            except (OSError, KeyError, AttributeError) as exc:
                raise UserError(f"{path}: not a readable ralflow shard ({type(exc).__name__}: {exc})") from None
            if width != len(self.label_names):
                raise UserError(
                    f"{path}: labels have {width} values but {MANIFEST} lists {len(self.label_names)} label names; "
                    "prepare the dataset again"
                )

    def shard_paths(self, split: str) -> list[str]:
        """Paths (or URIs) of the split's non-empty shards."""
        root = self.root.rstrip("/")
        paths = [f"{root}/{s.path}" for s in self.shards if s.split == split and s.num_rows > 0]
        if not paths:
            raise UserError(f"{self.root}: the prepared dataset has no '{split}' images")
        return paths
