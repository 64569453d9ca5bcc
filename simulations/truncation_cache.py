"""The plan's count of texts cut at ``data.max_length``, kept on disk across ``fedpriv simulate`` processes.

Counting needs every text tokenised in full (the median length of a 2,225-article corpus is ~420 tokens,
so no bound by characters decides it) and the tokenizer loaded, which imports transformers: about 2.5 s
that every ``fedpriv simulate`` and ``--dry-run`` of the same data paid again. The organisations' counts
are kept in ``$FEDPRIV_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fedpriv``, else ``~/.cache/fedpriv``), one
small file per plan, under a digest of everything that decides them: the organisations and their texts
in order, ``max_length``, the tokenizer's files and the transformers and tokenizers versions. A file
holds what summary.json shows (counts and medians), never a text nor a per-text digest; one that is
missing, unreadable or does not fit is counted again, and a disk that refuses the write costs only the
counting next time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from fedpriv.client.data_report import Truncation
from fedpriv.kernel.cache_home import CACHE_ENV, keep_json
from fedpriv.kernel.cache_home import cache_folder as kind_folder
from fedpriv.kernel.cache_home import package_version as _version

__all__ = ["CACHE_ENV", "cache_folder", "plan_truncation"]

FOLDER = "truncation"  # inside the cache folder
FORMAT = "fedpriv-truncation/2"  # 2: one file per plan
KEEP_FILES = 256  # plans; more than this: the oldest half is removed
# files of a model folder that never decide how its tokenizer splits text (the weights: large)
_WEIGHTS = {".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt", ".gguf", ".ot"}


def cache_folder() -> Path | None:
    """Where the counts are kept: ``truncation`` in fedpriv's cache folder (fedpriv/kernel/cache_home.py); None
    when there is no home folder to put it in (nothing is kept)."""
    return kind_folder(FOLDER)


def tokenizer_digest(source: Path) -> str:
    """A digest of the files the tokenizer of model folder ``source`` is read from (all but the weights) and of
    the libraries that apply them: any change there counts again."""
    digest = hashlib.sha256(f"{_version('transformers')}:{_version('tokenizers')}".encode())
    for path in sorted(p for p in Path(source).iterdir() if p.is_file() and p.suffix not in _WEIGHTS):
        digest.update(path.name.encode() + b"\x00" + path.read_bytes() + b"\x00")
    return digest.hexdigest()


def _file_name(tokenizer: str, max_length: int, texts_by_org: dict[str, Sequence[str]]) -> str:
    sizes = [[org, len(texts)] for org, texts in texts_by_org.items()]
    digest = hashlib.sha256(json.dumps([FORMAT, tokenizer, max_length, sizes]).encode())
    for texts in texts_by_org.values():
        for text in texts:
            raw = text.encode("utf-8", "surrogatepass")
            digest.update(len(raw).to_bytes(8, "big") + raw)  # length first: no two lists of texts give one stream
    return f"{digest.hexdigest()[:40]}.json"


def _read(path: Path, texts_by_org: dict[str, Sequence[str]], max_length: int) -> dict[str, Truncation] | None:
    """The stored counts, or None when missing, unreadable or not those of these organisations at ``max_length``."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        cuts = {
            org: Truncation(int(c["texts"]), int(c["truncated"]), float(c["median_tokens"]), int(c["max_length"]))
            for org, c in raw["orgs"].items()
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if list(cuts) != list(texts_by_org):
        return None
    for org, cut in cuts.items():
        n = len(texts_by_org[org])
        if cut.texts != n or cut.max_length != max_length or not 0 <= cut.truncated <= n:
            return None
    return cuts


def _write(path: Path, cuts: dict[str, Truncation]) -> None:
    keep_json(path, {"orgs": {org: cut.to_dict() for org, cut in cuts.items()}}, KEEP_FILES)


def plan_truncation(
    source: Path, build_tokenizer, texts_by_org: dict[str, Sequence[str]], max_length: int
) -> dict[str, Truncation]:
    """Each organisation's :class:`Truncation` of its texts at ``max_length``: the kept ones when they fit, else
    counted with ``build_tokenizer()`` (tokenizer files in folder ``source``) and kept, one file per plan."""
    from fedpriv.client.data_report import truncation

    folder = cache_folder()
    try:
        tokenizer_key = tokenizer_digest(source) if folder is not None else None
    except OSError:  # the model folder cannot be read: the tokenizer load says why
        tokenizer_key = None
    path = folder / _file_name(tokenizer_key, max_length, texts_by_org) if folder and tokenizer_key else None
    cuts = _read(path, texts_by_org, max_length) if path is not None else None
    if cuts is None:
        tokenizer = build_tokenizer()
        cuts = {org: truncation(texts, tokenizer, max_length) for org, texts in texts_by_org.items()}
        if path is not None:
            _write(path, cuts)
    return cuts
