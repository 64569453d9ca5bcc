"""What makes a fork of the warm SuperExec (or of a run's warm process) safe and clean.

A forked child inherits everything: a CUDA context or a thread holding a lock would break it, and this
project's modules already imported in the parent would shadow the run's own code from its FAB.
"""

from __future__ import annotations

import os
import sys


def fork_is_safe() -> str | None:
    """Why forking this process would not be safe (None when it is)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised in the SuperExec process"
    return None


def name_process(name: str) -> None:
    """Set this process's name (Linux ``comm``, 15 characters), so operators and tests can tell children apart."""
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as handle:
            handle.write(name[:15])
    except OSError:
        pass


def extra_threads() -> str | None:
    """Why this process has Python threads besides its main one (None when it has none): a thread that holds
    a lock when the process forks leaves it locked in the child.

    Native thread pools are handled where they are made: torch's OpenMP pool is never used here (one thread),
    the tokenizers' Rust pool is off (``TOKENIZERS_PARALLELISM``), and OpenBLAS (numpy) shuts its pool down
    before every fork (its own ``pthread_atfork`` handler) and starts it again in the child on first use.
    """
    import threading

    count = threading.active_count()
    return f"{count - 1} Python thread(s) besides the main one" if count > 1 else None


APP_PACKAGE = "fedpriv"  # the one import root: what a ClientApp forked from a warm parent loads from the FAB


def _is_app_module(name: str) -> bool:
    return name == APP_PACKAGE or name.startswith(APP_PACKAGE + ".")


def forget_app_modules() -> list[str]:
    """Drop this project's modules that the warm parent imported (this module, fedpriv.runtime.object_pulls...).

    Flower's ``load_app`` imports ``fedpriv.client.client_app`` from the FAB's folder only when ``fedpriv`` is
    not imported yet: without this, a forked ClientApp would run the node's installed code, not the run's FAB.
    Only ever called in a forked child. Returns the names dropped.
    """
    dropped = [name for name in sys.modules if _is_app_module(name)]
    for name in dropped:
        del sys.modules[name]
    return dropped


def app_modules_outside(folder) -> list[str]:
    """This project's imported modules whose file is not under ``folder`` (another FAB's, or the node's)."""
    root = os.path.join(os.path.realpath(folder), "")
    outside = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if _is_app_module(name) and path and not os.path.realpath(path).startswith(root):
            outside.append(name)
    return outside
