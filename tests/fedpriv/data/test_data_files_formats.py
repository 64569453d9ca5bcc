"""A user's own data as it comes: header-less AG News CSV, Orange .tab, Parquet and save_to_disk folders.

Also the classes: in the order the user gave, and at least two of them.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpriv.data.data_files import load_labelled_file, map_labels, read_records
from fedpriv.kernel.config import config_from_dict, load_config
from fedpriv.kernel.errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[3]
AG_MAP = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}  # AG News' classes.txt order
AG_ROWS = [
    [
        "3",
        "Wall St. Bears Claw Back Into the Black (Reuters)",
        "Reuters - Short-sellers, Wall Street's dwindling band.",
    ],
    ["1", "Talks Resume", "Negotiators met again on Monday."],
    ["2", "Late Goal Wins It", ""],  # no description: the title alone
    ["4", "New Chip Ships", "A faster processor, the maker said."],
]


def data_cfg(**data):
    return config_from_dict({"data": {"source": "file", "path": "unused", **data}}).data


def error_of(func, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error message must be one line: {message!r}"
    return message


def ag_news_csv(path: Path, rows: list[list[str]] = AG_ROWS) -> Path:
    """The original AG News distribution's shape: no header, every field quoted, title and description apart."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, quoting=csv.QUOTE_ALL).writerows(rows)
    return path


AG_CFG = {"header": False, "text_column": [1, 2], "label_column": 0, "labels": {"map": AG_MAP}}


# --------------------------------------------------------------------------- header-less CSV, several text columns


def test_ag_news_csv_without_header_joins_title_and_description(tmp_path):
    path = ag_news_csv(tmp_path / "train.csv")
    data = load_labelled_file(path, data_cfg(**AG_CFG))
    assert data.texts[0] == (
        "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling band."
    )
    assert data.texts[2] == "Late Goal Wins It"  # an empty description adds no separator
    assert data.label_names == ["World", "Sports", "Business", "Sci/Tech"]  # labels.map's order, not sorted
    assert data.labels == [2, 0, 1, 3]
    joined = load_labelled_file(path, data_cfg(**AG_CFG, text_separator=". "))
    assert joined.texts[1] == "Talks Resume. Negotiators met again on Monday."
    assert read_records(path, header=False)[1] == {
        "0": "1",
        "1": "Talks Resume",
        "2": "Negotiators met again on Monday.",
    }


def test_header_less_row_too_short_names_the_column_number(tmp_path):
    path = ag_news_csv(tmp_path / "train.csv", [*AG_ROWS[:2], ["2", "Only a title"], *AG_ROWS[3:]])
    message = error_of(load_labelled_file, path, data_cfg(**AG_CFG))
    assert str(path) in message and "row 3 (line 3)" in message and "2 fields" in message
    assert "column 2" in message and "data.text_column" in message and "0-based" in message


