"""What a node process keeps between messages: its data (re-read when a file changes) and the model template."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from fedpriv.client import node
from fedpriv.kernel.config import load_config

OVERRIDES = ["model.name=tiny", "data.labels.names=[neg, pos]", "training.batch_size=4", "data.max_length=16"]


def _write(tmp_path, rows: int, target_epsilon: float = 5.0) -> Context:
    lines = ["text,label"] + [f"{'good' if i % 2 else 'bad'} item {i},{'pos' if i % 2 else 'neg'}" for i in range(rows)]
    (tmp_path / "notes.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "node.yaml").write_text(
        "org: clinic-a\n"
        "data: {path: notes.csv, test_fraction: 0.25}\n"
        f"privacy: {{target_epsilon: {target_epsilon}}}\n"
        "device: cpu\n"
        "redaction: {enabled: false}\n"
    )
    return Context(
        run_id=1, node_id=7, node_config={"node-config": str(tmp_path / "node.yaml")}, state=RecordDict(), run_config={}
    )


@pytest.fixture
def fresh_caches(monkeypatch):
    monkeypatch.setattr(node, "_NODES", type(node._NODES)())
    monkeypatch.setattr(node, "_TEMPLATES", {})
    monkeypatch.setattr(node, "_HANDED_OUT", set())


def test_a_deployment_nodes_data_is_kept_until_one_of_its_files_changes(tmp_path, fresh_caches):
    cfg = load_config(overrides=OVERRIDES)
    context = _write(tmp_path, 40)
    first = node.local_node(cfg, context)
    assert node.local_node(cfg, context) is first  # nothing changed: not read again
    assert [path for path, _ in first.sources] == [str(tmp_path / "node.yaml"), str(tmp_path / "notes.csv")]
    _write(tmp_path, 48)  # the data file changed (node.yaml rewritten with the same bytes)
    second = node.local_node(cfg, context)
    assert second is not first and len(second.train) == 36 and len(first.train) == 30
    assert node.local_node(cfg, context) is second
    _write(tmp_path, 48, target_epsilon=3.0)  # only node.yaml's budget changed
    third = node.local_node(cfg, context)
    assert third is not second and third.target_epsilon == 3.0
    (tmp_path / "notes.csv").unlink()  # a file that went away is not served from memory either
    with pytest.raises(Exception, match="notes.csv"):
        node.local_node(cfg, context)


def test_a_one_message_process_gets_the_template_itself_and_later_models_are_clean_copies(fresh_caches, monkeypatch):
    cfg = load_config(overrides=OVERRIDES)
    monkeypatch.setenv(node.ONE_MESSAGE_ENV, "1")
    template, digest = node._template(cfg.model, ["neg", "pos"])
    clean = {name: tensor.clone() for name, tensor in template.state_dict().items()}
    model, model_digest = node.fresh_model(cfg.model, ["neg", "pos"])
    assert model is template and model_digest == digest  # no copy: the forked process's memory is its own
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # what training does to it
    again, again_digest = node.fresh_model(cfg.model, ["neg", "pos"])
    assert again is not model and again_digest == digest
    assert all(torch.equal(again.state_dict()[name], clean[name]) for name in clean)  # rebuilt, not the trained one
    monkeypatch.delenv(node.ONE_MESSAGE_ENV)
    copy, _ = node.fresh_model(cfg.model, ["neg", "pos"])
    assert copy is not node._template(cfg.model, ["neg", "pos"])[0]  # everywhere else: a copy, as before


def test_the_coordinators_run_config_cannot_switch_off_an_organisations_dp(tmp_path, fresh_caches):
    """privacy.enabled=false comes from the coordinator: a node trains without DP only if its own node.yaml allows it."""
    cfg = load_config(overrides=[*OVERRIDES, "privacy.enabled=false"])
    context = _write(tmp_path, 40)
    with pytest.raises(node.NodeSetupError, match="organisation 'clinic-a': the run asks for training without DP"):
        node.local_node(cfg, context)
    text = (
        (tmp_path / "node.yaml")
        .read_text()
        .replace("target_epsilon: 5.0}", "target_epsilon: 5.0, allow_non_private: true}")
    )
    (tmp_path / "node.yaml").write_text(text)
    assert len(node.local_node(cfg, context).train) == 30


def test_what_a_deployment_node_shares_is_its_organisations_own_setting_not_the_run_configs(tmp_path, fresh_caches):
    """privacy.share_training_loss / share_per_class_eval and redaction.share come from node.yaml (issue 26)."""
    from fedpriv.client.disclosures import Sharing

    cfg = load_config(
        overrides=[
            *OVERRIDES,
            "privacy.share_training_loss=true",
            "privacy.share_per_class_eval=false",
            "redaction.share=counts",
        ]
    )
    context = _write(tmp_path, 40)
    assert node.local_node(cfg, context).sharing == Sharing(training_loss=False, per_class_eval=True, redaction="kinds")
    text = (
        (tmp_path / "node.yaml")
        .read_text()
        .replace("target_epsilon: 5.0}", "target_epsilon: 5.0, share_training_loss: true, share_per_class_eval: false}")
        .replace("redaction: {enabled: false}", "redaction: {enabled: false, share: none}")
    )
    (tmp_path / "node.yaml").write_text(text)
    assert node.local_node(cfg, context).sharing == Sharing(training_loss=True, per_class_eval=False, redaction="none")
    # a simulation: the run config speaks for every virtual organisation
    assert Sharing.from_run_config(cfg) == Sharing(training_loss=True, per_class_eval=False, redaction="counts")


def test_a_deployment_node_keeps_its_exact_redaction_counts_to_itself(tmp_path, fresh_caches):
    """By default the kinds found leave the node, not how many; the organisation still has the counts."""
    import json

    cfg = load_config(overrides=OVERRIDES)
    context = _write(tmp_path, 40)
    text = (tmp_path / "notes.csv").read_text().replace("good item 1,", "good item 1 mail ann@example.org,")
    (tmp_path / "notes.csv").write_text(text)
    yaml = (tmp_path / "node.yaml").read_text()
    yaml = yaml.replace("redaction: {enabled: false}", "redaction: {enabled: true, kinds: [email]}")
    (tmp_path / "node.yaml").write_text(yaml + f"state_dir: {tmp_path / 'state'}\n")
    local = node.local_node(cfg, context)
    assert local.redaction["share"] == "kinds" and local.redaction["found"] == ["email"]
    assert "counts" not in local.redaction
    own = json.loads((tmp_path / "state" / node.OWN_REDACTION_FILE).read_text())
    assert own["counts"] == {"email": 1} and own["note"] == "kept by the node; never sent"


def test_a_deployment_node_says_its_class_counts_and_cut_texts_once_and_keeps_them_to_itself(
    tmp_path, fresh_caches, capsys
):
    """The plan of a deployed node: its own class counts (a rare label named) and texts cut at max_length,
    in its log and its state folder, never in a reply (issue 27)."""
    import json

    from fedpriv.client.data_report import REPORT_FILE

    cfg = load_config(overrides=OVERRIDES)
    context = _write(tmp_path, 40)
    long_row = "good " + " ".join(["item"] * 30) + ",pos"  # past data.max_length=16 tokens
    (tmp_path / "notes.csv").write_text((tmp_path / "notes.csv").read_text() + long_row + "\n")
    yaml = (tmp_path / "node.yaml").read_text().replace("test_fraction: 0.25", "test_fraction: 0.25, max_length: 16")
    (tmp_path / "node.yaml").write_text(yaml + f"state_dir: {tmp_path / 'state'}\n")
    local = node.local_node(cfg, context)
    said = capsys.readouterr().err
    report = json.loads((tmp_path / "state" / REPORT_FILE).read_text())
    assert report["class_counts"] == {"neg": 20, "pos": 21} and report["note"] == "kept by the node; never sent"
    assert report["sizes"] == {"train": len(local.train), "test": len(local.test)}
    assert report["truncation"]["truncated"] == 1 and report["truncation"]["texts"] == 41
    assert (
        "fedpriv node: data of clinic-a" in said
        and "texts cut at data.max_length=16 (train + test): clinic-a 2%" in said
    )
    assert "warning" not in said  # 2% cut, no class below 5
    node._NODES.clear()  # a new message's process: the same data is not said again
    node.local_node(cfg, context)
    assert capsys.readouterr().err == ""
    (tmp_path / "notes.csv").write_text((tmp_path / "notes.csv").read_text() + "one odd row,pos\n")
    node.local_node(cfg, context)  # the data changed: said again
    assert "clinic-a 2%" in capsys.readouterr().err
