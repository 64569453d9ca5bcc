"""Redact personal data from an organisation's text before it is tokenised.

Built on Presidio's analyzer (its pattern recognizers with their checksum
validation: Luhn for payment cards, mod-97 for IBANs, the NHS and national ID
check digits, Google's ``phonenumbers`` for phone numbers, its context
words), over plain words instead of a spaCy model, so that nothing needs a
download. What Presidio lacks
offline is added as Presidio recognizers: person names from name lists
(``privacy/person_names.py``), dates of birth (a date with birth context) and
@handles. Each match becomes its kind's placeholder (``[EMAIL]``), so the
model still sees that something was there.

``Redactor.spec`` is the rule set as recorded (ledger, summary, exported
model): its name, this module's rule version, the engine's version, the kinds
and locales, and a digest over all of it and the name lists. Change any rule
here and bump ``RULES_VERSION``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from importlib import metadata

from fedpriv.kernel.config import RedactionConfig
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.file_stamps import file_stamp

RULES_VERSION = "1"
PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "url": "[URL]",
    "ip_address": "[IP_ADDRESS]",
    "payment_card": "[CARD_NUMBER]",
    "bank_account": "[BANK_ACCOUNT]",
    "national_id": "[NATIONAL_ID]",
    "date_of_birth": "[DATE_OF_BIRTH]",
    "handle": "[HANDLE]",
    "person": "[PERSON]",
}
# Presidio recognizer class names per kind and locale (kinds that hold for every locale under "*")
NATIONAL_IDS = {
    "us": ("UsSsnRecognizer", "UsItinRecognizer", "UsMbiRecognizer"),
    "uk": ("NhsRecognizer", "UkNinoRecognizer"),
    "ca": ("CaSinRecognizer",),
    "au": ("AuTfnRecognizer", "AuMedicareRecognizer"),
    "in": ("InAadhaarRecognizer", "InPanRecognizer"),
    "es": ("EsNifRecognizer", "EsNieRecognizer"),
    "it": ("ItFiscalCodeRecognizer",),
    "pl": ("PlPeselRecognizer",),
    "sg": ("SgFinRecognizer",),
    "fi": ("FiPersonalIdentityCodeRecognizer",),
    "se": ("SePersonnummerRecognizer",),
    "de": ("DeTaxIdRecognizer", "DeSocialSecurityRecognizer"),
    "za": ("ZaIdNumberRecognizer",),
}
BANK_ACCOUNTS = {"us": ("AbaRoutingRecognizer",)}  # IBANs (checksummed) for every locale
PHONE_REGIONS = {
    "us": "US", "uk": "GB", "ca": "CA", "au": "AU", "in": "IN", "es": "ES", "it": "IT", "pl": "PL", "sg": "SG",
    "fi": "FI", "se": "SE", "de": "DE", "za": "ZA",
}  # fmt: skip
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
    r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_DAY = r"(?:[12][0-9]|3[01]|0?[1-9])(?:st|nd|rd|th)?"
# birth context within a few words before the date ("born on", "DOB:", "date of birth", "birthday")
_BIRTH_CONTEXT = re.compile(r"\b(?:born|birth|birthday|dob|d\.o\.b)\b[^.\n]{0,24}$", re.IGNORECASE)
_URL_NEEDS = re.compile(r"[A-Za-z0-9.\-]\.[A-Za-z]")  # what every Presidio URL pattern contains
_HANDLE = r"(?<![\w@./])@[A-Za-z0-9_](?:[A-Za-z0-9_.]{0,28}[A-Za-z0-9_])?(?![\w@])"


class RedactionError(ConfigError):
    """A redaction rule set that cannot be built (bad configuration or a missing package)."""


@dataclass
class RedactedTexts:
    texts: list[str]
    counts: dict[str, int]  # matches replaced, per kind (every kind of the rule set, zeros included)


def _presidio():
    try:
        import presidio_analyzer
        import spacy
    except ImportError as exc:
        raise RedactionError(
            f"redaction: needs presidio-analyzer and spaCy ({exc.name} is missing): pip install presidio-analyzer"
        ) from None
    return presidio_analyzer, spacy


@functools.cache
def _offline_tld_extractor():
    import tldextract

    # the public suffix list snapshot that ships with tldextract: no download, no cache folder
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def _recognizers(cfg: RedactionConfig, person_finder) -> list:
    _presidio()  # one clear line when it is not installed
    from presidio_analyzer import Pattern, PatternRecognizer, RecognizerResult
    from presidio_analyzer import predefined_recognizers as known

    class OfflineEmailRecognizer(known.EmailRecognizer):
        """Presidio's email recognizer, its domain check run on the bundled public suffix list."""

        def validate_result(self, pattern_text: str):
            return _offline_tld_extractor()(pattern_text).fqdn != ""

    class DateOfBirthRecognizer(known.DateRecognizer):
        """Presidio's date formats (and written months), kept only after birth context: a year alone is kept."""

        WRITTEN = [
            Pattern("day month year", rf"\b{_DAY}\s+(?:of\s+)?{_MONTH},?\s+(?:19|20)\d\d\b", 0.6),
            Pattern("month day, year", rf"\b{_MONTH}\s+{_DAY},?\s+(?:19|20)\d\d\b", 0.6),
        ]

        def __init__(self):
            super().__init__(
                patterns=list(known.DateRecognizer.PATTERNS) + self.WRITTEN,
                supported_entity="DATE_OF_BIRTH",
                name="DateOfBirthRecognizer",
            )

        def analyze(self, text, entities, nlp_artifacts=None, regex_flags=None):
            found = super().analyze(text, entities, nlp_artifacts, regex_flags)
            return [
                RecognizerResult(r.entity_type, r.start, r.end, max(r.score, 0.6), r.analysis_explanation)
                for r in found
                if _BIRTH_CONTEXT.search(text, max(0, r.start - 40), r.start)
            ]

    class PrefilteredUrlRecognizer(known.UrlRecognizer):
        """Presidio's URL patterns (a long list of TLDs), run only on text with a dot followed by a letter.

        Every one of its patterns needs "<host character>.<tld>"; most sentences have none, and the
        patterns were the slowest part of redaction.
        """

        def analyze(self, text, entities, nlp_artifacts=None, regex_flags=None):
            if _URL_NEEDS.search(text) is None:
                return []
            return super().analyze(text, entities, nlp_artifacts, regex_flags)

    def make(name: str, **kwargs):
        return getattr(known, name)(supported_language="en", **kwargs)

    kinds, locales = set(cfg.kinds), list(cfg.locales)
    out = []
    if "email" in kinds:
        out.append(OfflineEmailRecognizer())
    if "phone" in kinds:
        out.append(known.PhoneRecognizer(supported_regions=[PHONE_REGIONS[loc] for loc in locales]))
    if "url" in kinds:
        out.append(PrefilteredUrlRecognizer(supported_language="en"))
    if "ip_address" in kinds:
        out.append(make("IpRecognizer"))
    if "payment_card" in kinds:
        out.append(make("CreditCardRecognizer"))
    if "bank_account" in kinds:
        out.append(make("IbanRecognizer"))
        out += [make(name) for loc in locales for name in BANK_ACCOUNTS.get(loc, ())]
    if "national_id" in kinds:
        out += [make(name) for loc in locales for name in NATIONAL_IDS[loc]]
    if "date_of_birth" in kinds:
        out.append(DateOfBirthRecognizer())
    if "handle" in kinds:
        out.append(PatternRecognizer("HANDLE", name="HandleRecognizer", patterns=[Pattern("handle", _HANDLE, 0.6)]))
    if "person" in kinds:
        from presidio_analyzer import EntityRecognizer

        class NameListRecognizer(EntityRecognizer):
            """PERSON from name lists (``privacy/person_names.py``): what spaCy's NER would find, offline."""

            def __init__(self, finder):
                self.finder = finder
                super().__init__(supported_entities=["PERSON"], supported_language="en", name="NameListRecognizer")

            def load(self) -> None:  # the lists are given
                pass

            def analyze(self, text, entities, nlp_artifacts=None):
                return [RecognizerResult("PERSON", start, end, 0.85) for start, end in self.finder.find(text)]

        out.append(NameListRecognizer(person_finder))
    return out