def test_header_less_needs_column_numbers_and_numbers_work_with_a_header(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.text_column: 'text' is a column name, but data\.header is false"):
        data_cfg(header=False, text_column="text", label_column=0)
    with pytest.raises(ConfigError, match=r"data\.header: false applies to CSV and TSV"):
        data_cfg(header=False, format="parquet", text_column=1, label_column=0)
    with pytest.raises(ConfigError, match=r"data\.text_column"):
        data_cfg(text_column=[])
    path = tmp_path / "x.csv"
    path.write_text("id,title,body,label\n1,A,a a,x\n2,B,b b,y\n", encoding="utf-8")
    data = load_labelled_file(path, data_cfg(text_column=[1, "body"], label_column=3, text_separator=" | "))
    assert data.texts == ["A | a a", "B | b b"] and data.label_names == ["x", "y"]
    message = error_of(load_labelled_file, path, data_cfg(text_column=7))
    assert "no column 7 (0-based)" in message and "4 columns" in message and "data.text_column" in message


def test_skip_rows_after_the_header(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("text\tlabel\n# exported 2026-12-01\t-\n\nhello\ta\nworld\tb\n", encoding="utf-8")
    data = load_labelled_file(path, data_cfg(skip_rows=1))
    assert data.texts == ["hello", "world"]
    message = error_of(load_labelled_file, path, data_cfg(skip_rows=5))
    assert "data.skip_rows=5" in message


# --------------------------------------------------------------------------- Orange .tab


ORANGE = "category\ttext\n{types}\n{flags}\nsci.med\tDoctors say aspirin helps.\ncomp.graphics\tRender it in 3D.\n"


@pytest.mark.parametrize(
    "types, flags",
    [
        ("d\tstring", "class\tmeta"),
        ("discrete\tstring", "\t"),  # empty flags (the file: its flags row was taken as data)
        ("sci.med comp.graphics\ts", "c\tm include=True"),  # a discrete column's values as its type
    ],
)
def test_orange_tab_annotation_rows_are_not_data(tmp_path, types, flags):
    path = tmp_path / "news.tab"
    path.write_text(ORANGE.format(types=types, flags=flags), encoding="utf-8")
    data = load_labelled_file(path, data_cfg(label_column="category"))
    assert data.texts == ["Doctors say aspirin helps.", "Render it in 3D."]
    assert data.label_names == ["comp.graphics", "sci.med"]
    assert load_labelled_file(path, data_cfg(label_column="category", format="orange")).texts == data.texts


def test_orange_rows_in_a_tsv_are_refused_not_learned(tmp_path):
    text = ORANGE.format(types="d\tstring", flags="class\tmeta")
    path = tmp_path / "news.tsv"
    path.write_text(text, encoding="utf-8")
    message = error_of(load_labelled_file, path, data_cfg(label_column="category"))
    assert str(path) in message and "lines 2-3" in message and "Orange" in message and "data.format: orange" in message
    assert load_labelled_file(path, data_cfg(label_column="category", skip_rows=2)).label_names == [
        "comp.graphics",
        "sci.med",
    ]
    blank_flags = tmp_path / "blank.tsv"  # an empty flags row written as an empty line
    blank_flags.write_text(ORANGE.format(types="d\tstring", flags=""), encoding="utf-8")
    message = error_of(load_labelled_file, blank_flags, data_cfg(label_column="category"))
    assert "lines 2-3" in message and "Orange" in message
    errors_on_line_5 = tmp_path / "bad.tab"
    errors_on_line_5.write_text(text + "sci.med\t  \n", encoding="utf-8")
    message = error_of(load_labelled_file, errors_on_line_5, data_cfg(label_column="category"))
    assert "row 3 (line 6)" in message  # the annotation rows keep their line numbers


def test_orange_one_row_header_and_a_plain_tab_file(tmp_path):
    path = tmp_path / "news.tab"
    path.write_text("cD#category\tmS#text\nsci.med\tAspirin.\ncomp.graphics\tShaders.\n", encoding="utf-8")
    assert load_labelled_file(path, data_cfg(label_column="category")).texts == ["Aspirin.", "Shaders."]
    plain = tmp_path / "plain.tab"
    plain.write_text("category\ttext\nsci.med\tAspirin.\ncomp.graphics\tShaders.\n", encoding="utf-8")
    assert len(load_labelled_file(plain, data_cfg(label_column="category"))) == 2
    message = error_of(load_labelled_file, plain, data_cfg(label_column="category", format="orange"))
    assert str(plain) in message and "Orange's type row" in message and "data.format: tsv" in message


# --------------------------------------------------------------------------- Parquet and save_to_disk


def _dataset(texts, labels, names=None):
    import datasets
    import tqdm

    datasets.disable_progress_bars()
    tqdm.tqdm.monitor_interval = 0  # no thread left in this process (tests/fedpriv/runtime/test_superexec.py forks)

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names) if names else datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _hf_cache_entries() -> set[str]:
    import datasets

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    return {str(p) for p in cache.rglob("*")} if cache.is_dir() else set()


def test_parquet_written_by_datasets(tmp_path):
    names = ["World", "Sports", "Business", "Sci/Tech"]  # a ClassLabel's own order
    path = tmp_path / "train.parquet"
    _dataset(["a b", "c d", "e f", "g h"], [2, 0, 3, 2], names).to_parquet(str(path))
    cache_before = _hf_cache_entries()
    data = load_labelled_file(path, data_cfg())
    assert data.texts == ["a b", "c d", "e f", "g h"]
    assert data.label_names == ["World", "Business", "Sci/Tech"]  # ClassLabel order, not sorted; absent ones left out
    assert [data.label_names[i] for i in data.labels] == ["Business", "World", "Sci/Tech", "Business"]
    by_number = load_labelled_file(path, data_cfg(text_column=0, label_column=1))
    assert by_number.texts == data.texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"] and _hf_cache_entries() == cache_before

    plain = tmp_path / "plain.parquet"
    _dataset(["x", None], ["a", "b"]).to_parquet(str(plain))
    message = error_of(load_labelled_file, plain, data_cfg())
    assert str(plain) in message and "row 2 has an empty text" in message
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    message = error_of(load_labelled_file, junk, data_cfg())
    assert str(junk) in message and "not a readable Parquet file" in message


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = tmp_path / "single"
    _dataset(["one", "two", "three"], ["neg", "pos", "pos"]).save_to_disk(str(single))
    saved = sorted(str(p) for p in tmp_path.rglob("*"))
    cache_before = _hf_cache_entries()
    data = load_labelled_file(single, data_cfg())  # format auto: a folder with dataset_info.json and state.json
    assert data.texts == ["one", "two", "three"] and data.labels == [0, 1, 1]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == saved and _hf_cache_entries() == cache_before

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "train": _dataset(["t1", "t2", "t3"], [1, 0, 1], ["neg", "pos"]),
            "test": _dataset(["s1", "s2"], [0, 0], ["neg", "pos"]),
        }
    ).save_to_disk(str(splits))
    cfg = data_cfg(format="hf_disk")
    train = load_labelled_file(splits, cfg)
    assert train.texts == ["t1", "t2", "t3"] and train.label_names == ["neg", "pos"]
    test = load_labelled_file(splits, cfg, test_file=True, label_names=train.label_names)
    assert test.texts == ["s1", "s2"] and test.labels == [0, 0]
    assert load_labelled_file(splits, data_cfg(split="test"), min_classes=1).texts == ["s1", "s2"]
    message = error_of(load_labelled_file, splits, data_cfg(split="validation"))
    assert str(splits) in message and "data.split" in message and "'validation'" in message and "train, test" in message

    not_saved = tmp_path / "not_saved"
    not_saved.mkdir()
    message = error_of(load_labelled_file, not_saved, data_cfg())
    assert str(not_saved) in message and "save_to_disk" in message
    message = error_of(load_labelled_file, not_saved, data_cfg(format="hf_disk"))
    assert "dataset_dict.json" in message


