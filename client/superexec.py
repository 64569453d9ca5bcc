"""A SuperExec that forks each ClientApp from a process that already imported torch and friends.

Flower 1.41's SuperExec starts every ClientApp message in a new ``flwr-clientapp``
process: a SecAgg+ round sends five messages per node, and each one paid the
interpreter, Flower, torch, transformers, PEFT and Opacus imports again (seconds
per message on a busy CPU; see BENCHMARKS.md). ``fedpriv-superexec`` is Flower's
own ``flower-superexec`` (same command line, same task loop, same Runtime API and
token handling) with one change: the executor forks a child of this warm process
instead of exec'ing a fresh interpreter. The child runs Flower's own
``run_clientapp`` with the task's token, exactly as ``flwr-clientapp`` would, so the
ClientApp still comes from the run's FAB and still runs in its own process (one
message, one process; a crash or a kill takes only that message down).

Only third-party modules are imported ahead of time; nothing runs in them (no
torch operation, no CUDA initialisation, no thread pool), so the children start
as clean as a fresh interpreter would. Tasks are picked up every 0.2 s instead
of every second (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` still overrides it).
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import time

from fedpriv.app_source import APP_PACKAGES

POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own variable: seconds between task polls
DEFAULT_POLL_S = "0.2"
# What a fedpriv ClientApp imports that costs seconds: imported once here, shared by every forked message.
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "peft",
    "opacus",
    "safetensors.torch",
    "flwr.supernode.runtime.run_clientapp",
    "flwr.client.mod",
    # what transformers/PEFT/the ledger load lazily on a message's first use (MiniLM is a BERT)
    "transformers.models.bert.modeling_bert",
    "transformers.models.bert.tokenization_bert",
    "peft.utils.transformers_weight_conversion",
    "nacl.signing",
)


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import ``modules`` (those that exist); returns the ones imported. Never runs torch code."""
    # torch.cuda.is_available() through NVML: a CUDA context in this process would be unusable in its children.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        loaded.append(name)
    return loaded


def warm_caches() -> list[str]:
    """Fill third-party caches every message would otherwise build again; returns those filled.

    PEFT asks transformers for its checkpoint conversion mapping whenever it wraps a model: built lazily
    (about 880 regular expressions, 0.25 s of CPU) and cached at module level, so a forked child inherits it.
    Pure data: no threads, no torch operation.
    """
    filled = []
    try:
        from transformers import conversion_mapping

        conversion_mapping.get_checkpoint_conversion_mapping("bert")
        filled.append("transformers.conversion_mapping")
    except (ImportError, AttributeError):
        pass
    return filled


def fork_is_safe() -> str | None:
    """Why forking this process would not be safe (None when it is)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised in the SuperExec process"
    return None


CLIENTAPP_NAME = "flwr-clientapp"  # what ps/top show for a forked ClientApp (its command line is the parent's)


def name_process(name: str) -> None:
    """Set this process's name (Linux ``comm``, 15 characters), so operators and tests can tell children apart."""
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as handle:
            handle.write(name[:15])
    except OSError:
        pass


class ForkExecutor:
    """Flower's executor interface (``launch``/``reconcile``/``close``...): one forked child per task."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP or fork_is_safe() is not None:
            return SubprocessExecutor().launch(spec)  # anything else: Flower's cold start, unchanged
        # the warm process holds millions of objects (torch, transformers): frozen, a child's garbage collections
        # never walk them (each full collection took 0.4-0.6 s in a child, and copied pages it only had to read)
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's task loop
            forget_app_modules()
            os._exit(run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self.reconcile()


STAGE_TIMINGS_ENV = "FEDPRIV_STAGE_TIMINGS"  # client/stage_timing.py: benchmarks only
PULLED_AT_ENV = "FEDPRIV_TASK_INPUT_PULLED_AT"


def forget_app_modules() -> list[str]:
    """Drop this project's modules that the warm parent imported (this module, fedpriv.object_pulls...).

    Flower's ``load_app`` imports ``client.client_app`` from the FAB's folder only when ``client`` is not
    imported yet: without this, a forked ClientApp would run the node's installed code, not the run's FAB.
    Only ever called in a forked child. Returns the names dropped.
    """
    dropped = [name for name in sys.modules if name.partition(".")[0] in APP_PACKAGES]
    for name in dropped:
        del sys.modules[name]
    return dropped


def timed_pull(pull_task_input):
    """Flower's ``pull_task_input``, noting (wall clock) when the message and its arrays were in hand.

    The ClientApp's stage timing reads it back from the environment: it splits a message's start-up into
    waiting for the message and loading the app.
    """

    def pull(client):
        result = pull_task_input(client)
        os.environ[PULLED_AT_ENV] = f"{time.time():.3f}"
        return result

    return pull


def run_task(spec) -> int:
    """In the forked child: Flower's ``run_clientapp`` for this task's token; returns the exit code."""
    code = 1
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)  # the parent's handlers would close the parent's connections
        name_process(CLIENTAPP_NAME)
        if spec.suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime import run_clientapp as clientapp_module
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        if os.environ.get(STAGE_TIMINGS_ENV):
            clientapp_module.pull_task_input = timed_pull(clientapp_module.pull_task_input)

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as exc:  # flwr_exit ends every ClientApp run this way
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and leave with a failure code, never back into the parent's loop
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
    return code


def install() -> None:
    """Make Flower's SuperExec use ``ForkExecutor`` for its default (subprocess) executor.

    The children also ask their SuperNode for a message's arrays promptly (fedpriv/object_pulls.py): a forked
    ClientApp starts before the SuperNode holds them, and Flower's 1-2-4-8 s back-off then cost 7-15 s.
    """
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.superexec import run_superexec as superexec_module

    from fedpriv import object_pulls

    object_pulls.install(inflatable_utils)

    flower_get_executor = superexec_module.get_executor

    def get_executor(executor_type, executor_config=None, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkExecutor()
        return flower_get_executor(executor_type, executor_config, **kwargs)

    superexec_module.get_executor = get_executor


def main() -> None:
    """``fedpriv-superexec``: ``flower-superexec`` with warm, forked ClientApp processes."""
    os.environ.setdefault(POLL_ENV, DEFAULT_POLL_S)
    preload()
    warm_caches()
    install()
    from flwr.supercore.cli import flower_superexec

    flower_superexec()


if __name__ == "__main__":
    main()
