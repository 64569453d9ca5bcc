"""Whether a file changed since it was read, without reading it again.

A process that outlives one message (a node's warm run process under
``fedpriv-superexec``, a simulation process) keeps what it read from a node's
files; it asks for the file's stamp again before using it, and reads the file
again when the stamp differs. Take the stamp BEFORE reading the file: a write
during the read then shows as a change.
"""

from __future__ import annotations

import os
from pathlib import Path


def file_stamp(path: str | Path | None) -> tuple[int, ...] | None:
    """The file's device, inode, size, modification and change times (nanoseconds); None when it is missing.

    Any write changes the change time (ctime), which no user can set back, and replacing the file changes
    its inode.
    """
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
