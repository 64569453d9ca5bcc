"""A node reads its own labelled text file (CSV, TSV or JSONL).

Used by a deployed client on its local file and by the simulation on the
shared corpus. Every problem with the file is a :class:`DataError` with one
line that names the file, the field and what is expected; rows are never
dropped silently.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpriv.config import DataConfig, LabelConfig
from fedpriv.errors import DataError

FORMAT_BY_SUFFIX = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
FORMATS = ("csv", "tsv", "jsonl")
_MAX_LISTED = 10  # how many values an error message lists before "..."


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels (indices into ``label_names``)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.texts)
        if len(self.labels) != n or any(len(values) != n for values in self.columns.values()):
            raise ValueError("LabelledTexts: texts, labels and every kept column must have the same length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The rows at ``indices`` (in that order), same label names and source."""
        idx = [int(i) for i in indices]
        return LabelledTexts(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=list(self.label_names),
            columns={name: [values[i] for i in idx] for name, values in self.columns.items()},
            source=self.source,
        )


# --------------------------------------------------------------------------- reading


def _listing(values: Sequence[str]) -> str:
    shown = [str(v) for v in values[:_MAX_LISTED]]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def _resolve_format(path: Path, fmt: str) -> str:
    if fmt in FORMATS:
        return fmt
    if fmt != "auto":
        raise DataError(f"data file {path}: data.format: expected auto, csv, tsv or jsonl, got {fmt!r}")
    found = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"data file {path}: cannot tell the format from the suffix {path.suffix!r}"
            f" (known: {', '.join(FORMAT_BY_SUFFIX)}): set data.format to csv, tsv or jsonl"
        )
    return found


def _read_text(path: Path, encoding: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path}: not found") from None
    except IsADirectoryError:
        raise DataError(f"data file {path}: is a directory, expected a CSV, TSV or JSONL file") from None
    except OSError as exc:
        raise DataError(f"data file {path}: cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise DataError(f"data file {path}: data.encoding: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"data file {path}: not valid {encoding} text (byte 0x{raw[exc.start]:02x} on line {line}):"
            " set data.encoding to the file's encoding, for example latin-1 or cp1252"
        ) from None
    if text.startswith("\ufeff"):  # byte-order mark written by some spreadsheet tools
        text = text[1:]
    if not text.strip():
        raise DataError(f"data file {path}: is empty, expected a header row and at least one data row")
    return text


def _json_to_str(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _read_delimited(path: Path, text: str, delimiter: str) -> tuple[list[dict[str, str]], list[int]]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records: list[dict[str, str]] = []
    lines: list[int] = []
    header: list[str] | None = None
    last_line = 0
    try:
        for row in reader:
            start_line = last_line + 1
            last_line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = [name.strip() for name in row]
                duplicates = sorted(name for name, n in Counter(header).items() if n > 1)
                if duplicates:
                    raise DataError(
                        f"data file {path}: column {duplicates[0]!r} appears more than once in the header"
                        f" (line {start_line}): give every column a distinct name"
                    )
                continue
            if len(row) != len(header):
                raise DataError(
                    f"data file {path}: row {len(records) + 1} (line {start_line}) has {len(row)} fields,"
                    f" the header has {len(header)}: check the quoting of that row"
                    + (" (is it a TSV file? set data.format: tsv)" if kind == "CSV" and len(row) == 1 else "")
                )
            records.append(dict(zip(header, row, strict=True)))
            lines.append(start_line)
    except csv.Error as exc:
        raise DataError(f"data file {path}: not valid {kind} near line {reader.line_num} ({exc})") from None
    if header is None:
        raise DataError(f"data file {path}: is empty, expected a header row and at least one data row")
    if not records:
        raise DataError(f"data file {path}: has a header ({_listing(header)}) but no data rows")
    return records, lines


def _read_jsonl(path: Path, text: str) -> tuple[list[dict[str, str]], list[int]]:
    records: list[dict[str, str]] = []
    lines: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data file {path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}):"
                " expected one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"data file {path}: line {number} is a JSON {type(obj).__name__}, expected an object"
                ' such as {"text": "...", "label": "..."}'
            )
        records.append({str(key): _json_to_str(value) for key, value in obj.items()})
        lines.append(number)
    if not records:
        raise DataError(f"data file {path}: has no JSON objects, expected one per line")
    return records, lines


