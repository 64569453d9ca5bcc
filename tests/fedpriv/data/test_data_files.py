"""Reading a node's labelled text file: formats, label mapping and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpriv.data.data_files import LabelledTexts, load_labelled_file, map_labels, read_records
from fedpriv.kernel.config import config_from_dict
from fedpriv.kernel.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared test data not found at {SHARED_DATA} (present in CI and dev machines)"
)

DRUG_RANGES = {"negative": [1, 4], "neutral": [5, 6], "positive": [7, 10]}


def data_cfg(**data):
    """A DataConfig built through the real config parser (so it is validated the same way)."""
    raw = {"data": {"source": "file", "path": "unused", **data}}
    return config_from_dict(raw).data


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def error_of(func, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error message must be one line: {message!r}"
    return message


# --------------------------------------------------------------------------- formats


def test_csv_with_multiline_quoted_fields(tmp_path):
    path = write(
        tmp_path,
        "reviews.csv",
        'id,text,label\n1,"first line\nsecond line, with comma",pos\n2,"she said ""hi""",neg\n3,plain,pos\n',
    )
    records = read_records(path)
    assert [r["id"] for r in records] == ["1", "2", "3"]
    assert records[0]["text"] == "first line\nsecond line, with comma"
    assert records[1]["text"] == 'she said "hi"'

    data = load_labelled_file(path, data_cfg())
    assert data.texts == ["first line\nsecond line, with comma", 'she said "hi"', "plain"]
    assert data.label_names == ["neg", "pos"]
    assert data.labels == [1, 0, 1]
    assert len(data) == 3
    assert data.source == str(path)


def test_tsv_and_tab_suffix(tmp_path):
    text = 'label\tsentence\n0\tbad film , really\n1\tgood , "quoted" film\n'
    for name in ("x.tsv", "x.tab"):
        records = read_records(write(tmp_path, name, text))
        assert records == [
            {"label": "0", "sentence": "bad film , really"},
            {"label": "1", "sentence": 'good , "quoted" film'},
        ]


