"""A forked ClientApp child: Flower's ``run_clientapp`` for one task, with the helpers it calls rewired.

The child runs exactly what ``flwr-clientapp`` would, with Flower's own token handling; the wrappers only
note what the task was (for the run's warm process), skip re-verifying a FAB whose bytes a sibling already
verified, and make sure the ClientApp's code comes from the run's FAB, never from another one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import selectors
import signal
import sys
import time
from pathlib import Path

from fedpriv.kernel.protocol import message_stage
from fedpriv.runtime.fork_safety import app_modules_outside, forget_app_modules, name_process
from fedpriv.runtime.pipe_frames import send_frame

CLIENTAPP_NAME = "flwr-clientapp"  # what ps/top show for a forked ClientApp (its command line is the parent's)

STAGE_TIMINGS_ENV = "FEDPRIV_STAGE_TIMINGS"  # client/stage_timing.py: benchmarks only
PULLED_AT_ENV = "FEDPRIV_TASK_INPUT_PULLED_AT"
WARM_ENV = "FEDPRIV_WARM_RUN"  # set in a child forked from a warm run process (client/stage_timing.py reports it)
STEPS_ENV = "FEDPRIV_TASK_STEPS"  # a child's start-up steps, wall clock (client/stage_timing.py reports them)
ONE_MESSAGE_ENV = "FEDPRIV_ONE_MESSAGE_PROCESS"  # client/node.py: this process serves one message, then ends


current_task: dict = {}  # in a ClientApp child: what it pulled (context, run), for its report to the run process
_steps: dict[str, float] = {}  # in a ClientApp child, with stage timings on: when each start-up step ended
# FABs (SHA-256 of their bytes -> installed folder) that a child of this run process installed and verified
verified_fabs: dict[str, str] = {}


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
        current_task.update(context=context, run=run, fab_hash=fab.hash_str, stage=stage)
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
        known = verified_fabs.get(digest) if digest and install_dir is None else None
        if known and os.path.isdir(known):
            path = Path(known)
        else:
            path = install_from_fab(fab_file, install_dir, skip_prompt)
            if digest:
                current_task["fab_sha256"], current_task["fab_dir"] = digest, str(path)
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
    fd = current_task.pop("warm_fd", None)
    if fd is None:
        return False
    try:
        if not needs_node_data(current_task.get("stage", "")):
            return False
        waiting = selectors.DefaultSelector()
        waiting.register(fd, selectors.EVENT_READ)
        waiting.select(timeout=timeout)  # the run process closes its end when warming is over (or it ends)
        waiting.close()
        current_task["waited"] = True
        note_step("run_warm")
        return True
    finally:
        os.close(fd)


def report_task(fd: int, fab_id: str, fab_version: str, fab_hash: str) -> None:
    """Tell the run process what this task is (never the message: only run config, node config and FAB)."""
    context, run = current_task.get("context"), current_task.get("run")
    try:
        if context is not None and run is not None and current_task.get("fab_hash") == fab_hash:
            report = {
                "run_id": int(context.run_id),
                "node_id": int(context.node_id),
                "node_config": dict(context.node_config),
                "run_config": dict(context.run_config),
                "fab_id": fab_id,
                "fab_version": fab_version,
                "fab_hash": fab_hash,
                "fab_sha256": current_task.get("fab_sha256"),  # bytes this child installed and Flower verified
                "fab_dir": current_task.get("fab_dir"),
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
