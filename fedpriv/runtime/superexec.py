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

Only third-party modules are imported ahead of time, and pure-data caches built
(transformers' checkpoint conversion mapping, Presidio's compiled redaction
patterns: ``warm_caches``); no torch operation, no CUDA initialisation, no thread
pool, so the children start as clean as a fresh interpreter would. It then
prints ``READY_LINE``, which ``fedpriv federation up`` waits for before the run.
Tasks are picked up every 0.2 s instead of every second; under
``fedpriv-supernode``, whose ``AcquireTask`` itself waits for a task (a long
poll, fedpriv/runtime/node_wakeups.py), as soon as they are stored
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` still overrides both).

A warm process per run (``FEDPRIV_WARM_RUNS``, default 2 runs per node; 0: off).
Every training and evaluate message used to load the node's data (node.yaml,
its CSV, the tokenizer, the tokenised cache) and build the model template again.
Now the first message of a run on this node is forked into a *run process*
(named ``fedpriv-run``), which forks every message of that run: the first
message's child, once it has the task (run config, node config, FAB), tells the
run process, which imports the run's ClientApp from its FAB and calls the
app's ``warm_node(context)`` hook (client/client_app.py: the node's data and the
model template, nothing else). Every later message of the run is forked from
it and inherits them copy-on-write. The first message itself, forked before, waits for the run process
when it needs the node's data too (a pre-flight query, a plain training or evaluate message: not a SecAgg+
key exchange) and then reads them from the node's token cache, instead of redacting and tokenising the same
texts at the same moment. What stays per message: the ClientApp runs
the same code as without it (same handlers, simulation included); it reads
and writes the node's privacy state (plan, accountant, ledger, replay) from
disk in every message, as before: the run process never opens it. Before each
fork the run process asks the hook again, which compares the node's files'
stamps (fedpriv/kernel/file_stamps.py) and reloads what changed; the message's own
process checks them again. A run process only ever serves one run (keyed on
run id and FAB hash) of one node (one SuperExec per SuperNode); it ends when
its SuperExec closes its pipe: when it was idle ``FEDPRIV_WARM_RUN_IDLE_S``
(default 1800 s), when a newer run needs its place, or when the SuperExec ends.
The run process never runs torch with more than one thread (a forked child of a
process that used an OpenMP pool hangs in its first parallel region); its
children get the thread count back.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib
import json
import os
import selectors
import signal
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpriv.kernel.env_settings import env_number
from fedpriv.kernel.protocol import message_stage
from fedpriv.runtime.node_wakeups import LONG_POLL_ENV

POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own variable: seconds between task polls
DEFAULT_POLL_S = "0.2"
LONG_POLL_INTERVAL_S = "0.01"
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
    A node that redacts its data (node.yaml ``redaction``, on by default) builds Presidio's recognizers in
    its run's first message: Presidio's imports and ~250 compiled patterns (the largest part of a first
    ``warm_node``; BENCHMARKS.md, round overhead) are made here once instead. Pure data: no threads, no torch.
    """
    filled = []
    try:
        from transformers import conversion_mapping

        conversion_mapping.get_checkpoint_conversion_mapping("bert")
        filled.append("transformers.conversion_mapping")
    except (ImportError, AttributeError):
        pass
    from fedpriv.privacy.redaction import warm_engine

    try:
        if warm_engine():
            filled.append("presidio.recognizers")
    except Exception as exc:  # noqa: BLE001 - only a head start: a node that redacts meets the error itself
        print(f"fedpriv-superexec: redaction not warmed ({exc.__class__.__name__}: {exc})", file=sys.stderr)
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


WARM_RUNS_ENV = "FEDPRIV_WARM_RUNS"  # runs that keep a warm run process on this node at once (0: none)
DEFAULT_WARM_RUNS = 2
WARM_IDLE_ENV = "FEDPRIV_WARM_RUN_IDLE_S"  # a run process with no message for this long ends
DEFAULT_WARM_IDLE_S = 1800.0
RUN_PROCESS_NAME = "fedpriv-run"  # what ps/top show for a run's warm process
WARM_HOOK = "warm_node"  # the ClientApp module's function that loads what every message of a run needs
RUN_RESTARTS = 2  # a run whose warm process died this often gets plain forks for the rest of its life


def _setting(name: str, default: float, low: float, high: float) -> float:
    return env_number("fedpriv-superexec", name, default, low, high)


def warm_runs_setting() -> int:
    return int(_setting(WARM_RUNS_ENV, DEFAULT_WARM_RUNS, 0, 64))


def warm_idle_setting() -> float:
    return _setting(WARM_IDLE_ENV, DEFAULT_WARM_IDLE_S, 1, 7 * 24 * 3600)


def send_frame(fd: int, payload: bytes) -> None:
    """One length-prefixed frame on a pipe (a task's spec, or a child's report); each pipe has one writer."""
    data = struct.pack("!I", len(payload)) + payload
    while data:
        data = data[os.write(fd, data) :]


def take_frames(buffer: bytearray) -> list[bytes]:
    """The complete frames at the start of ``buffer`` (removed from it); a partial frame stays."""
    frames = []
    while len(buffer) >= 4:
        (size,) = struct.unpack("!I", buffer[:4])
        if len(buffer) < 4 + size:
            break
        frames.append(bytes(buffer[4 : 4 + size]))
        del buffer[: 4 + size]
    return frames


def spec_to_bytes(spec) -> bytes:
    return json.dumps(asdict(spec)).encode()


def spec_from_bytes(data: bytes):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    fields = json.loads(data)
    return ExecutionSpec(**{**fields, "task_type": TaskType(fields["task_type"])})


@dataclass
class WarmRun:
    """The SuperExec's handle on one run's warm process: its pid and the pipe its tasks go down."""

    pid: int
    commands: int  # write end
    last_used: float


class ForkExecutor:
    """Flower's executor interface (``launch``/``reconcile``/``close``...): one forked child per task.

    With warm runs on, a ClientApp task is handed to its run's warm process (started on the run's first
    task), which forks the child; ``note_run`` (called by the plugin, see ``install``) says which run the
    next task belongs to. Without a run id, or when the run's process cannot take it, the child is forked
    from here as before.
    """

    def __init__(self, warm_runs: int | None = None, idle_s: float | None = None) -> None:
        self.children: set[int] = set()
        self.warm_runs = warm_runs_setting() if warm_runs is None else warm_runs
        self.idle_s = warm_idle_setting() if idle_s is None else idle_s
        self.runs: OrderedDict[tuple[int, str], WarmRun] = OrderedDict()
        self.deaths: dict[tuple[int, str], int] = {}
        self.next_run_id: int | None = None

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        del task_type, fab_hash, insecure, root_certificates_path

    def note_run(self, run_id: int) -> None:
        """The run the next ``launch`` belongs to (Flower's ExecutionSpec does not carry it)."""
        self.next_run_id = int(run_id)

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
        from flwr.supercore.superexec.executor.types import LaunchResult

        run_id, self.next_run_id = self.next_run_id, None
        if spec.task_type != TaskType.CLIENT_APP or fork_is_safe() is not None:
            return SubprocessExecutor().launch(spec)  # anything else: Flower's cold start, unchanged
        if run_id is not None and self.warm_runs > 0 and self._to_run((run_id, spec.fab_hash or ""), spec):
            return LaunchResult.accepted()
        # the warm process holds millions of objects (torch, transformers): frozen, a child's garbage collections
        # never walk them (each full collection took 0.4-0.6 s in a child, and copied pages it only had to read)
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's task loop
            self._close_run_pipes()
            forget_app_modules()
            os._exit(run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def _to_run(self, key: tuple[int, str], spec) -> bool:
        """Hand ``spec`` to the run's warm process (started when needed); False when it cannot take it."""
        if self.deaths.get(key, 0) >= RUN_RESTARTS:
            return False
        for _ in range(2):  # a process that died since the last task: start another once
            run = self.runs.get(key) or self._start_run(key)
            try:
                send_frame(run.commands, spec_to_bytes(spec))
            except OSError:  # its end of the pipe is gone
                self._end_run(key)
                self.deaths[key] = self.deaths.get(key, 0) + 1
                if self.deaths[key] >= RUN_RESTARTS:
                    return False
                continue
            run.last_used = time.monotonic()
            self.runs.move_to_end(key)
            return True
        return False

    def _start_run(self, key: tuple[int, str]) -> WarmRun:
        while len(self.runs) >= self.warm_runs:  # the least recently used run gives its place up
            self._end_run(next(iter(self.runs)))
        read_end, write_end = os.pipe()
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the run process: serves this run's tasks until its pipe closes
            code = 1
            try:
                os.close(write_end)
                self._close_run_pipes()  # another run's pipe held open here would never close
                code = RunProcess(read_end).serve()
            except BaseException:  # noqa: BLE001 - never back into the parent's task loop
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(read_end)
        run = WarmRun(pid=pid, commands=write_end, last_used=time.monotonic())
        self.runs[key] = run
        return run

    def _end_run(self, key: tuple[int, str]) -> None:
        """Close the run's pipe (its process leaves when it reads the end) and reap it later."""
        run = self.runs.pop(key)
        try:
            os.close(run.commands)
        except OSError:
            pass
        self.children.add(run.pid)

    def _close_run_pipes(self) -> None:
        for run in self.runs.values():
            try:
                os.close(run.commands)
            except OSError:
                pass

    def reconcile(self) -> None:
        """Reap finished children (no zombies); end run processes that died or were idle too long."""
        now = time.monotonic()
        for key, run in list(self.runs.items()):
            try:
                done, _ = os.waitpid(run.pid, os.WNOHANG)
            except ChildProcessError:
                done = run.pid
            if done:
                self.runs.pop(key)
                os.close(run.commands)
                self.deaths[key] = self.deaths.get(key, 0) + 1
            elif now - run.last_used > self.idle_s:
                self._end_run(key)
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        for key in list(self.runs):
            self._end_run(key)
        self.reconcile()


class RunProcess:
    """One run's warm process on one node: forks each of the run's messages from what it loaded once.

    Cold until a message's child reports the task (run config, node config, FAB): it then imports the
    ClientApp from that FAB, as a message would, and calls the app's ``warm_node(context)``. Before every
    later fork it calls the hook again, which reloads whatever file changed. Should warming fail, or leave
    the process unsafe to fork (a thread, CUDA), it goes back to cold forks (the app's modules forgotten).
    """

    def __init__(self, commands: int) -> None:
        self.commands = commands
        self.selector = selectors.DefaultSelector()
        self.reports: dict[int, bytearray] = {}  # read ends of children's report pipes
        # a reporting child's report read end -> the write end of its "warm" pipe, closed once warming is over
        self.warm_signals: dict[int, int] = {}
        self.children: set[int] = set()
        self.context = None
        self.hook = None
        self.failed = False
        self.threads = 0

    def serve(self) -> int:
        name_process(RUN_PROCESS_NAME)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)  # the SuperExec's handlers would close the SuperExec's connections
        forget_app_modules()  # the run's own code comes from its FAB
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool in a process that forks
        torch = sys.modules.get("torch")
        if torch is not None:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)  # no OpenMP pool here: a child forked from a process that used one hangs
        self.selector.register(self.commands, selectors.EVENT_READ)
        pending = bytearray()
        while True:
            events = sorted(self.selector.select(timeout=1.0), key=lambda event: event[0].fd == self.commands)
            for key, _ in events:  # reports first: a task that arrived with them is forked warm
                if key.fd != self.commands:
                    self._read_report(key.fd)
                    continue
                chunk = os.read(self.commands, 65536)
                if not chunk:  # the SuperExec closed the pipe (or is gone): this run is over here
                    return 0
                pending += chunk
                for frame in take_frames(pending):
                    self.launch(spec_from_bytes(frame))
            self.reap()

    def launch(self, spec) -> int:
        """Fork the child that runs ``spec``; it reports its task back while this process is still cold."""
        if self.hook is not None:
            self.refresh()
        report = self.hook is None and not self.failed
        read_end, write_end = os.pipe() if report else (None, None)
        warm_read, warm_write = os.pipe() if report else (None, None)
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(self.commands)
                for fd in [*self.reports, *self.warm_signals.values()]:
                    os.close(fd)
                if read_end is not None:
                    os.close(read_end)
                    os.close(warm_write)
                    _task["warm_fd"] = warm_read
                torch = sys.modules.get("torch")
                if torch is not None and self.threads:
                    torch.set_num_threads(self.threads)
                if self.hook is not None:
                    os.environ[WARM_ENV] = "1"
                code = run_task(spec, report_fd=write_end)
            finally:
                os._exit(code)
        if report:
            os.close(write_end)
            os.close(warm_read)
            self.warm_signals[read_end] = warm_write
            self.reports[read_end] = bytearray()
            self.selector.register(read_end, selectors.EVENT_READ)
        self.children.add(pid)
        return pid

    def _read_report(self, fd: int) -> None:
        chunk = os.read(fd, 65536)
        if chunk:
            self.reports[fd] += chunk
            return
        self.selector.unregister(fd)
        os.close(fd)
        frames = take_frames(self.reports.pop(fd))
        if frames and self.hook is None and not self.failed:
            self.warm_up(json.loads(frames[0]))
        # tell the waiting children that warming is over (done, failed, or this child never said its task)
        done = self.hook is not None or self.failed
        for report_fd in list(self.warm_signals) if done else [fd]:
            os.close(self.warm_signals.pop(report_fd))

    def warm_up(self, task: dict) -> bool:
        """Import the run's ClientApp from its FAB and load what its messages need (``warm_node``)."""
        try:
            from flwr.app import Context, RecordDict
            from flwr.clientapp.utils import get_load_client_app_fn
            from flwr.common.config import get_project_config, get_project_dir

            app_dir = get_project_dir(task["fab_id"], task["fab_version"], task["fab_hash"])
            ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
            get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                task["fab_id"], task["fab_version"], task["fab_hash"]
            )
            hook = getattr(sys.modules.get(ref.partition(":")[0]), WARM_HOOK, None)
            if hook is None:  # an app without the hook (an older fedpriv): nothing to keep warm
                raise LookupError(f"{ref.partition(':')[0]} has no {WARM_HOOK}()")
            context = Context(
                run_id=int(task["run_id"]),
                node_id=int(task["node_id"]),
                node_config=dict(task["node_config"]),
                state=RecordDict(),
                run_config=dict(task["run_config"]),
            )
            hook(context)
            if task.get("fab_sha256") and task.get("fab_dir"):
                _verified_fabs[task["fab_sha256"]] = task["fab_dir"]
            unsafe = fork_is_safe() or extra_threads()
            if unsafe:
                raise RuntimeError(unsafe)
        except Exception as exc:  # noqa: BLE001 - the messages still run, cold
            print(f"fedpriv-superexec: run kept cold ({exc.__class__.__name__}: {exc})", file=sys.stderr, flush=True)
            self.failed = True
            forget_app_modules()
            return False
        self.context, self.hook = context, hook
        return True

    def refresh(self) -> None:
        """Ask the hook again before a fork: files that changed since are read again (cheap when none did)."""
        try:
            self.hook(self.context)
        except Exception as exc:  # noqa: BLE001 - the message itself meets the error and reports it
            print(f"fedpriv-superexec: warm data not refreshed ({exc.__class__.__name__}: {exc})", file=sys.stderr)

    def reap(self) -> None:
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if not pid:
                return
            self.children.discard(pid)


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


STAGE_TIMINGS_ENV = "FEDPRIV_STAGE_TIMINGS"  # client/stage_timing.py: benchmarks only
PULLED_AT_ENV = "FEDPRIV_TASK_INPUT_PULLED_AT"
WARM_ENV = "FEDPRIV_WARM_RUN"  # set in a child forked from a warm run process (client/stage_timing.py reports it)
STEPS_ENV = "FEDPRIV_TASK_STEPS"  # a child's start-up steps, wall clock (client/stage_timing.py reports them)
ONE_MESSAGE_ENV = "FEDPRIV_ONE_MESSAGE_PROCESS"  # client/node.py: this process serves one message, then ends


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


_task: dict = {}  # in a ClientApp child: what it pulled (context, run), for its report to the run process
_steps: dict[str, float] = {}  # in a ClientApp child, with stage timings on: when each start-up step ended
# FABs (SHA-256 of their bytes -> installed folder) that a child of this run process installed and verified
_verified_fabs: dict[str, str] = {}


def note_step(name: str) -> None:
    """With stage timings on: when a start-up step ended (wall clock); client/stage_timing.py reports them."""
    if os.environ.get(STAGE_TIMINGS_ENV):
        _steps[name] = round(time.time(), 3)
        os.environ[STEPS_ENV] = json.dumps(_steps)


def noted_pull(pull_task_input):
    """Flower's ``pull_task_input``, keeping the task's context and run, and (with stage timings on) noting
    when the message and its arrays were in hand (wall clock), which the ClientApp's stage timing reads back."""

    @functools.wraps(pull_task_input)  # the same signature: patch_points checks it
    def pull(client):
        note_step("connected")
        message, context, run, fab = result = pull_task_input(client)
        stage = message_stage(message) if message is not None else ""
        _task.update(context=context, run=run, fab_hash=fab.hash_str, stage=stage)
        note_step("pulled")
        if os.environ.get(STAGE_TIMINGS_ENV):
            os.environ[PULLED_AT_ENV] = f"{time.time():.3f}"
        return result

    return pull


def remembered_install(install_from_fab):
    """Flower's ``install_from_fab``, skipped for the very bytes a child of this run process already installed.

    Flower unzips the FAB and checks every file's hash against its manifest in every message, then finds the
    app installed and returns. Bytes with the same SHA-256 as a FAB that passed that check pass it again:
    a child of a warm run process only checks the digest and that the installed folder is there.
    """

    @functools.wraps(install_from_fab)
    def install(fab_file, install_dir=None, skip_prompt=False):
        digest = hashlib.sha256(fab_file).hexdigest() if isinstance(fab_file, bytes) else None
        known = _verified_fabs.get(digest) if digest and install_dir is None else None
        if known and os.path.isdir(known):
            path = Path(known)
        else:
            path = install_from_fab(fab_file, install_dir, skip_prompt)
            if digest:
                _task["fab_sha256"], _task["fab_dir"] = digest, str(path)
        note_step("installed")
        return path

    return install


def checked_loader(get_load_client_app_fn, report_fd: int | None):
    """Flower's ClientApp loader, which never runs app code of another FAB, and reports the task when asked.

    A child of a warm run process already holds the run's ClientApp modules (Flower's ``load_app`` takes
    them as they are): should any come from elsewhere, all are dropped and the app is imported afresh from
    this task's FAB. With ``report_fd``, once the app is loaded, the task's run config, node config and FAB
    go to the run process, which warms itself with them.
    """

    @functools.wraps(get_load_client_app_fn)
    def get_load(*args, **kwargs):
        load = get_load_client_app_fn(*args, **kwargs)

        def load_checked(fab_id: str, fab_version: str, fab_hash: str):
            from flwr.common.config import get_project_dir

            if app_modules_outside(get_project_dir(fab_id, fab_version, fab_hash)):
                forget_app_modules()
            app = load(fab_id, fab_version, fab_hash)
            note_step("app_loaded")
            if report_fd is not None:
                report_task(report_fd, fab_id, fab_version, fab_hash)
                wait_for_warm_run()
            return app

        return load_checked

    return get_load


WARM_WAIT_S = 600.0  # the longest a run's first message waits for its run process to load the node's data


def needs_node_data(stage: str) -> bool:
    """Whether a message of this stage loads the node's data (fedpriv.kernel.protocol.message_stage's names)."""
    return not stage.startswith("secagg:") or stage == "secagg:collect_masked_vectors"


def wait_for_warm_run(timeout: float = WARM_WAIT_S) -> bool:
    """In a run's first message: wait until the run process has loaded the node's data, when this message needs
    them too. Both would otherwise redact and tokenise the same texts at once; after the wait this message
    reads them from the node's token cache (client/tokenized.py). Returns whether it waited.
    """
    fd = _task.pop("warm_fd", None)
    if fd is None:
        return False
    try:
        if not needs_node_data(_task.get("stage", "")):
            return False
        waiting = selectors.DefaultSelector()
        waiting.register(fd, selectors.EVENT_READ)
        waiting.select(timeout=timeout)  # the run process closes its end when warming is over (or it ends)
        waiting.close()
        _task["waited"] = True
        note_step("run_warm")
        return True
    finally:
        os.close(fd)


def report_task(fd: int, fab_id: str, fab_version: str, fab_hash: str) -> None:
    """Tell the run process what this task is (never the message: only run config, node config and FAB)."""
    context, run = _task.get("context"), _task.get("run")
    try:
        if context is not None and run is not None and _task.get("fab_hash") == fab_hash:
            report = {
                "run_id": int(context.run_id),
                "node_id": int(context.node_id),
                "node_config": dict(context.node_config),
                "run_config": dict(context.run_config),
                "fab_id": fab_id,
                "fab_version": fab_version,
                "fab_hash": fab_hash,
                "fab_sha256": _task.get("fab_sha256"),  # bytes this child installed and Flower verified
                "fab_dir": _task.get("fab_dir"),
            }
            send_frame(fd, json.dumps(report).encode())
    except (OSError, TypeError, ValueError):
        pass  # the run process stays cold: every message still runs
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def run_task(spec, report_fd: int | None = None) -> int:
    """In the forked child: Flower's ``run_clientapp`` for this task's token; returns the exit code."""
    code = 1
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)  # the parent's handlers would close the parent's connections
        name_process(CLIENTAPP_NAME)
        os.environ[ONE_MESSAGE_ENV] = "1"
        if spec.suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime import run_clientapp as clientapp_module
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        note_step("forked")
        clientapp_module.pull_task_input = noted_pull(clientapp_module.pull_task_input)
        clientapp_module.install_from_fab = remembered_install(clientapp_module.install_from_fab)
        clientapp_module.get_load_client_app_fn = checked_loader(clientapp_module.get_load_client_app_fn, report_fd)
        report_fd = None  # the loader owns it now

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

    The children also ask their SuperNode for a message's arrays promptly (fedpriv/runtime/object_pulls.py): a forked
    ClientApp starts before the SuperNode holds them, and Flower's 1-2-4-8 s back-off then cost 7-15 s.
    """
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.superexec import run_superexec as superexec_module

    from fedpriv.runtime import object_pulls

    object_pulls.install(inflatable_utils)

    flower_get_executor = superexec_module.get_executor

    def get_executor(executor_type, executor_config=None, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkExecutor()
        return flower_get_executor(executor_type, executor_config, **kwargs)

    superexec_module.get_executor = get_executor
    superexec_module.AutoExecPlugin = run_aware(superexec_module.AutoExecPlugin)


def run_aware(plugin_class):
    """Flower's SuperExec plugin, telling a ``ForkExecutor`` which run each task it launches belongs to."""
    if getattr(plugin_class, "fedpriv_run_aware", False):
        return plugin_class

    class RunAwarePlugin(plugin_class):
        fedpriv_run_aware = True

        def launch_task(self, token, task):
            note_run = getattr(self.executor, "note_run", None)
            if note_run is not None and getattr(task, "run_id", None):
                note_run(task.run_id)
            return super().launch_task(token, task)

    RunAwarePlugin.__name__ = RunAwarePlugin.__qualname__ = plugin_class.__name__
    return RunAwarePlugin


READY_LINE = "fedpriv-superexec: warm"  # printed once imports and caches are in: `fedpriv federation up` waits for it


def main() -> None:
    """``fedpriv-superexec``: ``flower-superexec`` with warm, forked ClientApp processes."""
    from fedpriv.runtime import patch_points

    patch_points.refuse_unless_fits("fedpriv-superexec")  # one line and exit 2 where Flower moved a patch point
    # started by fedpriv-supernode, whose AcquireTask waits for a task itself (fedpriv/runtime/node_wakeups.py): ask again
    # at once; from any other SuperNode, every 0.2 s
    os.environ.setdefault(POLL_ENV, LONG_POLL_INTERVAL_S if os.environ.get(LONG_POLL_ENV) else DEFAULT_POLL_S)
    loaded = preload()
    filled = warm_caches()
    print(f"{READY_LINE} ({len(loaded)} modules preloaded; {', '.join(filled) or 'no cache'} built)", file=sys.stderr)
    sys.stderr.flush()
    install()
    from flwr.supercore.cli import flower_superexec

    flower_superexec()


if __name__ == "__main__":
    main()
