"""Installing the fork executor into Flower's SuperExec (checked first: fedpriv/runtime/patch_points.py)."""

from __future__ import annotations

from fedpriv.runtime.fork_executor import ForkExecutor


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
