"""The executor ``fedpriv-superexec`` gives Flower's task loop: one forked child per ClientApp task.

A task of a run with a warm process (fedpriv/runtime/run_process.py) goes down that process's pipe and is
forked there; any other ClientApp task is forked from the SuperExec itself; other task types get Flower's
own cold start.
"""

from __future__ import annotations

import gc
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from fedpriv.kernel.env_settings import env_number
from fedpriv.runtime.clientapp_child import run_task
from fedpriv.runtime.fork_safety import forget_app_modules, fork_is_safe
from fedpriv.runtime.pipe_frames import send_frame, spec_to_bytes
from fedpriv.runtime.run_process import RunProcess

WARM_RUNS_ENV = "FEDPRIV_WARM_RUNS"  # runs that keep a warm run process on this node at once (0: none)
DEFAULT_WARM_RUNS = 2
WARM_IDLE_ENV = "FEDPRIV_WARM_RUN_IDLE_S"  # a run process with no message for this long ends
DEFAULT_WARM_IDLE_S = 1800.0
RUN_RESTARTS = 2  # a run whose warm process died this often gets plain forks for the rest of its life


def _setting(name: str, default: float, low: float, high: float) -> float:
    return env_number("fedpriv-superexec", name, default, low, high)


def warm_runs_setting() -> int:
    return int(_setting(WARM_RUNS_ENV, DEFAULT_WARM_RUNS, 0, 64))


def warm_idle_setting() -> float:
    return _setting(WARM_IDLE_ENV, DEFAULT_WARM_IDLE_S, 1, 7 * 24 * 3600)


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