def _read_with_lines(path: str | Path, fmt: str, encoding: str) -> tuple[list[dict[str, str]], list[int]]:
    path = Path(path)
    fmt = _resolve_format(path, fmt)
    text = _read_text(path, encoding)
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    return _read_delimited(path, text, "\t" if fmt == "tsv" else ",")


def read_records(path: str | Path, fmt: str = "auto", encoding: str = "utf-8") -> list[dict[str, str]]:
    """All rows of a CSV/TSV/JSONL file as dicts of strings (header names as keys).

    CSV and TSV follow the ``csv`` module's quoting (fields may span lines when
    quoted); JSONL has one object per line and its values are turned into
    strings (``7`` -> ``"7"``, ``null`` -> ``""``).
    """
    records, _ = _read_with_lines(path, fmt, encoding)
    return records


# --------------------------------------------------------------------------- labels


def _as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _sorted_classes(names: set[str]) -> list[str]:
    """Sorted class names; numerically when every name is a number (so 2 comes before 10)."""
    if names and all(_as_number(n) is not None for n in names):
        return sorted(names, key=lambda n: (_as_number(n), n))
    return sorted(names)


def _fmt_bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def map_labels(
    raw_labels: list[str],
    labels_cfg: LabelConfig,
    *,
    source: str,
    column: str,
    label_names: list[str] | None = None,
) -> tuple[list[int], list[str]]:
    """Turn raw label values into class indices; returns ``(labels, label_names)``.

    ``labels_cfg.map`` sends raw strings to class names, ``labels_cfg.ranges``
    sends numbers within an inclusive [low, high] to a class name, otherwise the
    raw value is the class name. The class order is ``labels_cfg.names`` when
    given, else ``label_names`` (for example the training file's classes when
    reading a test file), else the sorted class names.
    """
    where = f"data file {source}: column '{column}'"
    raw = [str(v).strip() for v in raw_labels]
    if labels_cfg.map:
        mapped: list[str | None] = [labels_cfg.map.get(v) for v in raw]
        expected = "a key of data.labels.map (" + _listing(list(labels_cfg.map)) + ")"
    elif labels_cfg.ranges:
        expected = (
            "a number in data.labels.ranges ("
            + ", ".join(
                f"{name} [{_fmt_bound(low)}, {_fmt_bound(high)}]" for name, (low, high) in labels_cfg.ranges.items()
            )
            + ")"
        )
        mapped = []
        for i, value in enumerate(raw):
            number = _as_number(value)
            if number is None:
                bad = [(j, v) for j, v in enumerate(raw) if _as_number(v) is None]
                raise DataError(
                    f"{where}: row {i + 1} has the non-numeric label {value!r}; {len(bad)} row(s) have"
                    f" non-numeric labels; expected {expected}"
                )
            hits = [name for name, (low, high) in labels_cfg.ranges.items() if low <= number <= high]
            if len(hits) > 1:
                raise DataError(
                    f"{where}: label {value!r} (row {i + 1}) falls in more than one of data.labels.ranges"
                    f" ({', '.join(hits)}): make the ranges disjoint"
                )
            mapped.append(hits[0] if hits else None)
    else:
        mapped = list(raw)
        expected = None

    if labels_cfg.names:
        classes = list(labels_cfg.names)
        allowed_from = "data.labels.names"
    elif label_names is not None:
        classes = list(label_names)
        allowed_from = "the training data's classes"
    else:
        classes = _sorted_classes({m for m in mapped if m is not None})
        allowed_from = None
    index = {name: i for i, name in enumerate(classes)}

    unknown = [i for i, m in enumerate(mapped) if m is None or m not in index]
    if unknown:
        first = unknown[0]
        values = sorted({raw[i] for i in unknown})
        if expected is None or mapped[first] is not None:
            # the raw value (or what it maps to) is not one of the allowed classes
            expected = f"one of {allowed_from} ({_listing(classes)})"
            if mapped[first] is not None and mapped[first] != raw[first]:
                expected = f"a value that data.labels maps to {expected}"
        raise DataError(
            f"{where}: unknown label {raw[first]!r} at row {first + 1}; {len(unknown)} row(s) have unknown labels"
            f" ({_listing([repr(v) for v in values])}); expected {expected}"
        )
    return [index[m] for m in mapped], classes  # type: ignore[index]


