"""A node reads its own labelled text: CSV, TSV, Orange ``.tab``, JSONL, Parquet or a ``save_to_disk`` folder.

Used by a deployed client on its local file and by the simulation on the
shared corpus. Every problem with the file is a :class:`DataError` with one
line that names the file, the field and what is expected; rows are never
dropped silently.

CSV, TSV and JSONL are read here rather than with Hugging Face ``datasets``:
its CSV loader (pandas) reports a bad row as "An error occurred while
generating the dataset" without its line, turns ``"3"`` into an integer and
``nan`` into a missing value, takes a headerless file's first row as its
header and writes a cache folder. Parquet files and ``save_to_disk`` folders
are read with ``datasets`` (fedpriv/data/arrow_files.py) and checked here like the
rest.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpriv.data.arrow_files import is_saved_dataset, read_parquet, read_saved_dataset
from fedpriv.kernel.config import DataConfig, LabelConfig
from fedpriv.kernel.errors import DataError

FORMAT_BY_SUFFIX = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tab",  # TSV, or Orange's .tab when its type and flag rows follow the header (detected)
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
FORMATS = ("csv", "tsv", "jsonl", "orange", "parquet", "hf_disk")
_MAX_LISTED = 10  # how many values an error message lists before "..."

# Orange's .tab: a header row, a row of types and a row of flags (https://orange3.readthedocs.io, "Loading your
# data"); or one header row whose names carry the same as a prefix ("mS#text", "cD#topic")
ORANGE_TYPES = {"c", "d", "s", "t", "continuous", "discrete", "string", "time", "basket"}
ORANGE_FLAGS = {"c", "m", "i", "w", "class", "meta", "ignore", "weight"}
_ORANGE_PREFIX = re.compile(r"(?:[cmiw]{1,2}[CDST]?|[CDST])#")


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels (indices into ``label_names``, in the order the user gave)."""

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

    def class_counts(self) -> dict[str, int]:
        """``{class name: examples}`` for every class (zeros included), in ``label_names``' order."""
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

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


@dataclass(frozen=True)
class _Table:
    """The rows of a file as strings; ``header`` is None for a CSV/TSV file read with ``data.header: false``
    (its record keys are then the 0-based column numbers as strings)."""

    records: list[dict[str, str]]
    lines: list[int] | None  # the line each row starts on (text files), None for Parquet / save_to_disk
    header: list[str] | None
    fmt: str
    class_names: dict[str, list[str]] = field(default_factory=dict)  # a column's declared classes (ClassLabel)

    def at(self, row: int) -> str:
        """``row 3 (line 5)``: where a row is, for messages."""
        return f"row {row}" if self.lines is None else f"row {row} (line {self.lines[row - 1]})"


