"""The prepared dataset's contract: ``manifest.json``, loaded once into a typed ``Manifest`` and
passed to every stage (training, tuning, prediction) instead of a folder path and string keys.

``label_names`` orders every label vector (the columns of ``labels``/``mask`` in the shards and
of the model's output); ``groups`` gives each label's head/medium/tail group from its training
frequency; ``dataset_sha256`` identifies the content (labels + shard checksums).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, first_line
from ..paths import filesystem_for

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
VERIFIED = ".verified.json"  # shards whose SHA-256 was checked, by size and modification time


def dataset_checksum(label_names: list[str], shard_sha256s: list[str]) -> str:
    """A dataset's identity: its label names and its shards' checksums."""
    return hashlib.sha256(json.dumps([list(label_names), list(shard_sha256s)]).encode()).hexdigest()


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
        """The manifest of a local folder or of a URI pyarrow reads (``s3://``, ``gs://``,
        ``file://``): training and prediction read shards where they are."""
        root = str(data_dir)
        where = f"{root.rstrip('/')}/{MANIFEST}"
        try:
            fs, inner = filesystem_for(where)
            with fs.open_input_stream(inner) as f:
                text = f.read().decode()
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(
                f"{data_dir}: no {MANIFEST} (not a prepared dataset, or preparation did not finish; "
                "run `ralflow prepare`)"
            ) from None
        except (OSError, ValueError) as exc:  # an unknown scheme, a bucket not reachable, no credentials
            raise UserError(f"{where}: cannot read it ({first_line(exc)})") from None
        try:
            return cls.from_dict(json.loads(text), root=root)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{where}: not a valid ralflow manifest ({type(exc).__name__}: {exc})") from None

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
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2))

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

    def verify(self, full: bool = False) -> int:
        """Check that the dataset is what its manifest says, before any training on it: the
        checksum against the shard list, each shard's SHA-256 (once per file version: the shards
        checked are remembered, see ``verified_records``; ``full`` checks all again),
        the label width and the image size. Returns how many shards were hashed now."""
        where = f"{self.root}/{MANIFEST}"
        if dataset_checksum(self.label_names, [s.sha256 for s in self.shards]) != self.dataset_sha256:
            raise UserError(
                f"{where}: dataset_sha256 does not match its label names and shard checksums (edited?); "
                "prepare the dataset again"
            )
        records = verified_records(self.root)
        cache = {}  # a shard's entry counts only while its size and time still match: any record will do
        for record in records if not full else []:
            cache.update(read_json_object(record) or {})
        hashed = 0
        for shard in self.shards:
            path = f"{self.root.rstrip('/')}/{shard.path}"
            fs, inner = filesystem_for(path)
            info = fs.get_file_info(inner)
            if info.size is None:
                raise UserError(f"{path}: shard listed in {MANIFEST} is missing; prepare the dataset again")
            stamp = [info.size, info.mtime_ns, shard.sha256] if info.mtime_ns is not None else None
            if stamp is not None and cache.get(shard.path) == stamp:
                continue
            h = hashlib.sha256()
            with fs.open_input_stream(inner) as f:
                while block := f.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != shard.sha256:
                raise UserError(
                    f"{path}: its SHA-256 differs from {MANIFEST} (the file changed or is corrupt); "
                    "prepare the dataset again"
                )
            cache[shard.path] = stamp
            hashed += 1
        for record in records if hashed else []:
            try:
                record.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomically(record, json.dumps(cache))
                break
            except OSError:  # a read-only dataset: this user's cache instead
                continue
        self.check_shards()
        return hashed

    def check_shards(self) -> None:
        """Cheap consistency check (one shard per split, its schema only): the shards' label
        vectors have one value per label name."""
        import pyarrow.parquet as pq

        for split in self.splits:
            path = self.shard_paths(split)[0]
            fs, inner = filesystem_for(path)
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
        self._check_image_size()

    def _check_image_size(self) -> None:
        import io

        import pyarrow.parquet as pq
        from PIL import Image

        path = self.shard_paths(self.shards[0].split)[0]
        fs, inner = filesystem_for(path)
        with fs.open_input_file(inner) as f:
            first = pq.ParquetFile(f).read_row_group(0, columns=["image"]).column("image")[0].as_py()
        size = Image.open(io.BytesIO(first)).size
        if size != (self.image_size, self.image_size):
            raise UserError(
                f"{path}: images are {size[0]}x{size[1]} px but {MANIFEST} says image_size {self.image_size}; "
                "prepare the dataset again"
            )

    def shard_paths(self, split: str) -> list[str]:
        """Paths (or URIs) of the split's non-empty shards."""
        root = self.root.rstrip("/")
        paths = [f"{root}/{s.path}" for s in self.shards if s.split == split and s.num_rows > 0]
        if not paths:
            raise UserError(f"{self.root}: the prepared dataset has no '{split}' images")
        return paths


def verified_records(root: str) -> list[Path]:
    """Where the shards already hashed are remembered, in the order tried: beside a local dataset;
    in this user's cache for a dataset in a bucket or in a folder this user cannot write (each
    run would otherwise read the whole dataset through the driver again before training)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ralflow" / "verified"
    mine = cache / f"{hashlib.sha256(root.rstrip('/').encode()).hexdigest()[:24]}.json"
    return [mine] if "://" in root else [Path(root) / VERIFIED, mine]


def write_text_atomically(path: Path, text: str) -> None:
    """Write through a temporary file renamed into place: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when there is none (missing, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
