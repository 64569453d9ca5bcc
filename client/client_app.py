"""The organisation's Flower ClientApp: DP local training, local evaluation and the pre-flight before round 1.

One ClientApp for simulation and deployment. ``fedpriv simulate`` builds it
with the resolved config (``build_client_app(cfg)``); under ``flwr run`` the
module-level ``app`` reads ``config``/``overrides`` from the run config.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedpriv.client.stage_timing import phase, stage_timings
from fedpriv.kernel import protocol
from fedpriv.kernel.atomic_files import disk_error, is_disk_failure
from fedpriv.kernel.config import FedPrivConfig
from fedpriv.kernel.errors import DiskError
from fedpriv.kernel.legacy_messages import (
    evaluate_reply_to_legacy,
    fit_reply_to_legacy,
    is_legacy_evaluate,
    is_legacy_fit,
    legacy_evaluate_to_content,
    legacy_fit_to_content,
)
from fedpriv.kernel.quiet import quiet_flower_debug, quiet_third_party_warnings
from fedpriv.kernel.run_config import config_from_context

SECAGG_CONFIGS = "secaggplus_configs"  # the ConfigRecord Flower's SecAgg+ workflow adds to its messages


def handle_train(cfg: FedPrivConfig, msg: Message, context: Context) -> Message:
    """Train on new-API records, or on the legacy ``fitins`` records of the SecAgg+ workflow."""
    with phase("imports"):
        from fedpriv.client import task  # torch and friends: only in the process that trains

    if is_legacy_fit(msg.content):
        with phase("setup"):
            layout = task.node_trainable_layout(cfg, context)
        content = task.train_content(cfg, legacy_fit_to_content(msg.content, layout), context)
        if protocol.REFUSAL in content:
            # SecAgg+ has no way to say "no" inside a round: the node drops out of it. Its refusal is in its
            # ledger and reaches the coordinator with its next evaluate reply.
            raise task.NodeSetupError(
                f"organisation '{content[protocol.REFUSAL]['org']}' refuses to train: {content[protocol.REFUSAL]['reason']}"
            )
        if protocol.DIVERGED in content:  # the same: it drops out (its spending reaches the coordinator likewise)
            from fedpriv.client.node import TrainingDivergedError

            raise TrainingDivergedError(
                f"organisation '{content[protocol.DIVERGED]['org']}': {content[protocol.DIVERGED]['reason']}"
            )
        reply = fit_reply_to_legacy(content, layout)
    else:
        reply = task.train_content(cfg, msg.content, context)
    return Message(reply, reply_to=msg)


def handle_evaluate(cfg: FedPrivConfig, msg: Message, context: Context) -> Message:
    with phase("imports"):
        from fedpriv.client import task

    if is_legacy_evaluate(msg.content):
        with phase("setup"):
            layout = task.node_trainable_layout(cfg, context)
        reply = evaluate_reply_to_legacy(
            task.evaluate_content(cfg, legacy_evaluate_to_content(msg.content, layout), context)
        )
    else:
        reply = task.evaluate_content(cfg, msg.content, context)
    return Message(reply, reply_to=msg)


def secagg_when_requested(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod, only for messages of the SecAgg+ workflow (one ClientApp for all paths)."""
    if SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        from fedpriv.runtime import masked_vectors

        reply = secaggplus_mod(msg, context, call_next)
        if reply.has_content():
            masked_vectors.pack(reply.content)  # 32-bit words on the wire: half of Flower's int64 upload
        return reply
    return call_next(msg, context)


def handle_query(cfg: FedPrivConfig, msg: Message, context: Context) -> Message:
    """The coordinator's pre-flight before round 1 (server/preflight.py): get ready and say how."""
    with phase("imports"):
        from fedpriv.client import task

    return Message(task.ready_content(cfg, msg.content, context), reply_to=msg)


def warm_node(context: Context) -> None:
    """Load what every message of this run needs on this node, ahead of its messages.

    Called by ``fedpriv-superexec``'s warm run process (fedpriv/runtime/superexec.py) once it knows the run, and
    again before it forks each message, so every message's process starts with the node's tokenised data
    and the model template in memory. Only what ``local_node`` and the model template cache hold (a changed
    file is read again); never privacy state, which every message reads from disk and writes itself.
    """
    from fedpriv.client import task

    task.warm_node(config_from_context(context), context)


def answer_disk_errors(handle, cfg: FedPrivConfig, msg: Message, context: Context) -> Message:
    """``handle``'s reply; a file the node cannot write (full disk, read-only state folder) is an error reply
    of one line naming the file and the errno, never a traceback in the coordinator's output.

    Nothing else leaves the node then: an update is sent only after its ledger entry is written.
    """
    try:
        return handle(cfg, msg, context)
    except Exception as exc:
        if not isinstance(exc, DiskError) and not is_disk_failure(exc):
            raise
        error = exc if isinstance(exc, DiskError) else disk_error(getattr(exc, "filename", None) or "a file", exc)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"DiskError: {error}"), reply_to=msg)


def build_client_app(config: FedPrivConfig | None = None) -> ClientApp:
    """The ClientApp; with ``config`` None it is read from each run's run config."""
    app = ClientApp()

    @app.train(mods=[stage_timings, secagg_when_requested])
    def train(msg: Message, context: Context) -> Message:
        return answer_disk_errors(handle_train, config or config_from_context(context), msg, context)

    @app.evaluate(mods=[stage_timings])
    def evaluate_(msg: Message, context: Context) -> Message:
        return answer_disk_errors(handle_evaluate, config or config_from_context(context), msg, context)

    @app.query(mods=[stage_timings])
    def query(msg: Message, context: Context) -> Message:
        return answer_disk_errors(handle_query, config or config_from_context(context), msg, context)

    return app


quiet_third_party_warnings()
quiet_flower_debug()
app = build_client_app()