def _one_line(text: str) -> str:
    """``text`` as it can stand inside a one-line error: line breaks and other control characters escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _listing(values: Sequence[str]) -> str:
    shown = [_one_line(str(v)) for v in values[:_MAX_LISTED]]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def _resolve_format(path: Path, fmt: str) -> str:
    if fmt in FORMATS:
        return fmt
    if fmt != "auto":
        raise DataError(f"data file {path}: data.format: expected auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if path.is_dir():
        if is_saved_dataset(path):
            return "hf_disk"
        raise DataError(
            f"data file {path}: is a directory, expected a CSV, TSV, JSONL or Parquet file, or a folder written by"
            " datasets' save_to_disk (with dataset_info.json or dataset_dict.json)"
        )
    found = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"data file {path}: cannot tell the format from the suffix {path.suffix!r}"
            f" (known: {', '.join(FORMAT_BY_SUFFIX)}): set data.format to one of {', '.join(FORMATS)}"
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


def _orange_annotations(types: list[str], flags: list[str], *, loose: bool) -> bool:
    """Whether two rows under a header are Orange's type row and flag row.

    Strict (any CSV/TSV): every type is an Orange type word (``d``, ``string``...) or empty, at least one is
    not empty, and every flag is an Orange flag (``class``, ``meta``...), a ``key=value`` or empty. ``loose``
    (a ``.tab`` file, ``data.format: orange``) also takes a discrete column's list of values as its type.
    """
    cells = [c.strip() for c in types]
    if not any(c.lower() in ORANGE_TYPES for c in cells):
        return False
    if any(c and c.lower() not in ORANGE_TYPES and not (loose and " " in c) for c in cells):
        return False
    return all(t.lower() in ORANGE_FLAGS or "=" in t for c in flags for t in c.split())


def _blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _read_delimited(
    path: Path, text: str, delimiter: str, *, header: bool = True, skip_rows: int = 0, orange: str = "no"
) -> tuple[list[dict[str, str]], list[int], list[str] | None]:
    """Rows of a CSV/TSV file; ``orange``: ``no``, ``detect`` (a .tab file) or ``require`` (data.format orange)."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    physical: list[tuple[int, list[str]]] = []  # (line the row starts on, fields), blank rows included
    last_line = 0
    try:
        for row in reader:
            physical.append((last_line + 1, row))
            last_line = reader.line_num
    except csv.Error as exc:
        raise DataError(f"data file {path}: not valid {kind} near line {reader.line_num} ({exc})") from None
    rows = iter(physical)
    names: list[str] | None = None
    if header:
        start_line, first = next(((n, r) for n, r in rows if not _blank(r)), (0, None))
        if first is None:
            raise DataError(f"data file {path}: is empty, expected a header row and at least one data row")
        names = [name.strip() for name in first]
        if orange != "no" and names and all(_ORANGE_PREFIX.match(name) for name in names):
            names = [_ORANGE_PREFIX.sub("", name, count=1) for name in names]  # one-row Orange header
        elif orange != "no":
            annotations = [next(rows, (0, [])) for _ in range(2)]
            if not _orange_annotations(annotations[0][1], annotations[1][1], loose=True):
                if orange == "require":
                    raise DataError(
                        f"data file {path}: data.format orange: line {annotations[0][0] or start_line + 1} is not"
                        " Orange's type row (expected a type for each column: discrete, continuous, string or"
                        " time, then a flags row: class, meta or empty); for a plain TSV file set data.format: tsv"
                    )
                rows = iter(physical)  # a plain TSV file that happens to end in .tab
                next(n for n, r in rows if not _blank(r))
        duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
        if duplicates:
            raise DataError(
                f"data file {path}: column {duplicates[0]!r} appears more than once in the header"
                f" (line {start_line}): give every column a distinct name"
            )
    records: list[dict[str, str]] = []
    lines: list[int] = []
    skipped = 0
    for start_line, row in rows:
        if _blank(row):
            continue  # blank line
        if skipped < skip_rows:
            skipped += 1
            continue
        if names is None:
            records.append({str(i): value for i, value in enumerate(row)})
        else:
            if len(row) != len(names):
                raise DataError(
                    f"data file {path}: row {len(records) + 1} (line {start_line}) has {len(row)} fields,"
                    f" the header has {len(names)}: check the quoting of that row"
                    + (" (is it a TSV file? set data.format: tsv)" if kind == "CSV" and len(row) == 1 else "")
                )
            records.append(dict(zip(names, row, strict=True)))
        lines.append(start_line)
    if names is not None and orange == "no" and records:
        # Orange's type row taken for data would become an example labelled "d"; its flags row may be blank
        first = next(k for k, (n, _) in enumerate(physical) if n == lines[0])
        after = physical[first + 1] if first + 1 < len(physical) else (0, [])
        if _orange_annotations(physical[first][1], after[1], loose=False):
            raise DataError(
                f"data file {path}: lines {lines[0]}-{after[0] or lines[0] + 1} look like Orange's type and flag"
                f" rows ({_listing(physical[first][1])}), not data: set data.format: orange, or data.skip_rows: 2"
            )
    if not records:
        if skipped:
            raise DataError(f"data file {path}: data.skip_rows={skip_rows} skips every one of its {skipped} data rows")
        if names is None:
            raise DataError(f"data file {path}: is empty, expected at least one data row")
        raise DataError(f"data file {path}: has a header ({_listing(names)}) but no data rows")
    return records, lines, names


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


