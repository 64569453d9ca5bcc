"""The Dirichlet split's organisations, kept on disk across the processes that plan the same partitions.

Flower Datasets' DirichletPartitioner needs Hugging Face ``datasets`` and ``flwr_datasets``, whose imports
(seaborn, scipy, matplotlib through its plotting helpers) cost about 1.6 s of CPU: paid by ``fedpriv
simulate`` and again by every Ray actor of the simulation, each of which plans the same partitions
(fedpriv/data/partitioning.py). The split is a pure function of the labels in row order, the number of
organisations, alpha, min_partition_size, the seed and the library versions, so its row numbers are kept in
``partitions`` inside fedpriv's cache folder (fedpriv/kernel/cache_home.py), one small file per split under a
digest of all of these. A file that is missing, unreadable or does not fit is split again; a disk that refuses
the write costs only the split next time. Only successful splits are kept: a failure is always reported anew.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from fedpriv.kernel.cache_home import cache_home, keep_json
from fedpriv.kernel.cache_home import package_version as _version

FOLDER = "partitions"  # inside the cache folder
FORMAT = "fedpriv-dirichlet/1"
KEEP_FILES = 256  # splits; more than this: the oldest half is removed


def cache_folder() -> Path | None:
    """Where the splits are kept; None when there is no home folder to put them in (nothing is kept)."""
    home = cache_home()
    return home / FOLDER if home is not None else None


def _file_name(labels: Sequence[int], settings: dict) -> str:
    versions = {name: _version(name) for name in ("flwr-datasets", "datasets", "numpy")}
    digest = hashlib.sha256(json.dumps([FORMAT, versions, settings, len(labels)], sort_keys=True).encode())
    digest.update(",".join(str(int(label)) for label in labels).encode())
    return f"{digest.hexdigest()[:40]}.json"


def _read(path: Path, n: int, num_orgs: int) -> list[list[int]] | None:
    """The stored organisations' rows, or None when missing, unreadable or not a split of ``n`` rows in
    ``num_orgs`` organisations (each row at most once)."""
    try:
        groups = json.loads(path.read_text(encoding="utf-8"))["groups"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(groups, list) or len(groups) != num_orgs or not all(isinstance(g, list) for g in groups):
        return None
    rows = [row for group in groups for row in group]
    if not all(type(row) is int and 0 <= row < n for row in rows) or len(set(rows)) != len(rows):
        return None
    return groups


def _write(path: Path, groups: list[list[int]]) -> None:
    keep_json(path, {"groups": groups}, KEEP_FILES)


def kept_split(labels: Sequence[int], settings: dict, split: Callable[[], list[list[int]]]) -> list[list[int]]:
    """``split()``'s rows for each organisation: the kept ones when they fit, else split and kept.

    ``settings`` must hold everything besides ``labels`` that decides the split (it names the file).
    """
    folder = cache_folder()
    path = folder / _file_name(labels, settings) if folder is not None else None
    groups = _read(path, len(labels), int(settings["num_orgs"])) if path is not None else None
    if groups is None:
        groups = split()
        if path is not None:
            _write(path, groups)
    return groups
