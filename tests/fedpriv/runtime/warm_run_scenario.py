"""Messages of two runs through ``ForkExecutor`` with warm run processes, in a fresh interpreter.

Run by tests/fedpriv/runtime/test_run_process.py as ``python -m tests.fedpriv.runtime.warm_run_scenario WORKDIR``: a process of
its own, because the run processes run torch (the model template) and a process forked from one that used an
OpenMP thread pool (an earlier test in the same pytest process) would hang. Flower's ``run_clientapp`` is
replaced by what it does up to the handler: pull the task (a made-up context per token), load the ClientApp
from the run's FAB (this checkout staged where Flower installs FABs), then, instead of a message handler,
record what the process holds and what the node's data and model calls return.

WORKDIR holds ``plan.json``: ``{"steps": [[run_id, token] or ["append-rows", n]...], ...}``; a token
``name/stage`` pulls a message of that stage (``query``, ``secagg:setup``...; plain ``train`` without one).
Each message's record is one JSON line in ``WORKDIR/records.jsonl``, under the token's name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

FAB_ID, FAB_VERSION = "fedpriv/fedpriv", "0.1.0"
FAB_HASHES = {1: "a" * 64, 2: "b" * 64}  # one FAB per run
OVERRIDES = "model.name=tiny data.labels.names=[neg,pos] training.batch_size=4 data.max_length=16"


def write_node(work: Path, rows: int) -> Path:
    lines = ["text,label"] + [
        f"{'good fine' if i % 2 else 'bad poor'} item {i},{'pos' if i % 2 else 'neg'}" for i in range(rows)
    ]
    (work / "notes.csv").write_text("\n".join(lines) + "\n")
    node_yaml = work / "node.yaml"
    if not node_yaml.exists():
        node_yaml.write_text(
            "org: clinic-a\n"
            "data: {path: notes.csv, text_column: text, label_column: label, test_fraction: 0.25}\n"
            "privacy: {target_epsilon: 5.0}\n"
            "device: cpu\n"
            "state_dir: state\n"
            "redaction: {enabled: false}\n"
        )
    return node_yaml


def main(work: Path) -> None:
    os.environ["FLWR_HOME"] = str(work / "flwr-home")
    plan = json.loads((work / "plan.json").read_text())
    node_yaml = write_node(work, plan.get("rows", 40))

    from flwr.app import Context, RecordDict
    from flwr.common.config import get_project_dir
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec
    from flwr.supernode.runtime import run_clientapp as runtime

    from fedpriv.commands.app_source import stage_app
    from fedpriv.runtime import clientapp_child, fork_executor

    for fab_hash in FAB_HASHES.values():  # what Flower's install_from_fab leaves: the app under FLWR_HOME
        stage_app(get_project_dir(FAB_ID, FAB_VERSION, fab_hash))
    records = work / "records.jsonl"

    def pull_task_input(client):
        del client
        token, _, stage = os.environ["SCENARIO_TOKEN"].partition("/")
        run_id = int(token.split("-")[0].removeprefix("run"))
        kind, _, secagg = (stage or "train").partition(":")
        configs = {"secaggplus_configs": {"stage": secagg}} if secagg else {}
        message = SimpleNamespace(  # what fedpriv.kernel.protocol.message_stage reads
            metadata=SimpleNamespace(message_type="train" if secagg else kind),
            content=SimpleNamespace(config_records=configs),
            has_content=lambda: True,
        )
        context = Context(
            run_id=run_id,
            node_id=7,
            node_config={"node-config": str(node_yaml)},
            state=RecordDict(),
            run_config={"config": "", "overrides": OVERRIDES, "resume": ""},
        )
        run = SimpleNamespace(run_id=run_id, fab_id=FAB_ID, fab_version=FAB_VERSION)
        fab = SimpleNamespace(hash_str=FAB_HASHES[run_id], content=f"fab {run_id}".encode())
        return message, context, run, fab

    def install_from_fab(fab_file, install_dir=None, skip_prompt=False):  # Flower's unzip-and-verify, noted
        os.environ["SCENARIO_INSTALLED"] = "1"
        run_id = int(fab_file.decode().split()[1])
        return get_project_dir(FAB_ID, FAB_VERSION, FAB_HASHES[run_id])

    def run_clientapp(**kwargs):  # Flower's steps up to the handler (no SuperNode here)
        os.environ["SCENARIO_TOKEN"] = kwargs["token"]
        _, context, run, fab = runtime.pull_task_input(None)
        node_module = sys.modules.get("fedpriv.client.node")
        held = {
            "nodes": len(node_module._NODES) if node_module else 0,
            "templates": len(node_module._TEMPLATES) if node_module else 0,
        }
        runtime.install_from_fab(fab.content, skip_prompt=True)
        runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str
        )  # a run's first message waits here for its run process when it needs the node's data
        cache = list((work / "state" / "token-cache").glob("*.pt"))
        from fedpriv.client import node, task
        from fedpriv.kernel.run_config import config_from_context

        cfg = config_from_context(context)
        cached = dict(node._NODES)
        local = node.local_node(cfg, context)
        model, _ = node.fresh_model(cfg.model, local.label_names)
        template, _ = node._template(cfg.model, local.label_names)
        record = {
            "token": kwargs["token"].partition("/")[0],
            "waited_for_run_process": "waited" in clientapp_child.current_task,
            "token_cache_before_load": bool(cache),
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "comm": Path("/proc/self/comm").read_text().strip(),
            "parent_comm": Path(f"/proc/{os.getppid()}/comm").read_text().strip(),
            "warm_env": bool(os.environ.get(clientapp_child.WARM_ENV)),
            "fab_unzipped_and_verified": bool(os.environ.get("SCENARIO_INSTALLED")),
            "held_before_load": held,
            "node_reused": any(local is kept for kept in cached.values()),
            "train_rows": len(local.train),
            "model_is_template": model is template,
            "node_module_file": node.__file__,
            "task_module_file": task.__file__,
            "app_dir": str(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)),
        }
        with records.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        raise SystemExit(0)

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab
    runtime.run_clientapp = run_clientapp

    executor = fork_executor.ForkExecutor(warm_runs=plan.get("warm_runs", 2), idle_s=600)
    done = 0
    for step in plan["steps"]:
        if step[0] == "append-rows":
            time.sleep(0.02)
            write_node(work, plan.get("rows", 40) + int(step[1]))
            continue
        run_id, token = step
        executor.note_run(run_id)
        spec = ExecutionSpec(
            task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token=token, insecure=True,
            root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
            suppress_output=False, task_id=done + 1, fab_hash=FAB_HASHES[run_id],
        )  # fmt: skip
        assert executor.launch(spec).status == "accepted"
        done += 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # one message at a time, as a node's SecAgg+ stages come
            if records.exists() and len(records.read_text().splitlines()) >= done:
                break
            executor.reconcile()
            time.sleep(0.02)
        else:
            raise SystemExit(f"no record for {token}")
    run_pids = {key: run.pid for key, run in executor.runs.items()}
    executor.close()
    deadline = time.monotonic() + 30
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    (work / "result.json").write_text(
        json.dumps({"run_pids": sorted(run_pids.values()), "left": sorted(executor.children)})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