# --------------------------------------------------------------------------- labelled files


def load_labelled_file(
    path: str | Path,
    data_cfg: DataConfig,
    *,
    text_column: str | None = None,
    keep_columns: Sequence[str] = (),
    label_names: list[str] | None = None,
) -> LabelledTexts:
    """Read a labelled text file as configured by ``data_cfg``.

    ``text_column`` overrides ``data_cfg.text_column`` (for a test file whose
    column is named differently); ``keep_columns`` are raw columns to keep (for
    example the column that a natural partitioning groups by); ``label_names``
    fixes the classes (a test file must use the training file's classes).
    """
    source = str(path)
    records, lines = _read_with_lines(path, data_cfg.format, data_cfg.encoding)
    text_col = text_column or data_cfg.text_column
    label_col = data_cfg.label_column
    found = list(records[0])

    def missing(column: str, what: str, key: str) -> DataError:
        return DataError(
            f"data file {source}: no {what} column {column!r} (set {key}); columns found: {_listing(found)}"
        )

    text_key = "data.text_column" if text_column in (None, data_cfg.text_column) else "data.test_text_column"
    needed = [(text_col, "text", text_key), (label_col, "label", "data.label_column")]
    needed += [(c, "kept", "partitioning.column") for c in keep_columns]
    for column, what, key in needed:
        if column not in records[0]:
            raise missing(column, what, key)

    texts: list[str] = []
    raw_labels: list[str] = []
    for row, (record, line) in enumerate(zip(records, lines, strict=True), start=1):
        for column, what, key in needed:
            if column not in record:  # JSONL objects may lack keys that the first one has
                raise DataError(
                    f"data file {source}: row {row} (line {line}) has no {what} field {column!r} (set {key});"
                    f" its fields: {_listing(list(record))}"
                )
        text = record[text_col]
        if data_cfg.html_unescape:
            text = html.unescape(text)
        text = text.strip()
        if not text:
            raise DataError(
                f"data file {source}: row {row} (line {line}) has an empty text in column {text_col!r}:"
                " remove the row or fill in its text"
            )
        label = record[label_col].strip()
        if not label:
            raise DataError(
                f"data file {source}: row {row} (line {line}) has an empty label in column {label_col!r}:"
                " remove the row or fill in its label"
            )
        texts.append(text)
        raw_labels.append(label)

    labels, names = map_labels(raw_labels, data_cfg.labels, source=source, column=label_col, label_names=label_names)
    columns = {c: [record[c] for record in records] for c in dict.fromkeys(keep_columns)}
    return LabelledTexts(texts=texts, labels=labels, label_names=names, columns=columns, source=source)


def split_indices(indices: list[int], labels: Sequence[int], fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/test split of ``indices``; stratified when every class has >= 2 examples."""
    n = len(indices)
    if n < 2:
        return sorted(indices), []
    rng = np.random.default_rng(seed)
    n_test = min(max(int(round(n * fraction)), 1), n - 1)
    by_class: dict[int, list[int]] = {}
    for i in sorted(indices):
        by_class.setdefault(labels[i], []).append(i)
    if all(len(rows) >= 2 for rows in by_class.values()):
        classes = sorted(by_class)
        quotas = [len(by_class[c]) * n_test / n for c in classes]
        take = [int(q) for q in quotas]
        by_remainder = sorted(range(len(classes)), key=lambda k: (-(quotas[k] - take[k]), k))
        for k in by_remainder[: n_test - sum(take)]:
            take[k] += 1
        test: list[int] = []
        for k, c in enumerate(classes):
            rows = by_class[c]
            count = min(take[k], len(rows) - 1)  # keep at least one of each class for training
            test.extend(rng.permutation(rows)[:count].tolist())
    else:
        test = rng.permutation(sorted(indices))[:n_test].tolist()
    test_set = set(test)
    return sorted(i for i in indices if i not in test_set), sorted(test)