# --------------------------------------------------------------------------- classes


def test_one_class_is_refused_with_the_file_column_and_class(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text,stars\ngreat,5\nfine,5\n", encoding="utf-8")
    message = error_of(load_labelled_file, path, data_cfg(label_column="stars"))
    assert str(path) in message and "'stars'" in message and "'5'" in message and "two classes" in message
    cfg = data_cfg(label_column="stars", labels={"ranges": {"low": [1, 2], "high": [4, 5]}})
    assert "'high'" in error_of(load_labelled_file, path, cfg)
    # a test file, or one organisation of a federation, may hold one class of the federation's classes
    assert load_labelled_file(path, cfg, label_names=["low", "high"]).labels == [1, 1]
    with pytest.raises(ConfigError, match=r"data\.labels\.names: expected at least two"):
        data_cfg(labels={"names": ["only"]})


def test_classes_follow_the_order_of_labels_map_and_ranges():
    cfg = data_cfg(labels={"map": {"4": "Sci/Tech", "1": "World", "3": "Business", "2": "Sports", "9": "Sports"}})
    labels, names = map_labels(["1", "2", "3", "4", "9"], cfg.labels, source="f.csv", column=0)
    assert names == ["Sci/Tech", "World", "Business", "Sports"] and labels == [1, 3, 2, 0, 3]
    cfg = data_cfg(labels={"ranges": {"positive": [7, 10], "neutral": [5, 6], "negative": [1, 4]}})
    _, names = map_labels(["1", "5", "9"], cfg.labels, source="f.csv", column="rating")
    assert names == ["positive", "neutral", "negative"]


def test_simulation_plan_keeps_labels_map_order(tmp_path):
    """The plan is rebuilt from a JSON key in every process: a sorted key would reorder the classes."""
    from fedpriv.data.partitioning import plan_partitions

    path = ag_news_csv(tmp_path / "train.csv", AG_ROWS * 10)
    overrides = [
        "data.source=file",
        f"data.path={path}",
        "data.header=false",
        "data.text_column=[1, 2]",
        "data.label_column=0",
        'data.labels.map={"4": Sci/Tech, "2": Sports, "1": World, "3": Business}',  # keys written unsorted
        "partitioning.scheme=iid",
        "partitioning.num_orgs=2",
        "training.batch_size=4",
    ]
    plan = plan_partitions(load_config(None, overrides))
    assert plan.label_names == ["Sci/Tech", "Sports", "World", "Business"]


def test_a_mistyped_label_is_a_rare_class_in_the_counts(tmp_path):
    """Without labels.names a typo becomes a class: its count of 1, in the user's order, is what the plan shows."""
    rows = AG_ROWS * 3 + [["2", "Cup Final Tonight", "Two teams meet."]]
    typo = ag_news_csv(tmp_path / "typo.csv", [*rows, ["2 ", "Trimmed", "ok"], ["Sprots", "Derby Day", "A match."]])
    data = load_labelled_file(typo, data_cfg(header=False, text_column=[1, 2], label_column=0))
    assert data.class_counts() == {"1": 3, "2": 5, "3": 3, "4": 3, "Sprots": 1}


# --------------------------------------------------------------------------- the command


@pytest.mark.integration
def test_simulate_reads_an_ag_news_csv_as_distributed(tmp_path):
    """``fedpriv simulate`` on the header-less CSV: the plan, the summary and the model list the classes in order."""
    rows = [[str(i % 4 + 1), f"Headline {i}", f"Body of story {i} about topic {i % 4}."] for i in range(96)]
    path = ag_news_csv(tmp_path / "train.csv", rows)
    args = [
        "model.name=tiny",
        "training.rounds=1",
        "data.source=file",
        f"data.path={path}",
        "data.header=false",
        "data.text_column=[1, 2]",
        "data.label_column=0",
        f"data.labels.map={json.dumps(AG_MAP)}",
        "data.max_length=16",
        "partitioning.scheme=iid",
        "partitioning.num_orgs=2",
        "training.batch_size=8",
    ]
    command = [sys.executable, "-m", "fedpriv.cli", "simulate", *args, "--out", str(tmp_path / "run")]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "classes: World, Sports, Business, Sci/Tech" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["label_names"] == ["World", "Sports", "Business", "Sci/Tech"]
    model_config = json.loads((tmp_path / "run" / "model" / "merged" / "config.json").read_text(encoding="utf-8"))
    assert model_config["id2label"] == {"0": "World", "1": "Sports", "2": "Business", "3": "Sci/Tech"}


def test_federation_classes_one_class_per_organisation_in_map_order(tmp_path):
    """``federation up`` reads the organisations' files: one may hold a single class, all of them need two."""
    import yaml

    from fedpriv.commands.local_federation import infer_label_names
    from fedpriv.commands.provisioning.federation import load_federation

    ag_news_csv(tmp_path / "a.csv", [AG_ROWS[0], AG_ROWS[0]])  # Business only
    ag_news_csv(tmp_path / "b.csv", [AG_ROWS[2], AG_ROWS[1]])  # Sports, World
    ag_news_csv(tmp_path / "c.csv", [AG_ROWS[0]])

    def federation(*files: str) -> Path:
        orgs = [{"name": f"org-{i}", "data": {"path": str(tmp_path / name), **AG_CFG}} for i, name in enumerate(files)]
        raw = {"federation": "news", "coordinator": {"addresses": ["127.0.0.1"]}, "organisations": orgs}
        path = tmp_path / "FEDERATION.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path

    assert infer_label_names(load_federation(federation("a.csv", "b.csv"))) == ["World", "Sports", "Business"]
    with pytest.raises(DataError, match="every file has the class 'Business' only"):
        infer_label_names(load_federation(federation("a.csv", "c.csv")))


def test_reading_parquet_and_save_to_disk_leaves_no_thread_behind(tmp_path):
    """A deployed node's process forks its ClientApps (fedpriv/runtime/superexec.py): a thread left running is unsafe."""
    _dataset(["a b", "c d"], ["x", "y"]).save_to_disk(str(tmp_path / "saved"))
    _dataset(["a b", "c d"], ["x", "y"]).to_parquet(str(tmp_path / "data.parquet"))
    code = (
        "import sys, threading\n"
        "from fedpriv.data.data_files import read_records\n"
        "for path in sys.argv[1:]:\n"
        "    read_records(path)\n"
        "print(sorted(t.name for t in threading.enumerate()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "saved"), str(tmp_path / "data.parquet")],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[3],
    )  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "['MainThread']"
