"""Split one data set into N virtual organisations, each with its own train/test data.

The server and every simulated client (each in its own Ray actor) call
:func:`plan_partitions` independently, so the plan must be a pure function of
the config: same seed, data and partitioning settings -> identical partitions
in every process. Problems (a partition smaller than one batch, an organisation
without test data...) are reported as one-line :class:`DataError` before any
training starts.
"""

from __future__ import annotations

import functools
import html
import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fedpriv.data.corpora import load_builtin
from fedpriv.data.data_files import LabelledTexts, load_labelled_file, map_labels, split_indices
from fedpriv.data.split_cache import kept_split
from fedpriv.kernel.config import FedPrivConfig, config_from_dict
from fedpriv.kernel.errors import DataError

_TRAIN, _TEST = 0, 1  # provenance of a row when a separate test file is given


@dataclass(frozen=True)
class OrgData:
    name: str
    partition_id: int
    train: LabelledTexts
    test: LabelledTexts


@dataclass(frozen=True)
class PartitionPlan:
    orgs: list[OrgData]
    label_names: list[str]
    scheme: str

    def org(self, partition_id: int) -> OrgData:
        if not 0 <= partition_id < len(self.orgs):
            raise DataError(
                f"partitioning: partition-id {partition_id} is out of range: there are {len(self.orgs)}"
                f" organisations (partitioning.num_orgs), so the ids are 0..{len(self.orgs) - 1}"
            )
        return self.orgs[partition_id]

    def label_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{org: {"train": {label: n}, "test": {label: n}}}``, every label listed (zeros included)."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for org in self.orgs:
            out[org.name] = {}
            for split, part in (("train", org.train), ("test", org.test)):
                counts = Counter(part.labels)
                out[org.name][split] = {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}
        return out


# --------------------------------------------------------------------------- loading


def _keep_columns(cfg: FedPrivConfig) -> list[str]:
    part = cfg.partitioning
    return [str(part.column)] if part.scheme == "natural" and part.column is not None else []


def _subsample(data: LabelledTexts, max_examples: int | None, seed: int) -> LabelledTexts:
    if max_examples is None or max_examples >= len(data):
        return data
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(data), size=max_examples, replace=False))
    return data.subset(keep.tolist())


def _load_builtin_corpus(cfg: FedPrivConfig) -> LabelledTexts:
    data = cfg.data
    keep = _keep_columns(cfg)
    source = f"built-in corpus '{data.source}'"
    texts, raw_labels = load_builtin(data.source)
    for column in keep:
        if column != "label":
            raise DataError(
                f"partitioning.column: {source} has no column {column!r} (its columns: text, label);"
                " use partitioning.scheme iid or dirichlet, or data.source: file"
            )
    if data.html_unescape:
        texts = [html.unescape(t).strip() for t in texts]
    labels, names = map_labels(raw_labels, data.labels, source=source, column="label")
    columns = {c: list(raw_labels) for c in keep}
    return LabelledTexts(texts=list(texts), labels=labels, label_names=names, columns=columns, source=source)


def load_corpus(cfg: FedPrivConfig) -> tuple[LabelledTexts, LabelledTexts | None]:
    """``(data, separate test set or None)`` as configured by ``cfg.data``.

    ``data.max_examples`` subsamples the training data (deterministically, seed
    ``run.seed``); a separate test file is read in full with the training data's classes.
    """
    data = cfg.data
    keep = _keep_columns(cfg)
    if data.source == "file":
        train = load_labelled_file(data.path, data, keep_columns=keep)
    else:
        train = _load_builtin_corpus(cfg)
    train = _subsample(train, data.max_examples, cfg.run.seed)
    test = None
    if data.test_path:
        test = load_labelled_file(
            data.test_path, data, keep_columns=keep, label_names=train.label_names, test_file=True
        )
    return train, test