def _read_table(
    path: str | Path,
    fmt: str,
    encoding: str,
    *,
    header: bool = True,
    skip_rows: int = 0,
    split: str = "train",
    split_key: str = "data.split",
) -> _Table:
    path = Path(path)
    fmt = _resolve_format(path, fmt)
    if not header and fmt in ("jsonl", "parquet", "hf_disk"):
        raise DataError(f"data file {path}: data.header: false applies to CSV and TSV files, this one is {fmt}")
    if fmt in ("parquet", "hf_disk"):
        rows = read_parquet(path) if fmt == "parquet" else read_saved_dataset(path, split, split_key)
        names = list(rows.columns)
        if not names or rows.num_rows == 0:
            raise DataError(f"data file {path}: the {rows.what} has no rows (columns: {_listing(names) or 'none'})")
        if skip_rows >= rows.num_rows:
            raise DataError(f"data file {path}: data.skip_rows={skip_rows} skips all {rows.num_rows} rows")
        records = [{name: rows.columns[name][i] for name in names} for i in range(skip_rows, rows.num_rows)]
        return _Table(records=records, lines=None, header=names, fmt=fmt, class_names=rows.class_names)
    text = _read_text(path, encoding)
    if fmt == "jsonl":
        records, lines = _read_jsonl(path, text)
        if skip_rows >= len(records):
            raise DataError(f"data file {path}: data.skip_rows={skip_rows} skips all {len(records)} JSON objects")
        kept = records[skip_rows:]
        return _Table(records=kept, lines=lines[skip_rows:], header=list(kept[0]), fmt=fmt)
    orange = {"orange": "require", "tab": "detect"}.get(fmt, "no")
    delimiter = "," if fmt == "csv" else "\t"
    records, lines, names = _read_delimited(path, text, delimiter, header=header, skip_rows=skip_rows, orange=orange)
    return _Table(records=records, lines=lines, header=names, fmt=fmt)


def read_records(
    path: str | Path, fmt: str = "auto", encoding: str = "utf-8", *, header: bool = True, skip_rows: int = 0
) -> list[dict[str, str]]:
    """All rows of a data file as dicts of strings (header names as keys; ``"0"``, ``"1"``... without a header).

    CSV and TSV follow the ``csv`` module's quoting (fields may span lines when
    quoted); JSONL has one object per line; JSONL, Parquet and save_to_disk
    values are turned into strings (``7`` -> ``"7"``, ``null`` -> ``""``).
    """
    return _read_table(path, fmt, encoding, header=header, skip_rows=skip_rows).records


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


def class_order(present: Iterable[str], labels_cfg: LabelConfig, declared: Sequence[str] | None = None) -> list[str]:
    """The classes in ``present`` in the order the user gave.

    ``labels_cfg.names`` when given; else the order in which ``labels.map``'s
    values (or ``labels.ranges``' names) are written; else ``declared`` (the
    file's own order, such as a ``ClassLabel``'s names); else sorted
    (numerically when every class is a number, so 2 comes before 10).
    """
    present = set(present)
    if labels_cfg.names:
        order = list(labels_cfg.names)
    elif labels_cfg.map:
        order = list(dict.fromkeys(labels_cfg.map.values()))
    elif labels_cfg.ranges:
        order = list(labels_cfg.ranges)
    else:
        order = list(declared or [])
    given = [name for name in order if name in present]
    return given + _sorted_classes(present - set(given))


def map_labels(
    raw_labels: list[str],
    labels_cfg: LabelConfig,
    *,
    source: str,
    column: str | int,
    label_names: list[str] | None = None,
    declared: Sequence[str] | None = None,
    min_classes: int = 2,
) -> tuple[list[int], list[str]]:
    """Turn raw label values into class indices; returns ``(labels, label_names)``.

    ``labels_cfg.map`` sends raw strings to class names, ``labels_cfg.ranges``
    sends numbers within an inclusive [low, high] to a class name, otherwise the
    raw value is the class name. The class order is ``labels_cfg.names`` when
    given, else ``label_names`` (for example the training file's classes when
    reading a test file), else :func:`class_order` of the classes found.
    Data with fewer than ``min_classes`` classes is refused unless
    ``label_names`` is given (a test file, or one organisation of a federation,
    may hold one class of many).
    """
    shown = f"column {column} (0-based)" if isinstance(column, int) else f"column '{column}'"
    where = f"data file {source}: {shown}"
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
        classes = class_order({m for m in mapped if m is not None}, labels_cfg, declared)
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
    labels = [index[m] for m in mapped]  # type: ignore[index]
    found = [classes[i] for i in sorted(set(labels))]
    if label_names is None and len(found) < min_classes:
        raise DataError(
            f"{where}: every row has the class {found[0]!r}; a classifier needs at least two classes: check"
            " data.label_column and data.labels"
        )
    return labels, classes


# --------------------------------------------------------------------------- labelled files


def _column_key(spec: str | int, table: _Table, source: str, what: str, key: str) -> str:
    """The record key of a configured column: a header name, or a 0-based number (as a string)."""
    if table.header is None:  # data.header: false (config.py refuses names there; partitioning.column may be one)
        if isinstance(spec, int) or spec.isdigit():
            return str(int(spec))
        raise DataError(
            f"data file {source}: {key}: {spec!r} is a column name, but data.header is false (no header row):"
            " give the column's 0-based number"
        )
    if isinstance(spec, int):
        if table.fmt == "jsonl":
            raise DataError(
                f"data file {source}: {key}: column number {spec} needs a CSV, TSV, Parquet or save_to_disk file;"
                " name the JSON key instead"
            )
        if spec >= len(table.header):
            raise DataError(
                f"data file {source}: {key}: there is no column {spec} (0-based): the file has {len(table.header)}"
                f" columns ({_listing(table.header)})"
            )
        return table.header[spec]
    if spec not in table.header:
        raise DataError(
            f"data file {source}: no {what} column {spec!r} (set {key}); columns found: {_listing(table.header)}"
        )
    return spec


