"""Fuzzing the node's data loader: whatever bytes a file holds, the answer is data or one clear DataError line."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpriv.data.data_files import load_labelled_file
from fedpriv.kernel.config import config_from_dict
from fedpriv.kernel.errors import DataError

COLUMN = st.sampled_from(["text", "label", "rating", "review", "", "text ", "ТЕКСТ", '"text"', "a,b"])
CELL = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["1", "10", "-3", "4.5", "nan", "inf", "positive", "", " ", '"', "\t", "\r\n", "\x00", "🙂"]),
)
ROWS = st.lists(st.lists(CELL, min_size=0, max_size=4), min_size=0, max_size=6) | st.lists(
    st.tuples(st.text(min_size=1, max_size=20), st.sampled_from(["1", "4", "7", "10", "negative", "positive"])).map(
        list
    ),
    min_size=1,
    max_size=6,
)
SUFFIX = st.sampled_from([".csv", ".tsv", ".jsonl", ".txt", ""])
ENCODING = st.sampled_from(["utf-8", "latin-1", "utf-16"])
LABELS = st.sampled_from(
    [
        {},
        {"map": {"1": "negative", "10": "positive"}},
        {"ranges": {"low": [1, 4], "high": [7, 10]}},
        {"names": ["negative", "positive"]},
    ]
)


def _delimited(header: list[str], rows: list[list[str]], delimiter: str) -> str:
    def cell(value: str) -> str:
        return value if value and value[0] in "\"'" else value.replace(delimiter, " ")

    return "\n".join(delimiter.join(cell(v) for v in line) for line in [header, *rows]) + "\n"


def _jsonl(header: list[str], rows: list[list[str]]) -> str:
    import json

    return "".join(json.dumps(dict(zip(header, row, strict=False))) + "\n" for row in rows)


def _load(content: bytes, suffix: str, encoding: str, labels: dict, **data) -> None:
    raw = {"source": "file", "path": "unused", "encoding": encoding, "labels": labels, **data}
    cfg = config_from_dict({"data": raw}).data
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(content)
        try:
            texts = load_labelled_file(path, cfg)
        except DataError as err:
            message = str(err)
            assert message and "\n" not in message, repr(message)
            assert str(path) in message, message  # names the file
            return
        assert len(texts.texts) == len(texts.labels) > 0
        assert all(0 <= label < len(texts.label_names) for label in texts.labels)


HEADER = st.one_of(
    st.just(["text", "label"]),
    st.just(["label", "text", "rating"]),
    st.permutations(["text", "label", "review"]),
    st.lists(COLUMN, min_size=0, max_size=4),
)
NATURAL_SUFFIX = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=HEADER,
    rows=ROWS,
    kind=st.sampled_from(["csv", "tsv", "jsonl"]),
    suffix=st.one_of(st.none(), SUFFIX),  # None: the kind's own suffix (most files are named right)
    encoding=st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16"]),
    labels=LABELS,
)
def test_structured_junk_gives_data_or_one_clear_line(header, rows, kind, suffix, encoding, labels):
    if kind == "jsonl":
        text = _jsonl(header, rows)
    else:
        text = _delimited(header, rows, "," if kind == "csv" else "\t")
    _load(text.encode(encoding, errors="replace"), suffix or NATURAL_SUFFIX[kind], encoding, labels)


@settings(max_examples=100, deadline=None)
@given(content=st.binary(max_size=200), suffix=SUFFIX, encoding=ENCODING, labels=LABELS)
def test_arbitrary_bytes_give_data_or_one_clear_line(content, suffix, encoding, labels):
    _load(content, suffix, encoding, labels)


ORANGE_ROW = st.sampled_from(["d\tstring", "discrete\ts", "class\tmeta", "\t", "", "c\tm", "a b\tstring", "x\ty"])
LAYOUT = st.sampled_from(
    [
        {"header": False, "text_column": [1, 2], "label_column": 0},
        {"header": False, "text_column": 1, "label_column": 0, "skip_rows": 1},
        {"skip_rows": 2},
        {"format": "orange"},
        {"text_column": [0, "text"], "text_separator": ". "},
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=HEADER,
    annotations=st.lists(ORANGE_ROW, max_size=2),
    rows=ROWS,
    suffix=st.sampled_from([".tab", ".tsv", ".csv", ".parquet"]),
    layout=LAYOUT,
    labels=LABELS,
)
def test_new_layouts_give_data_or_one_clear_line(header, annotations, rows, suffix, layout, labels):
    """Header-less files, several text columns, skipped rows, Orange annotation rows, bytes named .parquet."""
    delimiter = "," if suffix == ".csv" else "\t"
    text = _delimited(header, rows, delimiter)
    lines = text.split("\n")
    text = "\n".join([lines[0], *annotations, *lines[1:]])
    _load(text.encode("utf-8", errors="replace"), suffix, "utf-8", labels, **layout)