def _concat(a: LabelledTexts, b: LabelledTexts) -> LabelledTexts:
    return LabelledTexts(
        texts=a.texts + b.texts,
        labels=a.labels + b.labels,
        label_names=list(a.label_names),
        columns={name: a.columns[name] + b.columns[name] for name in a.columns},
        source=a.source,
    )


# --------------------------------------------------------------------------- partitioning


def _iid(n: int, num_orgs: int, seed: int) -> list[list[int]]:
    # Flower Datasets' IidPartitioner's contiguous shards of a shuffled order (corpora are often sorted by
    # label), cut in one call: asking it for each of 10,000+ partitions costs 2 ms each, in every process.
    order = np.random.default_rng(seed).permutation(n)
    return [chunk.tolist() for chunk in np.array_split(order, num_orgs)]


def _dirichlet(labels: Sequence[int], cfg: FedPrivConfig) -> list[list[int]]:
    part = cfg.partitioning
    n = len(labels)
    if part.num_orgs > n:
        raise DataError(f"partitioning.num_orgs: {part.num_orgs} organisations but only {n} examples")
    settings = {
        "num_orgs": part.num_orgs,
        "alpha": float(part.alpha),
        "min_partition_size": part.min_partition_size,
        "seed": cfg.run.seed,
    }
    return kept_split(labels, settings, lambda: _dirichlet_split(labels, cfg))


def _dirichlet_split(labels: Sequence[int], cfg: FedPrivConfig) -> list[list[int]]:
    part = cfg.partitioning
    n = len(labels)
    import datasets  # Flower Datasets and HF datasets: seconds of imports that IID runs never need
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=part.num_orgs,
        partition_by="label",
        alpha=float(part.alpha),
        min_partition_size=part.min_partition_size,
        self_balancing=False,
        seed=cfg.run.seed,
    )
    # It hands out contiguous runs of each class, so shuffle first: rows may be sorted (by date, by source,
    # train rows before test rows...) and each organisation must get a random share of every class.
    order = np.random.default_rng(cfg.run.seed).permutation(n).tolist()
    partitioner.dataset = datasets.Dataset.from_dict({"row": order, "label": [labels[i] for i in order]})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns on every failed attempt; we explain failure below
            return [list(partitioner.load_partition(pid)["row"]) for pid in range(part.num_orgs)]
    except ValueError as exc:
        if "attempts" not in str(exc):
            raise DataError(f"partitioning: the Dirichlet split failed ({exc})") from None
        raise DataError(
            f"partitioning: the Dirichlet split (alpha={part.alpha}) could not give each of the {part.num_orgs}"
            f" organisations at least partitioning.min_partition_size={part.min_partition_size} of the {n}"
            " examples in 11 attempts: use a larger partitioning.alpha, fewer organisations or a smaller"
            " min_partition_size"
        ) from None


def _natural(values: Sequence[str], cfg: FedPrivConfig, source: str) -> tuple[list[str], list[list[int]]]:
    part = cfg.partitioning
    column = str(part.column)
    counts = Counter(v for v in values if v.strip())
    if len(counts) < part.num_orgs:
        raise DataError(
            f"partitioning: {source} has {len(counts)} distinct non-empty values in column {column!r}"
            f" ({', '.join(sorted(counts)[:10])}), fewer than partitioning.num_orgs={part.num_orgs}:"
            " use fewer organisations or another partitioning.column"
        )
    chosen = sorted(counts, key=lambda v: (-counts[v], v))[: part.num_orgs]
    # Each kept group's rows, in file order: what Flower Datasets' NaturalIdPartitioner gives, without the seconds
    # of imports (datasets) or the progress bar it prints in every process that plans the partitions.
    rows: dict[str, list[int]] = {name: [] for name in chosen}
    for index, value in enumerate(values):
        if value in rows:
            rows[value].append(index)
    return chosen, [rows[name] for name in chosen]