def _shown(keys: Sequence[str], table: _Table) -> str:
    """``column 'text'``, ``columns 'title', 'description'`` or ``column 2 (0-based)`` for messages."""
    if table.header is None:
        return ("column " if len(keys) == 1 else "columns ") + ", ".join(keys) + " (0-based)"
    return ("column " if len(keys) == 1 else "columns ") + ", ".join(repr(k) for k in keys)


def load_labelled_file(
    path: str | Path,
    data_cfg: DataConfig,
    *,
    text_column: str | int | list[str | int] | None = None,
    keep_columns: Sequence[str] = (),
    label_names: list[str] | None = None,
    test_file: bool = False,
    min_classes: int = 2,
) -> LabelledTexts:
    """Read a labelled text file as configured by ``data_cfg``.

    ``text_column`` overrides ``data_cfg.text_column`` (for a test file whose
    column is named differently); ``keep_columns`` are raw columns to keep (for
    example the column that a natural partitioning groups by); ``label_names``
    fixes the classes (a test file must use the training file's classes);
    ``test_file`` reads ``data.test_split`` of a DatasetDict folder (else
    ``data.split``). Several text columns are joined with
    ``data.text_separator`` (empty ones left out).
    """
    source = str(path)
    split, split_key = (data_cfg.test_split, "data.test_split") if test_file else (data_cfg.split, "data.split")
    table = _read_table(
        path,
        data_cfg.format,
        data_cfg.encoding,
        header=data_cfg.header,
        skip_rows=data_cfg.skip_rows,
        split=split,
        split_key=split_key,
    )
    if text_column is None:
        text_column = (data_cfg.test_text_column if test_file else None) or data_cfg.text_column
    given_text = text_column in (None, data_cfg.text_column)
    text_key = "data.text_column" if given_text else "data.test_text_column"
    text_specs = text_column if isinstance(text_column, list) else [text_column]
    text_keys = list(dict.fromkeys(_column_key(c, table, source, "text", text_key) for c in text_specs))
    label_key = _column_key(data_cfg.label_column, table, source, "label", "data.label_column")
    kept = {c: _column_key(c, table, source, "kept", "partitioning.column") for c in dict.fromkeys(keep_columns)}
    needed = [(k, "text", text_key) for k in text_keys] + [(label_key, "label", "data.label_column")]
    needed += [(k, "kept", "partitioning.column") for k in kept.values()]

    texts: list[str] = []
    raw_labels: list[str] = []
    separator = data_cfg.text_separator
    for row, record in enumerate(table.records, start=1):
        for column, what, key in needed:
            if column in record:
                continue
            if table.header is None:  # a headerless row shorter than the configured column number
                raise DataError(
                    f"data file {source}: {table.at(row)} has {len(record)} fields, too few for column {column}"
                    f" ({key}, 0-based)"
                )
            # JSONL objects may lack keys that the first one has
            raise DataError(
                f"data file {source}: {table.at(row)} has no {what} field {column!r} (set {key});"
                f" its fields: {_listing(list(record))}"
            )
        parts = []
        for column in text_keys:
            part = record[column]
            if data_cfg.html_unescape:
                part = html.unescape(part)
            part = part.strip()
            if part:
                parts.append(part)
        if not parts:
            raise DataError(
                f"data file {source}: {table.at(row)} has an empty text in {_shown(text_keys, table)}:"
                " remove the row or fill in its text"
            )
        label = record[label_key].strip()
        if not label:
            raise DataError(
                f"data file {source}: {table.at(row)} has an empty label in {_shown([label_key], table)}:"
                " remove the row or fill in its label"
            )
        texts.append(separator.join(parts))
        raw_labels.append(label)

    column = int(label_key) if table.header is None else label_key
    labels, names = map_labels(
        raw_labels,
        data_cfg.labels,
        source=source,
        column=column,
        label_names=label_names,
        declared=table.class_names.get(label_key),
        min_classes=min_classes,
    )
    columns = {c: [record[k] for record in table.records] for c, k in kept.items()}
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
