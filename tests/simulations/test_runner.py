"""The simulation runner's checks before any training."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fedpriv.kernel.config import load_config
from fedpriv.kernel.errors import ConfigError
from fedpriv.simulations.runner import describe_plan, preflight, resolve_run_dir

TINY = ["model.name=tiny", "partitioning.num_orgs=3", "data.max_examples=300", "training.batch_size=16"]


def _with_out(cfg, path):
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(path)))


def test_an_existing_run_folder_is_never_reused(tmp_path):
    cfg = load_config(overrides=TINY)
    path, lock = resolve_run_dir(_with_out(cfg, tmp_path / "new"))
    assert path == (tmp_path / "new").resolve() and path.is_dir()
    lock.release()
    path, lock = resolve_run_dir(_with_out(cfg, tmp_path / "new"))  # empty but for the released lock: fine
    lock.release()
    (tmp_path / "new" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="--out .*already exists"):
        resolve_run_dir(_with_out(cfg, tmp_path / "new"))


def test_preflight_plans_every_organisation_and_rejects_unknown_privacy_overrides():
    cfg = load_config(overrides=[*TINY, "privacy.orgs={org-1: {target_epsilon: 2}}"])
    plan = preflight(cfg)
    assert [o.name for o in plan.partitions.orgs] == ["org-0", "org-1", "org-2"]
    assert plan.privacy["org-1"].target_epsilon == 2.0 and plan.privacy["org-0"].target_epsilon == 8.0
    # a tighter budget needs more noise
    assert plan.privacy["org-1"].noise_multiplier > plan.privacy["org-0"].noise_multiplier
    assert "org-1" in describe_plan(cfg, plan) and "sigma" in describe_plan(cfg, plan)
    with pytest.raises(ConfigError, match="unknown organisation"):
        preflight(load_config(overrides=[*TINY, "privacy.orgs={hospital-z: {target_epsilon: 2}}"]))


def test_dp_off_plan_says_so():
    cfg = load_config(overrides=[*TINY, "privacy.enabled=false"])
    plan = preflight(cfg)
    assert plan.privacy == {}
    assert "DP is OFF" in describe_plan(cfg, plan)


def test_quiet_flower_logs_still_show_a_node_error_reply():
    import logging

    from fedpriv.simulations.runner import NodeFailuresOnly

    keep = NodeFailuresOnly()

    def record(level, msg, args=()):
        return logging.LogRecord("flwr", level, __file__, 1, msg, args, None)

    assert keep.filter(record(logging.INFO, "\\t> Received error in reply from node %d: %s"))
    assert keep.filter(record(logging.WARNING, "anything"))
    assert not keep.filter(record(logging.INFO, "configure_train: Sampled %s nodes (out of %s)"))
    assert not keep.filter(record(logging.WARNING, "DEPRECATED FEATURE: %s", ("The `run_simulation` function ...",)))
    assert keep.filter(record(logging.WARNING, "DEPRECATED FEATURE: %s", ("something else",)))


def test_the_final_report_of_a_run_whose_last_round_was_not_evaluated_is_a_sentence_not_a_crash():
    from fedpriv.server.reports import final_report

    summary = {"status": "incomplete", "rounds": [{}], "final": {"accuracy": None, "macro_f1": None, "loss": None}}
    report = final_report(summary)
    assert "Run incomplete: 1 rounds" in report
    assert "not evaluated in the last round" in report
    summary["final"] = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0}
    assert "accuracy 0.500, macro-F1 0.400, loss 1.000" in final_report(summary)


def test_the_default_gradient_canaries_fit_the_model_and_the_plan_says_how_far_they_reach():
    """The tiny model with LoRA has 4,421 trainable coordinates: the default audit uses them all and says it
    cannot reach epsilon 8; a number asked for explicitly that does not fit stops the run before training."""
    from fedpriv.client.node import trainable_layout
    from fedpriv.privacy.audit_canaries import fitted

    cfg = load_config(overrides=[*TINY, "canary_audit.enabled=true"])
    plan = preflight(cfg)
    assert fitted(cfg, 4421).count == 4421 and fitted(cfg, 10**6).count == 16000
    coordinates = sum(math.prod(shape) for _, shape in trainable_layout(cfg.model, plan.partitions.label_names))
    assert coordinates < 16000
    text = describe_plan(cfg, plan)
    assert f"Canary audit: {coordinates} gradient" in text and "cannot contradict a claim above" in text
    with pytest.raises(ConfigError, match="canary_audit.canaries: 20000 gradient canaries"):
        preflight(load_config(overrides=[*TINY, "canary_audit.enabled=true", "canary_audit.canaries=20000"]))


def _labelled_csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def _two_orgs(path):
    """A tiny run over ``path`` at data.max_length=16, shared by two organisations."""
    return load_config(
        overrides=[
            "model.name=tiny", "data.source=file", f"data.path={path}", "data.max_length=16",
            "partitioning.scheme=iid", "partitioning.num_orgs=2", "training.batch_size=4",
        ]
    )  # fmt: skip


def test_the_plan_shows_each_organisations_class_counts_names_a_rare_label_and_counts_cut_texts(tmp_path):
    """A mistyped label became a class of its own unseen; Dirichlet skew and cut texts were invisible (issue 27)."""
    from collections import Counter

    from fedpriv.shared_models.builder import build_tokenizer

    long_text = " ".join(["word"] * 40)  # far past data.max_length=16 tokens
    rows = [(long_text if i % 4 == 0 else f"short text {i}", "pos" if i % 2 else "neg") for i in range(60)]
    rows.append(("one mistyped label", "pso"))
    path = _labelled_csv(tmp_path / "notes.csv", rows)
    cfg = _two_orgs(path)
    plan = preflight(cfg)
    text = describe_plan(cfg, plan)
    names = plan.partitions.label_names
    assert names == ["neg", "pos", "pso"]
    header = next(line for line in text.splitlines() if line.split()[:3] == ["org", "n_train", "n_test"])
    assert header.split()[3:] == names  # the class order of the data
    tokenizer = build_tokenizer("tiny")
    for org in plan.partitions.orgs:
        counts = Counter(org.train.labels + org.test.labels)
        row = next(line.split() for line in text.splitlines() if line.split()[:1] == [org.name])
        if len(row) == 3 + len(names):  # the class-count row (the privacy row has more columns)
            assert row[1:3] == [str(len(org.train)), str(len(org.test))]
            assert row[3:] == [str(counts.get(i, 0)) for i in range(len(names))], text
        texts = org.train.texts + org.test.texts
        cut = sum(len(ids) > 16 for ids in tokenizer(texts, truncation=False)["input_ids"])
        assert plan.truncation[org.name].truncated == cut and plan.truncation[org.name].texts == len(texts)
        assert f"{org.name} {cut / len(texts):.0%} (median" in text
    total = next(line.split() for line in text.splitlines() if line.split()[:1] == ["all"])
    assert total[1:3] == [
        str(sum(len(o.train) for o in plan.partitions.orgs)),
        str(sum(len(o.test) for o in plan.partitions.orgs)),
    ]
    assert total[3:] == ["30", "30", "1"]
    assert "warning: class(es) seen fewer than 5 times in the whole data: 'pso' (1)" in text
    assert "warning: more than 10% of the texts are cut at data.max_length=16 at org-0" in text
    report = plan.data_report()
    assert report["rare_labels"] == {"pso": 1} and report["label_names"] == names
    assert {org: r["truncated"] for org, r in report["truncation"].items()} == {
        org: cut.truncated for org, cut in plan.truncation.items()
    }
    assert (
        sum(
            report["class_counts"][o]["train"]["pso"] + report["class_counts"][o]["test"]["pso"]
            for o in report["class_counts"]
        )
        == 1
    )


def test_a_plan_without_rare_labels_or_cut_texts_warns_of_neither(tmp_path):
    rows = [(f"short text {i}", "pos" if i % 2 else "neg") for i in range(40)]
    path = _labelled_csv(tmp_path / "notes.csv", rows)
    cfg = _two_orgs(path)
    text = describe_plan(cfg, preflight(cfg))
    assert "class counts (train + test)" in text and "texts cut at data.max_length=16 (train + test): org-0 0%" in text
    assert "warning" not in text
