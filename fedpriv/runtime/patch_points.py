"""Every Flower internal that fedpriv's processes rebind or lean on, checked before anything is patched.

``fedpriv-superlink``, ``fedpriv-supernode`` and ``fedpriv-superexec`` are
Flower's own commands with some of Flower's module globals replaced (handlers,
the SuperNode loop's ``time`` and ``subprocess``, the SuperExec's executor
factory, ``run_clientapp``'s helpers, ``pull_objects``). A Flower release that
renames or reshapes one of them would make a patch silently do nothing, or
break a run half-way. Each patch here lists the Flower releases its code was
compared against and the exact names, parameters and (where Flower looks a
name up at call time and nothing better shows it) source text it relies on.
:func:`refuse_unless_fits` runs before a command patches anything: a release
outside the range, or one patch point that moved, stops the command with one
line naming the patch point, the installed Flower and what to run instead
(exit code 2). ``COMMAND --check-flower`` runs only that check (the kits'
start scripts use it to fall back to Flower's own commands).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

# The releases whose sources the patches were compared against (1.41 -> 1.42 moved none of them).
FLOWER_RANGE = ">=1.41,<1.43"
CHECK_FLAG = "--check-flower"  # `fedpriv-superlink --check-flower`: the check alone, exit 0 or 2
SPEEDUPS_ENV = "FEDPRIV_NODE_SPEEDUPS"  # 0: fedpriv-supernode with only the approved-app check (Flower's own loop)


@dataclass(frozen=True)
class Point:
    """One name a patch relies on; ``check`` returns what is wrong with it (None when it is as expected)."""

    where: str
    check: Callable[[], str | None]


def _resolve(module: str, name: str):
    """``module.name`` (``name`` may be dotted: ``Class.method``); raises LookupError when absent."""
    try:
        target = importlib.import_module(module)
    except ImportError as exc:
        raise LookupError(f"cannot be imported ({exc})") from None
    for part in name.split("."):
        if not hasattr(target, part):
            raise LookupError("is missing")
        target = getattr(target, part)
    return target


def _looked_up(module: str, name: str, test: Callable[[object], str | None]) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            return test(_resolve(module, name))
        except LookupError as exc:
            return str(exc)

    return check


def function(module: str, name: str, *params: str) -> Point:
    """A function (or method) that accepts at least ``params`` by name."""

    def test(target) -> str | None:
        if not callable(target):
            return "is not a function"
        try:
            accepted = inspect.signature(inspect.unwrap(target)).parameters
        except (TypeError, ValueError):
            return "has no inspectable signature"
        missing = [p for p in params if p not in accepted]
        return f"has no parameter {', '.join(map(repr, missing))}" if missing else None

    return Point(f"{module}.{name}", _looked_up(module, name, test))


def member(module: str, name: str) -> Point:
    """A name that must exist (a class, a constant, a module global the patch replaces)."""
    return Point(f"{module}.{name}", _looked_up(module, name, lambda target: None))


def value(module: str, name: str, expected: object) -> Point:
    """A constant whose value fedpriv's code repeats."""

    def test(target) -> str | None:
        return None if target == expected else f"is {target!r}, not {expected!r}"

    return Point(f"{module}.{name}", _looked_up(module, name, test))


def fields(module: str, name: str, *names: str) -> Point:
    """A dataclass with at least these fields (fedpriv builds or reads them by name)."""

    def test(target) -> str | None:
        if not dataclasses.is_dataclass(target):
            return "is not a dataclass"
        missing = sorted(set(names) - {f.name for f in dataclasses.fields(target)})
        return f"has no field {', '.join(map(repr, missing))}" if missing else None

    return Point(f"{module}.{name}", _looked_up(module, name, test))


def methods(module: str, name: str, *names: str) -> Point:
    """A protocol whose public methods are exactly ``names`` (what fedpriv's own implementation provides)."""

    def test(target) -> str | None:
        found = {n for n, v in vars(target).items() if callable(v) and not n.startswith("_")}
        if found == set(names):
            return None
        return f"asks for methods {sorted(found)}, fedpriv implements {sorted(names)}"

    return Point(f"{module}.{name}", _looked_up(module, name, test))


def message(module: str, name: str, *names: str) -> Point:
    """A protobuf message with these fields (a patch reads them from Flower's requests or answers)."""

    def test(target) -> str | None:
        descriptor = getattr(target, "DESCRIPTOR", None)
        missing = sorted(set(names) - set(getattr(descriptor, "fields_by_name", {})))
        return f"has no field {', '.join(map(repr, missing))}" if missing else None

    return Point(f"{module}.{name}", _looked_up(module, name, test))


def calls(module: str, text: str) -> Point:
    """Source text in ``module``: a call that Flower makes through a module global at call time (so rebinding the
    global reaches it), where no attribute or signature shows it."""

    def check() -> str | None:
        try:
            source = inspect.getsource(importlib.import_module(module))
        except (ImportError, OSError, TypeError) as exc:
            return f"has no readable source ({exc})"
        return None if text in source else f"no longer contains `{text}`"

    return Point(f"{module} (`{text}`)", check)


