"""Labelled data that Hugging Face ``datasets`` wrote: a Parquet file or a ``save_to_disk`` folder.

Read into memory and turned into the rows of strings that fedpriv/data/data_files.py
checks, so the same one-line errors apply. Nothing is written: ``datasets``'
own ``Dataset.from_parquet`` copies the file into an Arrow cache folder
(measured: ``<cache_dir>/parquet/...``), and an organisation's text must not
be copied where another run or organisation could find it, so a Parquet file
is read with pyarrow (which ``datasets`` reads it with) and only its
``datasets`` features are taken from the file's metadata. A ``save_to_disk``
folder is opened with ``datasets.load_from_disk(keep_in_memory=True)``, which
writes no cache. Hugging Face's network access stays off
(``HF_DATASETS_OFFLINE``): only local files are read.

A ``ClassLabel`` column is read as its class names (``0`` -> ``"World"``), and
its order of names is kept as the file's declared class order.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedpriv.kernel.errors import DataError

DATASET_DICT_FILE = "dataset_dict.json"  # a DatasetDict folder: one sub-folder per split
DATASET_FILES = ("dataset_info.json", "state.json")  # a Dataset folder


@dataclass(frozen=True)
class ArrowRows:
    """The columns of a table as strings, in the file's column order."""

    columns: dict[str, list[str]]
    class_names: dict[str, list[str]]  # ClassLabel columns: the names in the file's order
    what: str  # "Parquet file" / "save_to_disk folder (split 'train')": for messages

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()), []))


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / DATASET_DICT_FILE).is_file() or all((path / name).is_file() for name in DATASET_FILES)
    )


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before the first import; local files need no hub
    import datasets  # seconds of imports that CSV users never pay for

    datasets.utils.logging.set_verbosity_error()  # its own stderr lines would break the one-line errors
    datasets.disable_progress_bars()
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no tqdm_monitor thread: a node's process may fork after reading (superexec)
    return datasets


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, (str, int)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return json.dumps(value, ensure_ascii=False, default=str)


def _rows(table, features, what: str) -> ArrowRows:
    """Every column as strings; ClassLabel integers become their names (-1, "no label", becomes empty)."""
    datasets = _datasets()
    columns: dict[str, list[str]] = {}
    class_names: dict[str, list[str]] = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        feature = features.get(name) if features is not None else None
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
            class_names[name] = names
            columns[name] = [names[v] if isinstance(v, int) and 0 <= v < len(names) else "" for v in values]
        else:
            columns[name] = [_cell(v) for v in values]
    return ArrowRows(columns=columns, class_names=class_names, what=what)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:200]}" if text else exc.__class__.__name__


def read_parquet(path: Path) -> ArrowRows:
    """All rows of a Parquet file (written by ``datasets``' ``to_parquet``, pandas, Spark...)."""
    import pyarrow.parquet as pq

    datasets = _datasets()
    if path.is_dir():
        raise DataError(f"data file {path}: is a directory, expected a Parquet file (data.format: parquet)")
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"data file {path}: not found") from None
    except Exception as exc:  # pyarrow's own errors (ArrowInvalid, OSError...): the file is not what it claims
        raise DataError(f"data file {path}: not a readable Parquet file ({_one_line(exc)})") from None
    try:
        features = datasets.Features.from_arrow_schema(table.schema)
    except Exception:  # metadata written by something else: plain Arrow types, no ClassLabel
        features = None
    return _rows(table, features, "Parquet file")


def read_saved_dataset(path: Path, split: str, split_key: str) -> ArrowRows:
    """One split of a ``save_to_disk`` folder (a DatasetDict's ``split``, or the Dataset itself)."""
    if not path.exists():
        raise DataError(f"data file {path}: not found")
    if not is_saved_dataset(path):
        raise DataError(
            f"data file {path}: not a folder written by datasets' save_to_disk (expected {DATASET_DICT_FILE},"
            f" or {' and '.join(DATASET_FILES)}, in it)"
        )
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # the folder's JSON or Arrow files are damaged: datasets raises many kinds
        raise DataError(f"data file {path}: the save_to_disk folder cannot be read ({_one_line(exc)})") from None
    what = "save_to_disk folder"
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"data file {path}: {split_key}: the saved DatasetDict has no split {split!r}"
                f" (its splits: {', '.join(loaded)})"
            )
        loaded = loaded[split]
        what = f"save_to_disk folder (split {split!r})"
    try:
        table = loaded.with_format("arrow")[:]  # respects a saved selection or shuffle (indices mapping)
    except Exception as exc:
        raise DataError(f"data file {path}: the save_to_disk folder cannot be read ({_one_line(exc)})") from None
    return _rows(table, loaded.features, what)
