"""What an organisation's data looks like before training: its class counts, rare labels, texts cut short.

A Dirichlet split's skew, a mistyped label (one more class, seen once) and a ``data.max_length`` that cuts
most texts are invisible in a run's numbers; the plan says them before any training. A simulation prints
every organisation's (simulations/runner.py) and keeps them in summary.json; a deployed node prints its own
once per data set and keeps them in its state folder (client/node.py): never sent.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RARE_LABEL_COUNT = 5  # a class seen fewer times than this in the whole data is named in a warning
TRUNCATION_WARN_SHARE = 0.10  # more texts than this cut at data.max_length: a warning
REPORT_FILE = "data-report.json"  # in a deployed node's state folder


@dataclass(frozen=True)
class Truncation:
    """How many of an organisation's texts tokenisation cuts at ``max_length`` tokens (special tokens included)."""

    texts: int
    truncated: int
    median_tokens: float  # the median text's length in tokens before the cut
    max_length: int

    @property
    def share(self) -> float:
        return self.truncated / self.texts if self.texts else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "share": round(self.share, 4)}

    def line(self, org: str) -> str:
        return (
            f"{org}: {self.share:.0%} of texts cut at data.max_length={self.max_length}"
            f" (median {self.median_tokens:g} tokens)"
        )


def token_lengths(texts: Sequence[str], tokenizer) -> list[int]:
    """Each text's length in tokens, special tokens included, without truncation."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer
        return [len(ids) for ids in tokenizer(list(texts), truncation=False, padding=False)["input_ids"]]
    backend.no_truncation()  # the wrapper sets truncation and padding again on its next call
    backend.no_padding()
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    return [len(encoding.ids) + specials for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]


def truncation(texts: Sequence[str], tokenizer, max_length: int) -> Truncation:
    lengths = token_lengths(texts, tokenizer)
    median = float(statistics.median(lengths)) if lengths else 0.0
    return Truncation(len(lengths), sum(n > max_length for n in lengths), median, max_length)


def truncation_lines(cuts: dict[str, Truncation]) -> list[str]:
    """One line of every organisation's share of texts cut, and a warning naming those above the threshold."""
    if not cuts:
        return []
    max_length = next(iter(cuts.values())).max_length
    shares = ", ".join(f"{org} {cut.share:.0%} (median {cut.median_tokens:g} tokens)" for org, cut in cuts.items())
    lines = [f"texts cut at data.max_length={max_length} (train + test): {shares}"]
    over = [f"{org} ({cut.share:.0%})" for org, cut in cuts.items() if cut.share > TRUNCATION_WARN_SHARE]
    if over:
        lines.append(
            f"warning: more than {TRUNCATION_WARN_SHARE:.0%} of the texts are cut at data.max_length={max_length} at"
            f" {', '.join(over)}: the model sees only their start; raise data.max_length (longer batches cost more"
            " time and memory)"
        )
    return lines


def class_table(label_names: Sequence[str], rows: Sequence[tuple[str, int, int, Sequence[int]]]) -> list[str]:
    """Lines of a table: organisation, train and test sizes, then each class's count (train + test), in the
    class order of the data; a last ``all`` row when there is more than one organisation."""
    rows = list(rows)
    if len(rows) > 1:
        totals = [sum(row[3][i] for row in rows) for i in range(len(label_names))]
        rows.append(("all", sum(r[1] for r in rows), sum(r[2] for r in rows), totals))
    header = ["org", "n_train", "n_test", *label_names]
    cells = [header] + [[org, str(n_train), str(n_test), *map(str, counts)] for org, n_train, n_test, counts in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        first = row[0].ljust(widths[0])
        lines.append("  " + "  ".join([first, *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]))
    return lines


def rare_label_warning(label_names: Sequence[str], totals: Sequence[int]) -> str | None:
    """A warning naming every class seen fewer than RARE_LABEL_COUNT times in the whole data; None if none."""
    rare = [f"'{name}' ({n})" for name, n in zip(label_names, totals, strict=True) if n < RARE_LABEL_COUNT]
    if not rare:
        return None
    return (
        f"warning: class(es) seen fewer than {RARE_LABEL_COUNT} times in the whole data: {', '.join(rare)}"
        " (a mistyped label? map it with data.labels.map, or fix the data)"
    )


def counts_by_class(labels: Sequence[int], num_labels: int) -> list[int]:
    counts = [0] * num_labels
    for label in labels:
        counts[int(label)] += 1
    return counts


def keep_own_report(
    folder: Path,
    org: str,
    label_names: Sequence[str],
    splits: dict[str, tuple[Sequence[str], Sequence[int]]],
    tokenizer,
    max_length: int,
    sources: Sequence[tuple[str, Any]],
    say: Callable[[str], None],
) -> dict | None:
    """A deployed node's own data report (``splits``: name -> (texts, labels)), in its state folder, said once.

    Every message is a new process that loads the data again: the report is made, written and said only when
    the data files (``sources``, with their stamps), the classes or ``max_length`` changed since the last one.
    Never sent: the class counts and the truncation are the organisation's to read. Returns the new report,
    or None when the stored one still holds.
    """
    path = Path(folder) / REPORT_FILE
    key = json.loads(json.dumps({"sources": list(sources), "labels": list(label_names), "max_length": max_length}))
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("key") == key:
            return None
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: made again
    k = len(label_names)
    texts = [text for split_texts, _ in splits.values() for text in split_texts]
    counts = counts_by_class([label for _, labels in splits.values() for label in labels], k)
    sizes = {name: len(labels) for name, (_, labels) in splits.items()}
    cut = truncation(texts, tokenizer, max_length)
    report = {
        "key": key,
        "org": org,
        "sizes": sizes,
        "class_counts": dict(zip(label_names, counts, strict=True)),
        "truncation": cut.to_dict(),
        "note": "kept by the node; never sent",
    }
    lines = [f"data of {org} ({', '.join(f'{n} {name}' for name, n in sizes.items())}), class counts:"]
    lines += class_table(label_names, [(org, sizes.get("train", 0), sizes.get("test", 0), counts)])
    lines += [line for line in [rare_label_warning(label_names, counts)] if line]
    lines += truncation_lines({org: cut})
    for line in lines:
        say(line)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    return report
