"""Each kind of personal data is replaced by its placeholder; look-alikes that are not identifiers are kept."""

from __future__ import annotations

import pytest

from fedpriv.kernel.config import RedactionConfig, load_config
from fedpriv.kernel.errors import ConfigError
from fedpriv.privacy.redaction import PLACEHOLDERS, redactor_for


@pytest.fixture(scope="module")
def redactor():
    return redactor_for(RedactionConfig(enabled=True))  # every kind, locales us + uk (the defaults)


# (kind, sentence, the identifiers in it): every identifier must go, the rest of the sentence must stay
PLANTED = [
    ("email", "Please email the results to dr.priya.raman@northfield-clinic.org by Friday.",
     ["dr.priya.raman@northfield-clinic.org"]),
    ("phone", "You can reach the ward on 020 7946 0321 or on her mobile +44 7911 123456.",
     ["020 7946 0321", "+44 7911 123456"]),
    ("phone", "Call the US office at (415) 555-0198 before noon.", ["(415) 555-0198"]),
    ("url", "Full notes are at https://records.northfield-clinic.org/patient/8812 and www.northfield-clinic.org.",
     ["https://records.northfield-clinic.org/patient/8812", "www.northfield-clinic.org"]),
    ("ip_address", "Login attempts came from 203.0.113.77 and from 2001:db8:85a3::8a2e:370:7334.",
     ["203.0.113.77", "2001:db8:85a3::8a2e:370:7334"]),
    ("payment_card", "She paid with the card 4539 1488 0343 6467 on arrival.", ["4539 1488 0343 6467"]),
    ("bank_account", "Refund to IBAN GB82 WEST 1234 5698 7654 32 or DE89 3704 0044 0532 0130 00.",
     ["GB82 WEST 1234 5698 7654 32", "DE89 3704 0044 0532 0130 00"]),
    ("bank_account", "Use routing number 011000015 for the transfer.", ["011000015"]),
    ("national_id", "His social security number is 536-22-8921.", ["536-22-8921"]),
    ("national_id", "The SSN 536228921 is on file.", ["536228921"]),  # digits alone: found by the context word
    ("national_id", "National Insurance number AB 12 34 56 C and NHS number 943 476 5919 were on the form.",
     ["AB 12 34 56 C", "943 476 5919"]),
    ("date_of_birth", "The patient, born on 14 March 1979, was seen today; DOB: 03/14/1979.",
     ["14 March 1979", "03/14/1979"]),
    ("date_of_birth", "Date of birth: 1979-03-14.", ["1979-03-14"]),
    ("handle", "A post from @northfield_nurse about the clinic went viral.", ["@northfield_nurse"]),
    ("person", "Harriet Whitfield met Dr. Okafor and Mrs Elena Castellano; patient Pemberton waited.",
     ["Harriet Whitfield", "Okafor", "Elena Castellano", "Pemberton"]),
]  # fmt: skip

LOOK_ALIKES = [
    "SKU 4412-889-20 and order number 123456789 shipped in 2019 with firmware v2.14.1.",
    "The patient was admitted on 14/05/2023 and discharged in March 2024.",  # dates, but not of birth
    "Card number 4111 1111 1111 1112 was rejected: it fails the Luhn check.",
    "IBAN GB82 WEST 1234 5698 7654 33 failed its checksum.",
    "Reference 12-34-5678 costs $1,299.99 at 10:45 in room 101.",
    "May was mild. Grant funding rose. Bank Holiday Monday. The New York Times said so.",
    "Write to support (at) example dot com; the year 1979 was cold.",
]


@pytest.mark.parametrize(
    ("kind", "sentence", "identifiers"), PLANTED, ids=[f"{k}-{i}" for i, (k, *_) in enumerate(PLANTED)]
)
def test_planted_identifiers_are_replaced_by_their_placeholder(redactor, kind, sentence, identifiers):
    result = redactor.redact([sentence])
    (text,) = result.texts
    for identifier in identifiers:
        assert identifier not in text, text
    assert text.count(PLACEHOLDERS[kind]) == len(identifiers), text
    assert result.counts[kind] == len(identifiers)
    assert sum(result.counts.values()) == len(identifiers), result.counts  # nothing else in the sentence went
    # the words around the identifiers are kept
    kept = sentence
    for identifier in identifiers:
        kept = kept.replace(identifier, PLACEHOLDERS[kind], 1)
    assert text == kept


@pytest.mark.parametrize("sentence", LOOK_ALIKES)
def test_look_alikes_that_are_not_identifiers_are_kept(redactor, sentence):
    result = redactor.redact([sentence])
    assert result.texts == [sentence]
    assert sum(result.counts.values()) == 0


def test_only_the_configured_kinds_and_locales_apply():
    emails_only = redactor_for(RedactionConfig(enabled=True, kinds=["email"]))
    text = "Mail jo@example.org or call 020 7946 0321."
    assert emails_only.redact_one(text) == "Mail [EMAIL] or call 020 7946 0321."
    # a Spanish DNI (NIF with its check letter) is a national ID only where the Spanish locale is on
    dni = "DNI 12345678Z en el formulario."
    assert redactor_for(RedactionConfig(enabled=True, kinds=["national_id"])).redact_one(dni) == dni
    spanish = redactor_for(RedactionConfig(enabled=True, kinds=["national_id"], locales=["es"]))
    assert spanish.redact_one(dni) == "DNI [NATIONAL_ID] en el formulario."