def _kind_of(entity: str) -> str:
    """The configured kind a Presidio entity type belongs to."""
    fixed = {
        "EMAIL_ADDRESS": "email",
        "PHONE_NUMBER": "phone",
        "URL": "url",
        "IP_ADDRESS": "ip_address",
        "CREDIT_CARD": "payment_card",
        "IBAN_CODE": "bank_account",
        "ABA_ROUTING_NUMBER": "bank_account",
        "DATE_OF_BIRTH": "date_of_birth",
        "HANDLE": "handle",
        "PERSON": "person",
    }
    return fixed.get(entity, "national_id")


class Redactor:
    """One organisation's redaction rules; ``redact`` a list of texts.

    The rule set's identity (``spec``, ``digest``) is known without building
    the analyzer: a node whose redacted tokens are cached never imports
    Presidio or spaCy (each message of a deployment node is a new process).
    """

    def __init__(self, cfg: RedactionConfig):
        if not cfg.enabled:
            raise ValueError("Redactor for a disabled redaction config")
        self.cfg = cfg
        try:
            engine = f"presidio-analyzer {metadata.version('presidio-analyzer')}"
        except metadata.PackageNotFoundError:
            raise RedactionError("redaction: needs presidio-analyzer: pip install presidio-analyzer") from None
        # the organisation's own names (read now: a bad file is one line before anything runs); the census lists
        # are only hashed here and parsed when the analyzer is built
        self.own_names: tuple[frozenset[str], frozenset[tuple[str, ...]]] = (frozenset(), frozenset())
        name_digests = []
        if "person" in cfg.kinds:
            from fedpriv.privacy.person_names import census_digest, read_extra_names

            name_digests.append(census_digest())
            if cfg.extra_names:
                own, full, extra_digest = read_extra_names(cfg.extra_names)
                self.own_names = (own, full)
                name_digests.append(extra_digest)
        rule_set = {
            "rules": cfg.rules,
            "version": RULES_VERSION,
            "engine": engine,
            "kinds": list(cfg.kinds),
            "locales": list(cfg.locales),
            "min_score": cfg.min_score,
        }
        # the digest covers the name lists' contents; the spec says only whether the organisation's own was used
        identity = json.dumps({**rule_set, "name_lists": name_digests}, sort_keys=True)
        self.digest = hashlib.sha256(identity.encode()).hexdigest()
        self.spec = {"enabled": True, **rule_set, "extra_names": bool(cfg.extra_names), "digest": self.digest}

    @functools.cached_property
    def analyzer(self):
        """Presidio's analyzer with this rule set's recognizers over plain words (built on first use)."""
        presidio, _ = _presidio()
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
        registry = presidio.RecognizerRegistry(supported_languages=["en"])
        person_finder = None
        if "person" in self.cfg.kinds:
            from fedpriv.privacy.person_names import NameFinder, census_names

            first, last, _ = census_names()
            person_finder = NameFinder(first, last, *self.own_names)
        for recognizer in _recognizers(self.cfg, person_finder):
            registry.add_recognizer(recognizer)
        self.entities = sorted({e for r in registry.recognizers for e in r.supported_entities})
        return presidio.AnalyzerEngine(registry=registry, nlp_engine=_words_engine(), supported_languages=["en"])

    def redact_one(self, text: str, counts: Counter | None = None) -> str:
        analyzer = self.analyzer
        found = analyzer.analyze(text, language="en", entities=self.entities, score_threshold=self.cfg.min_score)
        # overlapping matches: the most confident, then the longest, wins ("jane@x.org" is an email, not a URL)
        chosen: list = []
        for result in sorted(found, key=lambda r: (-r.score, -(r.end - r.start), r.start)):
            if all(result.end <= kept.start or result.start >= kept.end for kept in chosen):
                chosen.append(result)
        for result in sorted(chosen, key=lambda r: r.start, reverse=True):
            kind = _kind_of(result.entity_type)
            text = text[: result.start] + PLACEHOLDERS[kind] + text[result.end :]
            if counts is not None:
                counts[kind] += 1
        return text

    def redact(self, texts: list[str]) -> RedactedTexts:
        counts: Counter = Counter({kind: 0 for kind in self.cfg.kinds})
        redacted = [self.redact_one(text, counts) for text in texts]
        return RedactedTexts(redacted, {kind: int(counts[kind]) for kind in self.cfg.kinds})


