"""Splitting one data set into virtual organisations, each with its own train/test data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fedpriv.data.partitioning import PartitionPlan, load_corpus, plan_partitions
from fedpriv.kernel.config import load_config
from fedpriv.kernel.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared test data not found at {SHARED_DATA} (present in CI and dev machines)"
)
DRUGS = SHARED_DATA / "drug_reviews" / "drugs.csv"
DRUG_OVERRIDES = [
    "data.source=file",
    f"data.path={DRUGS}",
    "data.text_column=review",
    "data.label_column=rating",
    "data.html_unescape=true",
    "data.labels.ranges={negative: [1, 4], neutral: [5, 6], positive: [7, 10]}",
    "data.max_examples=null",
]


@pytest.fixture(autouse=True)
def _fresh_cache():
    plan_partitions.cache_clear()
    yield
    plan_partitions.cache_clear()


def cfg_of(*overrides: str):
    return load_config(overrides=list(overrides))


def bbc(*overrides: str):
    """The packaged default (bbc_news, 1200 examples, dirichlet alpha=1, 4 orgs) with overrides."""
    return cfg_of("training.batch_size=8", *overrides)


def synthetic_file(tmp_path: Path, n: int = 200, classes: int = 4, name: str = "data.csv") -> Path:
    rows = ["id,text,label,site"]
    for i in range(n):
        rows.append(f"{i},document number {i},c{i % classes},site{i % 3}")
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def all_rows(plan: PartitionPlan) -> Counter:
    return Counter(t for org in plan.orgs for part in (org.train, org.test) for t in part.texts)


def fingerprint(plan: PartitionPlan) -> list:
    return [
        (org.name, org.partition_id, org.train.texts, org.train.labels, org.test.texts, org.test.labels)
        for org in plan.orgs
    ]


def error_of(cfg) -> str:
    with pytest.raises(DataError) as info:
        plan_partitions(cfg)
    message = str(info.value)
    assert "\n" not in message, f"error message must be one line: {message!r}"
    return message


def label_skew(plan: PartitionPlan) -> float:
    """Mean total-variation distance between each org's label mix and the overall mix."""
    counts = plan.label_counts()
    total = Counter()
    per_org = []
    for org in counts.values():
        c = Counter(org["train"]) + Counter(org["test"])
        per_org.append(c)
        total += c
    n = sum(total.values())
    dists = []
    for c in per_org:
        m = sum(c.values())
        dists.append(0.5 * sum(abs(c[k] / m - total[k] / n) for k in total))
    return sum(dists) / len(dists)


# --------------------------------------------------------------------------- schemes


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_cover_the_data_and_are_deterministic(scheme):
    cfg = bbc(f"partitioning.scheme={scheme}", "partitioning.num_orgs=5", "data.max_examples=1000")
    data, test = load_corpus(cfg)
    assert test is None and len(data) == 1000
    plan = plan_partitions(cfg)
    assert [o.name for o in plan.orgs] == [f"org-{i}" for i in range(5)]
    assert [o.partition_id for o in plan.orgs] == list(range(5))
    assert plan.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert plan.scheme == scheme
    assert all_rows(plan) == Counter(data.texts)  # disjoint and covering (as multisets)
    assert sum(len(o.train) + len(o.test) for o in plan.orgs) == 1000
    for org in plan.orgs:
        assert org.train.label_names == plan.label_names and org.test.label_names == plan.label_names
        assert len(org.test) >= 1 and len(org.train) >= 8
        share = len(org.test) / (len(org.train) + len(org.test))
        assert 0.15 < share < 0.25  # data.test_fraction = 0.2

    assert plan_partitions(cfg) is plan  # memoised
    plan_partitions.cache_clear()
    again = plan_partitions(cfg)
    assert again is not plan and fingerprint(again) == fingerprint(plan)


def test_iid_is_shuffled_and_balanced():
    plan = plan_partitions(bbc("partitioning.scheme=iid"))  # bbc_news is sorted by topic on disk
    assert label_skew(plan) < 0.1
    sizes = [len(o.train) + len(o.test) for o in plan.orgs]
    assert max(sizes) - min(sizes) <= 1


