"""Person names found offline from name lists (wrapped as a Presidio recognizer in ``privacy/redaction.py``).

Presidio finds names with a statistical NER model, and none of spaCy's
trained pipelines installs from PyPI (they come from GitHub releases), so a
node that must work offline uses lists instead: the US Census's first names
and surnames (public domain, shipped by the ``names`` package) plus the
organisation's own list (``redaction.extra_names``). A capitalised word run
is a name when it is

- a known first name followed by up to two capitalised words, the last a
  known surname ("John Smith", "Mary Ann Jones");
- a title and the capitalised words after it ("Dr. Okafor", "Mrs Elena Petrova");
- a known name right after a word that introduces one ("named Ruth", "patient Hale");
- a name or name part from the organisation's own list, even alone ("Zebedee was seen").

A known first name alone ("Will", "May", "Grant") is kept: most such words
are not names. What this misses (lower-case names, unlisted first names
without a title) is said in the README.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from pathlib import Path

from fedpriv.kernel.errors import ConfigError

TITLES = frozenset("mr mrs ms miss mx dr prof professor sir dame rev reverend".split())
# lower-case words after which a known name (first or surname) is a name by itself
INTRODUCERS = frozenset(
    "named called dear hi hello patient client pupil student customer nurse doctor son daughter wife husband mother"
    " father brother sister".split()
)
_WORD = r"[A-Z][a-z]+(?:['\u2019-][A-Z]?[a-z]+)*"
# one word of a name: a capitalised word, an initial ("F.") or a title with its dot ("Dr."); a sentence's full stop
# after any other word ends the run
_TOKEN = re.compile(rf"(?:Mrs|Mr|Ms|Mx|Dr|Prof|Rev)\.|[A-Z]\.|{_WORD}")
_RUN = re.compile(rf"\b(?:{_TOKEN.pattern})(?:[ \t]+(?:{_TOKEN.pattern}))*")
_BEFORE = re.compile(r"([A-Za-z]+)[\s,:]*$")
CENSUS_FILES = ("dist.male.first", "dist.female.first", "dist.all.last")


@functools.cache
def _census_texts() -> tuple[str, ...]:
    try:
        package = resources.files("names")
        return tuple(package.joinpath(name).read_text(encoding="ascii") for name in CENSUS_FILES)
    except (ModuleNotFoundError, OSError) as exc:
        raise ConfigError(
            f"redaction: person names need the US Census name lists of the 'names' package ({exc.__class__.__name__}):"
            " pip install names"
        ) from None


def census_digest() -> str:
    """SHA-256 of the US Census lists (the rule set's identity; cheaper than parsing them)."""
    return hashlib.sha256("\n".join(_census_texts()).encode()).hexdigest()


@functools.cache
def census_names() -> tuple[frozenset[str], frozenset[str], str]:
    """(first names, surnames, digest) from the US Census 1990 lists in the ``names`` package."""
    texts = _census_texts()
    lists = [frozenset(line.split()[0].title() for line in text.splitlines() if line.strip()) for text in texts]
    return lists[0] | lists[1], lists[2], census_digest()


def read_extra_names(path: str) -> tuple[frozenset[str], frozenset[tuple[str, ...]], str]:
    """An organisation's own names file: (every name word, full names, digest); one clear line when bad."""
    shown = repr(path) if not str(path).isprintable() else path
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"redaction.extra_names: {shown}: not found") from None
    except OSError as exc:
        raise ConfigError(f"redaction.extra_names: {shown}: cannot be read ({exc.__class__.__name__})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"redaction.extra_names: {shown}: not UTF-8 text (byte {exc.start}); expected one name per line"
        ) from None
    words_seen, full = set(), set()
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or line.lstrip().startswith("#"):
            continue
        if any(not re.fullmatch(r"[^\W\d_]+(?:['\u2019.-][^\W\d_]*)*", word) for word in words):
            raise ConfigError(
                f"redaction.extra_names: {shown}:{number}: expected a name (letters, ' . -), got {line.strip()[:60]!r}"
            )
        words = [word.title() for word in words]
        words_seen.update(words)
        if len(words) > 1:
            full.add(tuple(words))
    if not words_seen:
        raise ConfigError(f"redaction.extra_names: {shown}: no names in it; expected one name per line")
    return frozenset(words_seen), frozenset(full), hashlib.sha256(raw).hexdigest()


class NameFinder:
    """Names in a text from first-name and surname lists (see the module docstring); no NLP model."""

    def __init__(
        self,
        first: frozenset[str],
        last: frozenset[str],
        own: frozenset[str] = frozenset(),
        full: frozenset[tuple[str, ...]] = frozenset(),
    ):
        self.own, self.full = own, full
        self.first, self.last = first | own, last | own

    def find(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of the names in ``text``."""
        results = []
        for run in _RUN.finditer(text):
            tokens = [
                (m.group(0), run.start() + m.start(), run.start() + m.end()) for m in _TOKEN.finditer(run.group())
            ]
            before = _BEFORE.search(text, max(0, run.start() - 64), run.start())  # the word before the run
            for first, last in self._spans([word for word, _, _ in tokens], before.group(1) if before else ""):
                results.append((tokens[first][1], tokens[last][2]))
        return results

    def _spans(self, words: list[str], word_before: str) -> list[tuple[int, int]]:
        spans, index = [], 0
        while index < len(words):
            previous = words[index - 1] if index else word_before
            end = self._name_at(words, index, previous.rstrip(".").lower())
            if end is None:
                index += 1
                continue
            spans.append((index, end))
            index = end + 1
        return spans

    def _name_at(self, words: list[str], index: int, previous: str) -> int | None:
        """The index of the last word of a name that starts at ``words[index]``, or None."""
        for size in (4, 3, 2):  # the organisation's own full names first, longest first
            if index + size <= len(words) and tuple(words[index : index + size]) in self.full:
                return index + size - 1
        word = words[index].rstrip(".")
        if previous in TITLES:  # "Dr. Okafor", "Mrs Elena Petrova": the title itself stays
            last = index
            for i in range(index + 1, min(index + 3, len(words))):
                if words[i].lower() in TITLES:
                    break
                last = i
            return last
        if word in self.first:  # "John Smith", "Mary Ann Jones", "John F. Kennedy"
            last = None
            for i in range(index + 1, min(index + 4, len(words))):
                if words[i] in self.last and len(words[i]) > 2:
                    last = i
                elif not (words[i].endswith(".") or words[i] in self.first):
                    break
            if last is not None:
                return last
        if word in self.own or (previous in INTRODUCERS and (word in self.first or word in self.last)):
            return index  # the organisation's own names alone; "named Ruth", "patient Hale"
        return None
