"""Dataset loading with ``datasets``: a Hub id (lmms-eval's ids) or a local path.

Local paths may be a ``save_to_disk`` directory, a parquet/json/jsonl/csv file
(or a directory of them), or a VLMEvalKit ``.tsv`` (base64 ``image`` column).
Image columns are read with ``decode=False`` so that one corrupt image fails
one item (scored wrong, counted) instead of the whole run.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from eval_suite.tasks.base import TaskError

_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _undecoded(dataset):
    """Cast every Image feature to ``Image(decode=False)``."""
    from datasets import Image

    for name, feature in dataset.features.items():
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(name, Image(decode=False))
    return dataset


def local_fingerprint(path: Path) -> str:
    """A cheap content identity for local data: names, sizes and the first MiB of each file."""
    digest = hashlib.sha256()
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent if path.is_file() else path)).encode())
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
    return "local:sha256:" + digest.hexdigest()[:16]


def read_tsv(path: Path) -> List[Dict[str, Any]]:
    """A VLMEvalKit benchmark TSV: rows with a base64-encoded ``image`` column."""
    from datasets import load_dataset

    rows = load_dataset("csv", data_files=str(path), sep="\t", split="train", keep_default_na=False)
    out = []
    for row in rows:
        row = dict(row)
        if isinstance(row.get("image"), str) and row["image"]:
            try:
                row["image"] = {"bytes": base64.b64decode(row["image"]), "path": None}
            except ValueError:
                row["image"] = {"bytes": b"", "path": None}
        out.append(row)
    return out


def load_rows(dataset_id: str, *, config: Optional[str], split: str, data_path: Optional[str],
              revision: Optional[str]) -> Tuple[Iterable[Dict[str, Any]], str]:
    """Rows of a benchmark split and the revision to record."""
    from datasets import load_dataset, load_from_disk

    if data_path:
        path = Path(data_path).expanduser()
        if not path.exists():
            raise TaskError(f"local dataset path {path} does not exist")
        fingerprint = local_fingerprint(path)
        try:
            if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
                dataset = load_from_disk(str(path))
                if hasattr(dataset, "keys"):  # a DatasetDict
                    if split not in dataset:
                        raise TaskError(f"{path}: split {split!r} not found (have {', '.join(dataset.keys())})")
                    dataset = dataset[split]
                return _undecoded(dataset), fingerprint
            if path.suffix == ".tsv":
                return read_tsv(path), fingerprint
            files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _FORMATS)
            if not files:
                raise TaskError(f"{path}: no parquet/json/jsonl/csv/tsv data found")
            fmt = _FORMATS.get(files[0].suffix)
            if fmt is None:
                raise TaskError(f"{path}: unsupported file type {files[0].suffix!r}")
            dataset = load_dataset(fmt, data_files=[str(f) for f in files], split="train")
            return _undecoded(dataset), fingerprint
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(f"cannot read local dataset {path}: {type(exc).__name__}: {exc}") from exc
    try:
        dataset = load_dataset(dataset_id, config, split=split, revision=revision)
    except Exception as exc:
        raise TaskError(
            f"cannot load {dataset_id}" + (f" ({config})" if config else "") + f" split {split!r}: "
            f"{type(exc).__name__}: {exc}. Offline? Download it and pass --data-path"
        ) from exc
    return _undecoded(dataset), revision or _hub_revision(dataset) or "unpinned"


def _hub_revision(dataset) -> Optional[str]:
    """The commit the Hub files came from, when ``datasets`` recorded it in the cache path."""
    for entry in getattr(dataset, "cache_files", []) or []:
        parts = Path(entry.get("filename", "")).parts
        for part in parts:
            if len(part) == 40 and all(c in "0123456789abcdef" for c in part):
                return part
    return None