def _build_plan(cfg: FedPrivConfig) -> PartitionPlan:
    part = cfg.partitioning
    seed = cfg.run.seed
    data, separate_test = load_corpus(cfg)
    if separate_test is not None:
        rows = _concat(data, separate_test)
        provenance = [_TRAIN] * len(data) + [_TEST] * len(separate_test)
    else:
        rows, provenance = data, [_TRAIN] * len(data)

    if part.scheme == "iid":
        names = [f"org-{i}" for i in range(part.num_orgs)]
        groups = _iid(len(rows), part.num_orgs, seed)
    elif part.scheme == "dirichlet":
        names = [f"org-{i}" for i in range(part.num_orgs)]
        groups = _dirichlet(rows.labels, cfg)
    elif part.scheme == "natural":
        names, groups = _natural(rows.columns[str(part.column)], cfg, rows.source)
    else:  # the config only allows the three schemes above
        raise DataError(f"partitioning.scheme: expected iid, dirichlet or natural, got {part.scheme!r}")

    orgs: list[OrgData] = []
    batch_size = cfg.training.batch_size
    for pid, (name, members) in enumerate(zip(names, groups, strict=True)):
        if separate_test is not None:
            train_idx = sorted(i for i in members if provenance[i] == _TRAIN)
            test_idx = sorted(i for i in members if provenance[i] == _TEST)
        else:
            train_idx, test_idx = split_indices(members, rows.labels, cfg.data.test_fraction, seed + pid)
        if len(train_idx) < batch_size:
            if part.scheme == "dirichlet":
                remedy = "use fewer organisations, a smaller batch size, or a larger partitioning.alpha"
            elif part.scheme == "natural":
                remedy = "use fewer organisations (the largest groups are kept) or a smaller batch size"
            else:
                remedy = "use fewer organisations, a smaller batch size, or more data (data.max_examples)"
            raise DataError(
                f"partitioning: organisation {name!r} has {len(train_idx)} training examples, fewer than one batch"
                f" (training.batch_size={batch_size}): {remedy}"
            )
        if not test_idx:
            hint = (
                "the test file (data.test_path) gives it none: use fewer organisations or a larger test file"
                if separate_test is not None
                else f"it has only {len(members)} example(s): use fewer organisations or more data"
            )
            raise DataError(f"partitioning: organisation {name!r} has no test examples; {hint}")
        orgs.append(OrgData(name=name, partition_id=pid, train=rows.subset(train_idx), test=rows.subset(test_idx)))
    return PartitionPlan(orgs=orgs, label_names=list(data.label_names), scheme=part.scheme)


def plan_key(cfg: FedPrivConfig) -> str:
    return json.dumps(
        {
            "seed": cfg.run.seed,
            "data": asdict(cfg.data),
            "partitioning": asdict(cfg.partitioning),
            "batch_size": cfg.training.batch_size,
        },
        sort_keys=False,  # data.labels.map's and ranges' order is the class order: a sorted key would lose it
    )


@functools.lru_cache(maxsize=8)
def _plan_for_key(key: str) -> PartitionPlan:
    raw = json.loads(key)
    # Only what the key holds may influence the plan, so rebuild a config from the key alone.
    cfg = config_from_dict(
        {
            "run": {"seed": raw["seed"]},
            "data": raw["data"],
            "partitioning": raw["partitioning"],
            "training": {"batch_size": raw["batch_size"]},
            "strategy": {"min_train_nodes": 1, "min_evaluate_nodes": 0},
        }
    )
    return _build_plan(cfg)


def plan_partitions(cfg: FedPrivConfig) -> PartitionPlan:
    """The organisations' train/test data; memoised per (seed, data, partitioning, batch size).

    ``plan_partitions.cache_clear()`` forgets the memoised plans.
    """
    return _plan_for_key(plan_key(cfg))


plan_partitions.cache_clear = _plan_for_key.cache_clear  # type: ignore[attr-defined]
plan_partitions.cache_info = _plan_for_key.cache_info  # type: ignore[attr-defined]