def test_jsonl_values_become_strings(tmp_path):
    lines = [
        {"text": "a", "label": 7, "score": 0.5, "flag": True, "none": None},
        {"text": "b", "label": 3.0, "score": 2, "flag": False, "none": None},
    ]
    path = write(tmp_path, "x.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = read_records(path)
    assert records[0] == {"text": "a", "label": "7", "score": "0.5", "flag": "true", "none": ""}
    assert records[1]["label"] == "3"
    assert read_records(write(tmp_path, "y.ndjson", '{"text": "a", "label": 1}\n'))[0]["label"] == "1"


def test_explicit_format_overrides_suffix(tmp_path):
    path = write(tmp_path, "data.txt", "text\tlabel\nhello\tx\n")
    assert read_records(path, fmt="tsv") == [{"text": "hello", "label": "x"}]
    message = error_of(read_records, path)
    assert str(path) in message and "data.format" in message


def test_keep_columns_and_subset(tmp_path):
    path = write(tmp_path, "x.csv", "text,label,site\na,p,s1\nb,n,s2\nc,p,s1\n")
    data = load_labelled_file(path, data_cfg(), keep_columns=["site"])
    assert data.columns == {"site": ["s1", "s2", "s1"]}
    sub = data.subset([2, 0])
    assert isinstance(sub, LabelledTexts)
    assert sub.texts == ["c", "a"] and sub.labels == [1, 1] and sub.columns == {"site": ["s1", "s1"]}
    assert sub.label_names == data.label_names and sub.source == data.source


def test_html_unescape_and_whitespace(tmp_path):
    path = write(tmp_path, "x.csv", 'text,label\n"  it&#039;s &amp; &quot;ok&quot;  ",a\nplain,b\n')
    assert load_labelled_file(path, data_cfg(html_unescape=True)).texts == ['it\'s & "ok"', "plain"]
    assert load_labelled_file(path, data_cfg()).texts == ["it&#039;s &amp; &quot;ok&quot;", "plain"]


def test_encoding_setting(tmp_path):
    path = write(tmp_path, "x.csv", "text,label\ncaf\xe9 \xa35,a\ntea,b\n", encoding="latin-1")
    message = error_of(load_labelled_file, path, data_cfg())
    assert str(path) in message and "data.encoding" in message and "line 2" in message
    assert load_labelled_file(path, data_cfg(encoding="latin-1")).texts == ["caf\xe9 \xa35", "tea"]


def test_byte_order_mark_is_ignored(tmp_path):
    path = write(tmp_path, "x.csv", "\ufefftext,label\nhello,a\n")
    assert read_records(path) == [{"text": "hello", "label": "a"}]


# --------------------------------------------------------------------------- errors


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.csv"
    message = error_of(load_labelled_file, path, data_cfg())
    assert str(path) in message and "not found" in message


def test_directory_is_not_a_file(tmp_path):
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    message = error_of(read_records, folder)
    assert str(folder) in message and "directory" in message


@pytest.mark.parametrize("content", ["", "   \n\n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, "x.csv", content)
    message = error_of(read_records, path)
    assert str(path) in message and "empty" in message


def test_header_without_rows(tmp_path):
    path = write(tmp_path, "x.csv", "text,label\n")
    message = error_of(read_records, path)
    assert str(path) in message and "no data rows" in message


def test_empty_jsonl(tmp_path):
    path = write(tmp_path, "x.jsonl", "\n\n")
    assert str(path) in error_of(read_records, path)


def test_missing_text_column_lists_columns(tmp_path):
    path = write(tmp_path, "x.tsv", "label\tsentence\n0\thi\n")
    message = error_of(load_labelled_file, path, data_cfg())
    assert str(path) in message and "'text'" in message and "data.text_column" in message
    assert "label, sentence" in message


def test_missing_label_column(tmp_path):
    path = write(tmp_path, "x.csv", "text,rating\nhi,3\n")
    message = error_of(load_labelled_file, path, data_cfg())
    assert str(path) in message and "'label'" in message and "data.label_column" in message
    assert "text, rating" in message


def test_missing_kept_column(tmp_path):
    path = write(tmp_path, "x.csv", "text,label\nhi,a\n")
    message = error_of(load_labelled_file, path, data_cfg(), keep_columns=["condition"])
    assert str(path) in message and "'condition'" in message and "partitioning.column" in message


def test_jsonl_object_without_text_key(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"text": "a", "label": "x"}\n{"label": "y"}\n')
    message = error_of(load_labelled_file, path, data_cfg())
    assert str(path) in message and "row 2" in message and "'text'" in message


def test_empty_text_is_an_error_not_skipped(tmp_path):
    path = write(tmp_path, "x.csv", 'text,label\nfine,a\n"first\nsecond",b\n"   ",a\n')
    message = error_of(load_labelled_file, path, data_cfg())
    assert str(path) in message and "row 3" in message and "line 5" in message and "'text'" in message


def test_empty_label_is_an_error(tmp_path):
    path = write(tmp_path, "x.csv", "text,label\nfine,a\nnope,\n")
    message = error_of(load_labelled_file, path, data_cfg())
    assert str(path) in message and "row 2" in message and "'label'" in message


def test_wrong_field_count(tmp_path):
    path = write(tmp_path, "x.csv", "text,label\nfine,a\ntoo,many,fields\n")
    message = error_of(read_records, path)
    assert str(path) in message and "row 2" in message and "3 fields" in message


def test_duplicate_header(tmp_path):
    path = write(tmp_path, "x.csv", "text,text,label\na,b,c\n")
    message = error_of(read_records, path)
    assert str(path) in message and "'text'" in message


def test_malformed_json_line(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    message = error_of(read_records, path)
    assert str(path) in message and "line 2" in message and "JSON" in message


def test_jsonl_line_not_an_object(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"text": "a", "label": 1}\n\n["b", 2]\n')
    message = error_of(read_records, path)
    assert str(path) in message and "line 3" in message and "object" in message


def test_unknown_suffix(tmp_path):
    path = write(tmp_path, "x.xlsx", "whatever")
    message = error_of(read_records, path)
    assert str(path) in message and ".xlsx" in message


def test_unknown_encoding(tmp_path):
    path = write(tmp_path, "x.csv", "text,label\na,b\n")
    message = error_of(read_records, path, encoding="no-such-codec")
    assert str(path) in message and "data.encoding" in message


# --------------------------------------------------------------------------- labels


def test_label_map():
    cfg = data_cfg(labels={"map": {"0": "negative", "1": "positive"}}).labels
    labels, names = map_labels(["1", "0", "1"], cfg, source="f.tsv", column="label")
    assert names == ["negative", "positive"] and labels == [1, 0, 1]


def test_label_map_unknown_value():
    cfg = data_cfg(labels={"map": {"0": "negative", "1": "positive"}}).labels
    message = error_of(map_labels, ["1", "2", "0", "2", "3"], cfg, source="f.tsv", column="stars")
    assert "f.tsv" in message and "'stars'" in message and "'2'" in message and "'3'" in message
    assert "3 row(s)" in message and "data.labels.map" in message


def test_label_ranges_and_non_numeric():
    cfg = data_cfg(labels={"ranges": DRUG_RANGES}).labels
    labels, names = map_labels(["1", "4", "5", "6.0", " 7 ", "10"], cfg, source="d.csv", column="rating")
    assert names == ["negative", "neutral", "positive"]
    assert labels == [0, 0, 1, 1, 2, 2]
    message = error_of(map_labels, ["3", "4.5"], cfg, source="d.csv", column="rating")
    assert "'4.5'" in message and "negative [1, 4]" in message and "1 row(s)" in message
    message = error_of(map_labels, ["3", "ten", "n/a"], cfg, source="d.csv", column="rating")
    assert "d.csv" in message and "'rating'" in message and "'ten'" in message and "2 row(s)" in message


def test_overlapping_ranges_are_rejected():
    cfg = data_cfg(labels={"ranges": {"low": [1, 5], "high": [5, 10]}}).labels
    message = error_of(map_labels, ["5"], cfg, source="d.csv", column="rating")
    assert "low" in message and "high" in message


def test_label_names_fix_order_and_reject_others():
    cfg = data_cfg(labels={"names": ["pos", "neg"]}).labels
    labels, names = map_labels(["neg", "pos"], cfg, source="f", column="label")
    assert names == ["pos", "neg"] and labels == [1, 0]
    message = error_of(map_labels, ["neg", "meh"], cfg, source="f", column="label")
    assert "'meh'" in message and "pos, neg" in message and "1 row(s)" in message


def test_mapped_label_outside_names():
    cfg = data_cfg(labels={"names": ["a", "b"], "map": {"x": "a", "y": "c"}}).labels
    message = error_of(map_labels, ["x", "y"], cfg, source="f", column="label")
    assert "'y'" in message and "a, b" in message


def test_passed_label_names_for_test_file(tmp_path):
    cfg = data_cfg().labels
    labels, names = map_labels(["b"], cfg, source="test.csv", column="label", label_names=["a", "b"])
    assert names == ["a", "b"] and labels == [1]
    message = error_of(map_labels, ["c"], cfg, source="test.csv", column="label", label_names=["a", "b"])
    assert "test.csv" in message and "'c'" in message and "a, b" in message


def test_default_class_order_is_sorted_numerically_for_numbers():
    _, names = map_labels(["10", "2", "1"], data_cfg().labels, source="f", column="label")
    assert names == ["1", "2", "10"]
    _, names = map_labels(["b", "a", "c", "a"], data_cfg().labels, source="f", column="label")
    assert names == ["a", "b", "c"]


# --------------------------------------------------------------------------- real files


@needs_shared_data
def test_drug_reviews_real_file():
    path = SHARED_DATA / "drug_reviews" / "drugs.csv"
    cfg = data_cfg(text_column="review", label_column="rating", html_unescape=True, labels={"ranges": DRUG_RANGES})
    data = load_labelled_file(path, cfg, keep_columns=["condition"])
    assert len(data) == 3000
    assert data.label_names == ["negative", "neutral", "positive"]
    shares = [data.labels.count(i) / len(data) for i in range(3)]
    assert 0.2 < shares[0] < 0.32 and 0.05 < shares[1] < 0.14 and 0.58 < shares[2] < 0.72
    assert not any("&#039;" in t for t in data.texts)
    assert any("\n" in t for t in data.texts)  # multi-line quoted reviews survive
    assert data.columns["condition"].count("Birth Control") == 1147
    raw = read_records(path)
    assert [r["rating"] for r in raw[:3]] == ["8", "5", "8"]


@needs_shared_data
def test_sst2_train_and_dev_columns():
    train = load_labelled_file(SHARED_DATA / "sst2" / "dev.tsv", data_cfg(), text_column="content")
    assert len(train) == 872 and train.label_names == ["0", "1"]
    message = error_of(load_labelled_file, SHARED_DATA / "sst2" / "dev.tsv", data_cfg(text_column="sentence"))
    assert "dev.tsv" in message and "'sentence'" in message and "label, content" in message


def test_a_header_with_a_line_break_in_a_quoted_name_stays_a_one_line_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('"te\nxt",label\n', encoding="utf-8")  # a header, no data rows
    with pytest.raises(DataError) as info:
        read_records(path)
    assert "\n" not in str(info.value) and "te\\nxt" in str(info.value) and "no data rows" in str(info.value)