@dataclass(frozen=True)
class Patch:
    """What one fedpriv module does to Flower, the releases it was written for, and what to run without it."""

    name: str
    installed_by: str
    points: tuple[Point, ...]
    instead: str  # the end of the refusal line: what the operator runs instead
    flower: str = FLOWER_RANGE


FLEET = "flwr.superlink.servicer.fleet.fleet_handlers"
LINK_RUNTIME = "flwr.superlink.servicer.runtime.runtime_handlers"
NODE_LOOP = "flwr.supernode.start_client_internal"
NODE_RUNTIME = "flwr.supernode.servicer.runtime.runtime_handlers"
INFLATABLE = "flwr.supercore.inflatable.inflatable_utils"
SUPEREXEC = "flwr.supercore.superexec.run_superexec"
EXECUTOR_TYPES = "flwr.supercore.superexec.executor.types"
CLIENTAPP = "flwr.supernode.runtime.run_clientapp"
SECAGG = "flwr.common.secure_aggregation.secaggplus_constants"

RUN_FLOWER_SUPERLINK = "run flower-superlink instead"
RUN_WITHOUT_SPEEDUPS = (
    f"run fedpriv-supernode with {SPEEDUPS_ENV}=0 instead (Flower's own SuperNode loop and flower-superexec, with the"
    " approved-app check; start-supernode.sh does so by itself)"
)

SUPERLINK_LONG_POLLS = Patch(
    "the SuperLink's long polls",
    "fedpriv/runtime/superlink.py",
    (
        function(FLEET, "pull_messages", "request", "state", "store"),
        function(FLEET, "push_messages", "request", "state"),
        function(LINK_RUNTIME, "push_messages", "request", "state", "task"),
        function(LINK_RUNTIME, "pull_messages", "request", "state", "task"),
        calls("flwr.superlink.routers.fleet.router", "fleet_handlers.pull_messages("),
        calls("flwr.superlink.routers.fleet.router", "fleet_handlers.push_messages("),
        calls("flwr.supercore.routers.runtime.router", "handlers.push_messages("),
        calls("flwr.supercore.routers.runtime.router", "handlers.pull_messages("),
        message("flwr.proto.fleet_pb2", "PullMessagesResponse", "messages_list"),
        message("flwr.proto.runtime_pb2", "PullAppMessagesResponse", "messages_list"),
        member("flwr.superlink.cli.flower_superlink", "flower_superlink"),
    ),
    RUN_FLOWER_SUPERLINK,
)

APPROVED_APPS = Patch(
    "the approved-app check",
    "client/app_approval.py",
    (
        function(
            NODE_LOOP,
            "_pull_and_store_message",
            "state",
            "object_store",
            "receive",
            "get_run",
            "get_fab",
            "pull_object",
        ),
        function(NODE_LOOP, "_insert_message", "msg", "state", "store"),
        calls(NODE_LOOP, "run_id = _pull_and_store_message("),
        member("flwr.supernode.cli", "flower_supernode"),
        function("flwr.common.config", "parse_config_args"),
    ),
    "flower-supernode would run any app: FEDPRIV_SUPERNODE=flower-supernode ./start-supernode.sh if that is acceptable",
)

NODE_LOOP_WAITS = Patch(
    "the SuperNode loop's short waits",
    "fedpriv/runtime/supernode.py, fedpriv/runtime/node_wakeups.py",
    (
        member(NODE_LOOP, "time"),
        member(NODE_LOOP, "subprocess"),
        calls(NODE_LOOP, "time.sleep(3)"),
        calls(NODE_LOOP, '["flower-superexec"]'),
        calls(NODE_LOOP, "subprocess.Popen(command)"),
        *(function(NODE_RUNTIME, name, "request", "state") for name in ("push_task_output", "push_messages")),
        function(NODE_RUNTIME, "push_object", "request", "state"),
        function(NODE_RUNTIME, "acquire_task", "request", "state"),
        message("flwr.proto.runtime_pb2", "AcquireTaskRequest", "supported_task_types"),
        message("flwr.proto.runtime_pb2", "AcquireTaskResponse", "task"),
    ),
    RUN_WITHOUT_SPEEDUPS,
)

OBJECT_PULLS = Patch(
    "prompt object pulls",
    "fedpriv/runtime/object_pulls.py",
    (
        function(INFLATABLE, "pull_objects", "object_ids", "pull_object_fn", "initial_backoff", "backoff_cap"),
        member(INFLATABLE, "ObjectUnavailableError"),
    ),
    RUN_WITHOUT_SPEEDUPS,
)

NODE_OBJECT_PULLS = Patch(
    "prompt object pulls in the SuperNode loop",
    "fedpriv/runtime/object_pulls.py",
    (function(NODE_LOOP, "pull_objects", "object_ids", "pull_object_fn", "initial_backoff", "backoff_cap"),),
    RUN_WITHOUT_SPEEDUPS,
)