_WORDS = re.compile(r"\w+|[^\w\s]")


def _words_engine():
    """Presidio's NLP engine interface over plain words: no model, no spaCy pipeline run per text.

    Pattern recognizers need no NLP; Presidio's context enhancer needs words,
    their offsets and lemmas (here the lower-cased words: "SSN", "phone",
    "born" match as written). A spaCy pipeline would cost half the redaction
    time for nothing else.
    """
    from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngine
    from spacy.lang.en.stop_words import STOP_WORDS

    class WordsNlpEngine(NlpEngine):
        def load(self) -> None:
            pass

        def is_loaded(self) -> bool:
            return True

        def process_text(self, text: str, language: str) -> NlpArtifacts:
            words = [(m.group(0), m.start()) for m in _WORDS.finditer(text)]
            return NlpArtifacts(
                entities=[],
                tokens=[word for word, _ in words],
                tokens_indices=[start for _, start in words],
                lemmas=[word.lower() for word, _ in words],
                nlp_engine=self,
                language=language,
            )

        def process_batch(self, texts, language, batch_size=1, n_process=1, **kwargs):
            for text in texts:
                yield text, self.process_text(text, language)

        def is_stopword(self, word: str, language: str) -> bool:
            return word.lower() in STOP_WORDS

        def is_punct(self, word: str, language: str) -> bool:
            return not any(char.isalnum() for char in word)

        def get_supported_entities(self) -> list[str]:
            return []

        def get_supported_languages(self) -> list[str]:
            return ["en"]

    return WordsNlpEngine()


