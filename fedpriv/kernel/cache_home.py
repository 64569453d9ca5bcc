"""Where fedpriv keeps what it can compute again (a cache, never a result): one folder per kind inside it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FEDPRIV_CACHE_DIR"


def cache_home() -> Path | None:
    """``$FEDPRIV_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedpriv``, else ``~/.cache/fedpriv``; None when there is no
    home folder to put it in (nothing is kept)."""
    try:
        chosen = os.environ.get(CACHE_ENV)
        if chosen:
            return Path(chosen).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    except RuntimeError:  # no $HOME and no password entry
        return None
    return Path(base) / "fedpriv"


def cache_folder(kind: str) -> Path | None:
    """The folder of one kind of kept result (``truncation``, ``partitions``); None when there is no home folder."""
    home = cache_home()
    return home / kind if home is not None else None


def package_version(package: str) -> str:
    """An installed distribution's version, for a cache key ("none" when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def keep_json(path: Path, payload: object, keep_files: int) -> None:
    """Write ``payload`` at ``path`` atomically (a concurrent reader sees all of it or none); past ``keep_files``
    files in its folder the oldest half is removed. A failure is ignored: a read-only or full disk costs only
    computing it again next time."""
    import json

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(payload), encoding="utf-8")
        partial.replace(path)
        kept = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        for old in kept[: len(kept) // 2] if len(kept) > keep_files else []:
            old.unlink(missing_ok=True)
    except OSError:
        pass
