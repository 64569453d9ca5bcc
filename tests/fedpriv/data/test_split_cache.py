"""The Dirichlet split kept on disk: the same organisations, without Flower Datasets' imports in the next process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedpriv.data import split_cache
from fedpriv.data.partitioning import plan_partitions
from fedpriv.kernel.cache_home import CACHE_ENV
from fedpriv.kernel.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[3]
OVERRIDES = ["data.max_examples=300", "training.batch_size=8", "partitioning.alpha=0.5"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    plan_partitions.cache_clear()
    yield tmp_path / "cache" / split_cache.FOLDER
    plan_partitions.cache_clear()


def _rows(plan) -> list:
    return [(o.name, o.train.texts, o.train.labels, o.test.texts, o.test.labels) for o in plan.orgs]


def test_a_kept_split_gives_the_same_organisations(cache):
    cfg = load_config(overrides=OVERRIDES)
    split = _rows(plan_partitions(cfg))
    (kept,) = cache.glob("*.json")  # one file per split
    plan_partitions.cache_clear()
    assert _rows(plan_partitions(cfg)) == split
    kept.write_text("{not json")  # a damaged file is split again, and replaced
    plan_partitions.cache_clear()
    assert _rows(plan_partitions(cfg)) == split
    assert json.loads(kept.read_text())["groups"]


def test_another_process_uses_the_kept_split_without_flower_datasets(cache):
    cfg = load_config(overrides=OVERRIDES)
    expected = _rows(plan_partitions(cfg))
    script = (
        "import json, sys\n"
        "from fedpriv.kernel.config import load_config\n"
        "from fedpriv.data.partitioning import plan_partitions\n"
        "plan = plan_partitions(load_config(overrides=json.loads(sys.argv[1])))\n"
        "rows = [(o.name, o.train.texts, o.train.labels, o.test.texts, o.test.labels) for o in plan.orgs]\n"
        "print(json.dumps([rows, sorted(m for m in ('datasets', 'flwr_datasets') if m in sys.modules)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(OVERRIDES)],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        check=True,
    )
    rows, imported = json.loads(out.stdout)
    assert [[list(x) if isinstance(x, list) else x for x in org] for org in rows] == [list(org) for org in expected]
    assert imported == []


def test_each_setting_names_its_own_file(cache):
    plan_partitions(load_config(overrides=OVERRIDES))
    plan_partitions(load_config(overrides=[*OVERRIDES, "run.seed=1"]))
    plan_partitions(load_config(overrides=[*OVERRIDES, "partitioning.alpha=2"]))
    assert len(list(cache.glob("*.json"))) == 3


def test_a_foreign_file_is_not_used(cache):
    settings = {"num_orgs": 2, "alpha": 1.0, "min_partition_size": 1, "seed": 0}
    labels = [0, 1, 0, 1]
    assert split_cache.kept_split(labels, settings, lambda: [[0, 2], [1, 3]]) == [[0, 2], [1, 3]]
    (kept,) = cache.glob("*.json")
    for bad in ([[0, 2], [2, 3]], [[0, 9], [1]], [[0, 1, 2, 3]], [["0"], [1]]):  # repeated, out of range, 1 org
        kept.write_text(json.dumps({"groups": bad}))
        assert split_cache.kept_split(labels, settings, lambda: [[0, 2], [1, 3]]) == [[0, 2], [1, 3]]


def test_no_cache_folder_means_nothing_kept(monkeypatch):
    monkeypatch.setattr(split_cache, "cache_home", lambda: None)
    calls = []
    settings = {"num_orgs": 1, "alpha": 1.0, "min_partition_size": 1, "seed": 0}
    for _ in range(2):
        split_cache.kept_split([0], settings, lambda: calls.append(1) or [[0]])
    assert len(calls) == 2