def test_split_is_stratified_when_possible():
    plan = plan_partitions(bbc("partitioning.scheme=iid", "data.max_examples=null"))
    for org_counts in plan.label_counts().values():
        for label, n_train in org_counts["train"].items():
            n_test = org_counts["test"][label]
            assert abs(n_test - 0.2 * (n_train + n_test)) <= 1.0


def test_dirichlet_small_alpha_is_skewed():
    skewed = plan_partitions(bbc("partitioning.alpha=0.1", "partitioning.min_partition_size=20"))
    mild = plan_partitions(bbc("partitioning.alpha=100"))
    assert label_skew(skewed) > 0.35
    assert label_skew(mild) < 0.15
    # at least one organisation lacks at least one class completely
    assert any(
        any(c["train"][label] + c["test"][label] == 0 for label in skewed.label_names)
        for c in skewed.label_counts().values()
    )


def test_label_counts_add_up():
    plan = plan_partitions(bbc())
    counts = plan.label_counts()
    assert list(counts) == [o.name for o in plan.orgs]
    for org in plan.orgs:
        assert set(counts[org.name]) == {"train", "test"}
        assert list(counts[org.name]["train"]) == plan.label_names
        assert sum(counts[org.name]["train"].values()) == len(org.train)
        assert sum(counts[org.name]["test"].values()) == len(org.test)


def test_seed_changes_partitions_and_other_settings_do_not():
    base = plan_partitions(bbc())
    assert plan_partitions(bbc("model.name=tiny", "training.rounds=7", "privacy.target_epsilon=3")) is base
    other = plan_partitions(bbc("run.seed=7"))
    assert fingerprint(other) != fingerprint(base)


def test_max_examples_is_a_deterministic_subsample():
    a, _ = load_corpus(bbc("data.max_examples=300"))
    b, _ = load_corpus(bbc("data.max_examples=300"))
    c, _ = load_corpus(bbc("data.max_examples=300", "run.seed=1"))
    assert len(a) == 300 and a.texts == b.texts and a.texts != c.texts
    assert len(set(a.labels)) == 5  # random, not the first 300 (which would all be 'business')


def test_same_plan_in_another_process(tmp_path):
    """Server and Ray actors plan independently: hash randomisation must not change the result."""
    overrides = ["training.batch_size=8", "partitioning.alpha=0.5", "data.max_examples=600"]
    script = (
        "import hashlib, json, sys\n"
        "from fedpriv.kernel.config import load_config\n"
        "from fedpriv.data.partitioning import plan_partitions\n"
        "plan = plan_partitions(load_config(overrides=json.loads(sys.argv[1])))\n"
        "rows = [(o.name, o.train.texts, o.train.labels, o.test.texts, o.test.labels) for o in plan.orgs]\n"
        "print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())\n"
    )
    plan = plan_partitions(cfg_of(*overrides))
    rows = [(o.name, o.train.texts, o.train.labels, o.test.texts, o.test.labels) for o in plan.orgs]
    expected = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    env = dict(os.environ, PYTHONHASHSEED="12345", FEDPRIV_CACHE_DIR=str(tmp_path))  # split again, not read back
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(overrides)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected


# --------------------------------------------------------------------------- natural


@needs_shared_data
def test_natural_by_condition_keeps_the_largest_groups():
    cfg = cfg_of(
        *DRUG_OVERRIDES,
        "partitioning.scheme=natural",
        "partitioning.column=condition",
        "partitioning.num_orgs=3",
        "strategy.min_train_nodes=2",
    )
    plan = plan_partitions(cfg)
    assert [o.name for o in plan.orgs] == ["Birth Control", "Depression", "Pain"]
    assert [len(o.train) + len(o.test) for o in plan.orgs] == [1147, 393, 268]
    assert plan.label_names == ["negative", "neutral", "positive"]
    for org in plan.orgs:
        assert set(org.train.columns["condition"]) == {org.name} == set(org.test.columns["condition"])
    data, _ = load_corpus(cfg)
    kept = Counter(
        t
        for t, c in zip(data.texts, data.columns["condition"], strict=True)
        if c in {"Birth Control", "Depression", "Pain"}
    )
    assert all_rows(plan) == kept
    fp = fingerprint(plan)
    plan_partitions.cache_clear()
    assert fingerprint(plan_partitions(cfg)) == fp