DISABLED_SPEC = {"enabled": False}
# one sentence with something for most kinds: running it compiles the recognizers' patterns
WARM_UP_TEXT = (
    "Jane Smith (jane@example.org, +1 415 555 0100, @jane_s, 192.168.0.1) was born on 3 May 1990;"
    " card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, https://example.org"
)


def warm_engine() -> bool:
    """Build every kind and locale of the packaged rule set and run it on one sentence; False without Presidio.

    Why: a Redactor's first text costs seconds of CPU (Presidio's imports, ~250 patterns compiled by
    ``regex``), paid by every node in its first round. Those imports and compiled patterns live in
    third-party modules, so a process forked after this call (``fedpriv-superexec``'s run and message
    processes) starts with them, even though it builds its own Redactor from its run's code (which parses
    the census name lists again: they live in this project's modules). Pure Python: no thread, no torch.
    """
    from fedpriv.kernel.config import REDACTION_LOCALES

    try:
        Redactor(RedactionConfig(enabled=True, locales=list(REDACTION_LOCALES))).redact([WARM_UP_TEXT])
    except RedactionError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _redactor_for(cfg_json: str, names_stamp: tuple | None) -> Redactor:
    del names_stamp  # part of the cache key only
    return Redactor(RedactionConfig(**json.loads(cfg_json)))


def redactor_for(cfg: RedactionConfig) -> Redactor | None:
    """The (per-process cached) redactor for ``cfg``, None when redaction is off; built again when the
    organisation's names file changed."""
    if not cfg.enabled:
        return None
    from dataclasses import asdict

    return _redactor_for(json.dumps(asdict(cfg), sort_keys=True), file_stamp(cfg.extra_names))
