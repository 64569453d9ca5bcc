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