def test_the_rule_set_is_named_versioned_and_digested(redactor):
    spec = redactor.spec
    assert spec["enabled"] is True and spec["rules"] == "fedpriv-pii" and spec["version"]
    assert spec["engine"].startswith("presidio-analyzer ")
    assert spec["kinds"] == list(RedactionConfig().kinds) and spec["locales"] == ["us", "uk"]
    other = redactor_for(RedactionConfig(enabled=True, locales=["us"]))
    assert other.digest != redactor.digest and len(redactor.digest) == 64
    assert redactor_for(RedactionConfig(enabled=False)) is None


def test_an_organisations_own_names_file_is_used_and_changes_the_digest(tmp_path):
    names = tmp_path / "staff.txt"
    names.write_text("# ward staff\nZebedee Quarshie\nNkemdirim\n", encoding="utf-8")
    own = redactor_for(RedactionConfig(enabled=True, kinds=["person"], extra_names=str(names)))
    assert (
        own.redact_one("Zebedee Quarshie handed over to Nkemdirim at six.")
        == "[PERSON] handed over to [PERSON] at six."
    )
    assert own.redact_one("Zebedee was seen; quarshie is lower case.") == "[PERSON] was seen; quarshie is lower case."
    census_only = redactor_for(RedactionConfig(enabled=True, kinds=["person"]))
    assert census_only.redact_one("Zebedee Quarshie handed over to Nkemdirim.") == (
        "Zebedee Quarshie handed over to Nkemdirim."
    )  # not in the census lists: only the organisation's own list knows them
    assert own.digest != census_only.digest
    assert redactor_for(RedactionConfig(enabled=True, kinds=["person"], extra_names=str(names))) is own  # cached
    names.write_text("# ward staff\nZebedee Quarshie\nNkemdirim\nOlamide\n", encoding="utf-8")
    edited = redactor_for(RedactionConfig(enabled=True, kinds=["person"], extra_names=str(names)))
    assert edited is not own and edited.digest != own.digest  # a process that lives on reads the edited file
    assert edited.redact_one("Olamide handed over.") == "[PERSON] handed over."


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found"),
        (b"", "no names in it"),
        (b"\xff\xfe\x00broken", "not UTF-8 text"),
        (b"Ann Lee\nroom 101\n", "staff.txt:2: expected a name"),
    ],
)
def test_a_bad_names_file_is_one_line_naming_it(tmp_path, content, expected):
    path = tmp_path / "staff.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        redactor_for(RedactionConfig(enabled=True, kinds=["person"], extra_names=str(path)))
    message = str(caught.value)
    assert message.startswith("redaction.extra_names: ") and expected in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("redaction.kinds=[emial]", "redaction.kinds: expected a non-empty list of distinct kinds from: email"),
        ("redaction.kinds=[]", "redaction.kinds: expected a non-empty list"),
        ("redaction.kinds=[email,email]", "redaction.kinds: expected a non-empty list of distinct"),
        ("redaction.locales=[fr]", "redaction.locales: expected a non-empty list of distinct locales from: us"),
        ("redaction.min_score=1.5", "redaction.min_score: expected a number in (0, 1]"),
        ("redaction.rules=my rules", "redaction.rules: expected a name of letters"),
        ("redaction.enabled=maybe", "redaction.enabled: expected true or false"),
        ("redaction.colour=red", "unknown key 'redaction.colour'"),
    ],
)
def test_bad_rule_configuration_is_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    assert expected in str(caught.value) and "\n" not in str(caught.value)


# A fresh interpreter as fedpriv-superexec is (warmed or not), then what its forked run process does: this
# project's modules forgotten and imported again (a run's code comes from its FAB), another rule set built, its
# first text redacted. Prints the pattern strings regex had to compile for it (not in regex's cache).
_CHILD = """
import json, sys
import regex
from fedpriv.privacy.redaction import warm_engine
if sys.argv[1] == "warm":
    assert warm_engine()
for name in [n for n in sys.modules if n.partition(".")[0] in ("privacy", "fedpriv")]:
    del sys.modules[name]
compiled, real = [], regex._main._compile
def spy(pattern, flags, ignore_unused, kwargs, cache_it):
    if not any(key[0] == pattern for key in list(regex._main._cache)):  # key: (pattern, type, flags, ...)
        compiled.append(str(pattern))
    return real(pattern, flags, ignore_unused, kwargs, cache_it)
regex._main._compile = spy
from fedpriv.kernel.config import RedactionConfig
from fedpriv.privacy.redaction import Redactor
Redactor(RedactionConfig(enabled=True, locales=["de", "us"])).redact(["Call Max Muster on +49 30 1234567 today."])
print(json.dumps(compiled))
"""


@pytest.mark.parametrize("state", ["warm", "cold"])
def test_after_warm_engine_a_forked_run_compiles_no_redaction_pattern_again(state):
    """What ``fedpriv-superexec`` warms before it forks; cold is the control (the patterns a node would compile)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CHILD, state], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    if state == "warm":
        assert compiled == []
    else:
        assert len(compiled) > 20