WARM_SUPEREXEC = Patch(
    "the warm SuperExec",
    "fedpriv/runtime/superexec_patch.py, fedpriv/runtime/clientapp_child.py",
    (
        function(SUPEREXEC, "get_executor", "executor_type", "executor_config"),
        calls(SUPEREXEC, "get_executor("),
        function(SUPEREXEC, "AutoExecPlugin.launch_task", "self", "token", "task"),
        calls(SUPEREXEC, "AutoExecPlugin("),
        member("flwr.supercore.constant", "ExecutorType.SUBPROCESS"),
        member("flwr.supercore.constant", "TaskType.CLIENT_APP"),
        methods(
            EXECUTOR_TYPES, "Executor", "get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close"
        ),
        fields(
            EXECUTOR_TYPES,
            "ExecutionSpec",
            "task_type",
            "runtime_api_address",
            "token",
            "insecure",
            "root_certificates_path",
            "runtime_dependency_install",
            "parent_pid",
            "suppress_output",
            "fab_hash",
        ),
        member(EXECUTOR_TYPES, "LaunchResult.accepted"),
        function("flwr.supercore.superexec.executor.subprocess_executor", "SubprocessExecutor.launch", "spec"),
        function(
            CLIENTAPP,
            "run_clientapp",
            "runtime_api_address",
            "token",
            "insecure",
            "certificates",
            "parent_pid",
            "runtime_dependency_install",
        ),
        function(CLIENTAPP, "pull_task_input", "client"),
        function(CLIENTAPP, "install_from_fab", "fab_file", "install_dir", "skip_prompt"),
        function(CLIENTAPP, "get_load_client_app_fn", "default_app_ref", "app_path", "multi_app"),
        *(calls(CLIENTAPP, f"{name}(") for name in ("pull_task_input", "install_from_fab", "get_load_client_app_fn")),
        function("flwr.supercore.tls", "validate_and_resolve_root_certificates"),
        function("flwr.common.config", "get_project_dir"),
        function("flwr.common.config", "get_project_config"),
        member("flwr.supercore.cli", "flower_superexec"),
    ),
    "run flower-superexec instead",
)

MASKED_VECTORS = Patch(
    "SecAgg+ masked vectors as 32-bit words",
    "fedpriv/runtime/masked_vectors.py",
    (
        value(SECAGG, "RECORD_KEY_CONFIGS", "secaggplus_configs"),
        value(SECAGG, "Key.MASKED_PARAMETERS", "masked_params"),
    ),
    RUN_WITHOUT_SPEEDUPS,
)

# What each command installs, in the order checked. fedpriv-supernode installs the superexec's patches too: it
# starts fedpriv-superexec, which would refuse.
NODE_SPEEDUPS = (NODE_LOOP_WAITS, NODE_OBJECT_PULLS, OBJECT_PULLS, WARM_SUPEREXEC, MASKED_VECTORS)
COMMANDS: dict[str, tuple[Patch, ...]] = {
    "fedpriv-superlink": (SUPERLINK_LONG_POLLS,),
    "fedpriv-supernode": (APPROVED_APPS, *NODE_SPEEDUPS),
    "fedpriv-superexec": (WARM_SUPEREXEC, OBJECT_PULLS),
}


def installed_flower() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return "not installed"


def _in_range(installed: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(spec).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        return False


def problem(patches: tuple[Patch, ...], flower: str | None = None) -> str | None:
    """Why these patches do not fit the installed Flower (one phrase), or None when every patch point is in place."""
    flower = installed_flower() if flower is None else flower
    for patch in patches:
        if not _in_range(flower, patch.flower):
            return (
                f"flwr {flower} is outside the releases {patch.name} ({patch.installed_by}) was written for"
                f" (flwr{patch.flower}; first patch point {patch.points[0].where})"
            )
        for point in patch.points:
            wrong = point.check()
            if wrong:
                return (
                    f"patch point {point.where} {wrong} in flwr {flower}"
                    f" ({patch.name}, {patch.installed_by}, written for flwr{patch.flower})"
                )
    return None


def refusal(command: str, patches: tuple[Patch, ...] | None = None, flower: str | None = None) -> str | None:
    """The one line ``command`` refuses to start with (None when its patches fit the installed Flower)."""
    patches = COMMANDS[command] if patches is None else patches
    for patch in patches:
        wrong = problem((patch,), flower)
        if wrong:
            return f"{command}: refusing to patch Flower: {wrong}; {patch.instead}"
    return None


def refuse_unless_fits(command: str, patches: tuple[Patch, ...] | None = None) -> None:
    """Stop ``command`` with its one line and exit code 2 unless every patch point is in place; with
    ``--check-flower`` as its only argument, end here (exit 0) when they are."""
    line = refusal(command, patches)
    if line:
        print(line, file=sys.stderr)
        raise SystemExit(2)
    if sys.argv[1:] == [CHECK_FLAG]:
        raise SystemExit(0)