def test_natural_needs_enough_groups(tmp_path):
    path = synthetic_file(tmp_path)  # 3 sites
    cfg = cfg_of(
        "data.source=file",
        f"data.path={path}",
        "partitioning.scheme=natural",
        "partitioning.column=site",
        "partitioning.num_orgs=4",
        "training.batch_size=4",
    )
    message = error_of(cfg)
    assert "'site'" in message and "3 distinct" in message and "num_orgs=4" in message

    ok = plan_partitions(
        cfg_of(
            *[f"{o}" for o in ("data.source=file", f"data.path={path}")],
            "partitioning.scheme=natural",
            "partitioning.column=site",
            "partitioning.num_orgs=3",
            "training.batch_size=4",
        )
    )
    assert [o.name for o in ok.orgs] == ["site0", "site1", "site2"]  # equal-ish sizes: largest first, then name


def test_natural_groups_are_planned_with_no_mock_no_datasets_import_and_no_progress_bar(tmp_path):
    """Grouping rows by a column needs neither Flower Datasets' partitioner (seconds of imports, a progress bar in
    every process that plans) nor ``unittest.mock`` in product code to silence it."""
    path = synthetic_file(tmp_path, n=90)  # 3 sites, rows interleaved
    overrides = [
        "data.source=file",
        f"data.path={path}",
        "partitioning.scheme=natural",
        "partitioning.column=site",
        "partitioning.num_orgs=2",
        "training.batch_size=4",
    ]
    script = (
        "import json, sys\n"
        "from fedpriv.kernel.config import load_config\n"
        "from fedpriv.data.partitioning import plan_partitions\n"
        "plan = plan_partitions(load_config(overrides=json.loads(sys.argv[1])))\n"
        "rows = sorted(int(t.split()[-1]) for o in plan.orgs for part in (o.train, o.test) for t in part.texts)\n"
        "loaded = [m for m in ('datasets', 'flwr_datasets', 'unittest.mock') if m in sys.modules]\n"
        "print(json.dumps({'orgs': [o.name for o in plan.orgs], 'rows': rows, 'loaded': loaded}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(overrides)], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["loaded"] == []
    assert out.stderr == ""  # no progress bar
    assert result["orgs"] == ["site0", "site1"]
    assert result["rows"] == [i for i in range(90) if i % 3 in (0, 1)]  # each site's rows, every one of them


def test_natural_column_missing(tmp_path):
    path = synthetic_file(tmp_path)
    cfg = cfg_of(
        "data.source=file",
        f"data.path={path}",
        "partitioning.scheme=natural",
        "partitioning.column=hospital",
        "training.batch_size=4",
    )
    message = error_of(cfg)
    assert str(path) in message and "'hospital'" in message and "id, text, label, site" in message


def test_natural_on_builtin_corpus_without_that_column():
    message = error_of(bbc("partitioning.scheme=natural", "partitioning.column=condition"))
    assert "'condition'" in message and "bbc_news" in message


# --------------------------------------------------------------------------- separate test file


@needs_shared_data
def test_separate_test_file_is_partitioned_with_the_training_data():
    cfg = cfg_of(
        "data.source=file",
        f"data.path={SHARED_DATA / 'sst2' / 'train.tsv'}",
        "data.text_column=sentence",
        f"data.test_path={SHARED_DATA / 'sst2' / 'dev.tsv'}",
        "data.test_text_column=content",
        "data.max_examples=2000",
        "partitioning.scheme=dirichlet",
        "partitioning.alpha=1.0",
    )
    train, test = load_corpus(cfg)
    assert len(train) == 2000 and test is not None and len(test) == 872
    assert test.label_names == train.label_names == ["0", "1"]
    plan = plan_partitions(cfg)
    assert Counter(t for o in plan.orgs for t in o.train.texts) == Counter(train.texts)
    assert Counter(t for o in plan.orgs for t in o.test.texts) == Counter(test.texts)
    # each org's test share follows its train share (partitioned together, then split by provenance)
    for org in plan.orgs:
        assert len(org.test) >= 1
        train_pos = org.train.labels.count(1) / len(org.train)
        test_pos = org.test.labels.count(1) / len(org.test)
        assert abs(train_pos - test_pos) < 0.2


def test_test_file_with_unknown_label(tmp_path):
    train = synthetic_file(tmp_path, classes=2)
    test = tmp_path / "test.csv"
    test.write_text("text,label\nfine,c0\nodd,c7\n", encoding="utf-8")
    cfg = cfg_of(
        "data.source=file",
        f"data.path={train}",
        f"data.test_path={test}",
        "partitioning.scheme=iid",
        "training.batch_size=4",
    )
    message = error_of(cfg)
    assert str(test) in message and "'c7'" in message and "c0, c1" in message


def test_org_without_test_examples(tmp_path):
    train = synthetic_file(tmp_path, classes=2)
    test = tmp_path / "test.csv"
    test.write_text("text,label\nonly one,c0\nand two,c1\n", encoding="utf-8")
    cfg = cfg_of(
        "data.source=file",
        f"data.path={train}",
        f"data.test_path={test}",
        "partitioning.scheme=iid",
        "partitioning.num_orgs=4",
        "training.batch_size=4",
    )
    message = error_of(cfg)
    assert "no test examples" in message and "org-" in message and "data.test_path" in message


# --------------------------------------------------------------------------- too small


def test_partition_smaller_than_one_batch():
    message = error_of(cfg_of("partitioning.scheme=iid", "data.max_examples=100", "training.batch_size=32"))
    assert "'org-0'" in message and "20 training examples" in message and "training.batch_size=32" in message


def test_dirichlet_partition_smaller_than_one_batch_suggests_alpha():
    message = error_of(cfg_of("partitioning.alpha=0.1", "partitioning.num_orgs=8", "training.batch_size=32"))
    assert "fewer than one batch" in message and "training.batch_size=32" in message
    assert "partitioning.alpha" in message


def test_dirichlet_cannot_reach_min_partition_size():
    message = error_of(
        bbc("partitioning.alpha=0.05", "partitioning.num_orgs=10", "partitioning.min_partition_size=100")
    )
    assert "min_partition_size=100" in message and "alpha=0.05" in message


def test_unknown_partition_id():
    plan = plan_partitions(bbc())
    assert plan.org(3).name == "org-3"
    with pytest.raises(DataError, match="partition-id 4"):
        plan.org(4)


@pytest.mark.parametrize(("n", "num_orgs"), [(1000, 7), (6734, 1000), (20, 20)])
def test_iid_shards_are_flower_datasets_iid_partitions_of_the_shuffled_order(n, num_orgs):
    import datasets
    import numpy as np
    from flwr_datasets.partitioner import IidPartitioner

    from fedpriv.data.partitioning import _iid

    order = np.random.default_rng(3).permutation(n).tolist()
    partitioner = IidPartitioner(num_partitions=num_orgs)
    partitioner.dataset = datasets.Dataset.from_dict({"row": order})
    expected = [list(partitioner.load_partition(pid)["row"]) for pid in range(num_orgs)]
    assert _iid(n, num_orgs, seed=3) == expected


def test_natural_by_a_column_number_in_a_file_without_a_header(tmp_path):
    path = tmp_path / "no-header.csv"
    rows = [f'"{i % 2}","site{i % 3}","text {i} of class {i % 2}"' for i in range(120)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    plan = plan_partitions(
        cfg_of(
            "data.source=file",
            f"data.path={path}",
            "data.header=false",
            "data.text_column=2",
            "data.label_column=0",
            "partitioning.scheme=natural",
            "partitioning.column=1",  # an unquoted number, as a user of a header-less file writes it
            "partitioning.num_orgs=3",
            "training.batch_size=4",
        )
    )
    assert [o.name for o in plan.orgs] == ["site0", "site1", "site2"]
    assert sum(len(o.train) + len(o.test) for o in plan.orgs) == 120
