"""One run's warm process on one node: it loads the node's data once and forks every message of the run.

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

import gc
import json
import os
import selectors
import signal
import sys

from fedpriv.runtime.clientapp_child import WARM_ENV, current_task, run_task, verified_fabs
from fedpriv.runtime.fork_safety import extra_threads, forget_app_modules, fork_is_safe, name_process
from fedpriv.runtime.pipe_frames import spec_from_bytes, take_frames

RUN_PROCESS_NAME = "fedpriv-run"  # what ps/top show for a run's warm process
WARM_HOOK = "warm_node"  # the ClientApp module's function that loads what every message of a run needs


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
                    current_task["warm_fd"] = warm_read
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
                verified_fabs[task["fab_sha256"]] = task["fab_dir"]
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
