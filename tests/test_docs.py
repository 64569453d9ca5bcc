"""The docs name only things that exist: commands, flags, config keys, make targets, repository paths, links.

README.md, BENCHMARKS.md and docs/*.md are read as a newcomer would copy from them. In their code (fenced
blocks and `inline spans`):
- ``fedpriv SUBCOMMAND ... --flag``: the subcommands and flags of the real parser (fedpriv/cli.py);
- ``section.key=value`` overrides: keys of the run config, as ``load_config`` with the packaged default sees
  them (an unknown key raises ConfigError); an inline span that is only a dotted key (``privacy.delta`` or
  ``privacy.delta: 1e-5``) may also be a key of an organisation's node.yaml;
- ```` ```yaml ```` blocks: every key, against the run config, or against node.yaml where the block's first line
  is a comment naming node.yaml (a block naming FEDERATION.yaml is left to the provisioning tests);
- ``make TARGET``: a target of the Makefile;
- paths under the repository's top-level folders (``client/...``, ``fedpriv/...``, ``docs/...``): they exist.
Relative markdown links, and their #anchors, must resolve. docs/configuration.md must list every run-config key.
No fedpriv process is started: everything is checked in-process.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedpriv.cli import _parser
from fedpriv.kernel.config import config_from_dict, default_config_text, load_config
from fedpriv.kernel.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PATH_ROOTS = ("client", "server", "privacy", "shared_models", "simulations", "fedpriv", "docs", "benchmarks", "tests")
FILE_SUFFIXES = {"lock", "json", "jsonl", "yaml", "csv", "png", "md", "txt", "py", "key", "pub", "crt", "db", "toml"}
SHELL = {"", "bash", "sh", "shell", "console", "text"}


def documents() -> list[Path]:
    """What a newcomer reads (the benchmark journal is history, kept verbatim, so it is not checked)."""
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Snippets:
    """A markdown text cut into what the checks read."""

    blocks: list[tuple[str, str]] = field(default_factory=list)  # (language, body) of each fenced block
    spans: list[str] = field(default_factory=list)  # inline code, whitespace made single spaces
    prose: str = ""  # the text outside fenced blocks
    headings: list[str] = field(default_factory=list)


def split_markdown(text: str) -> Snippets:
    out = Snippets()
    prose: list[str] = []
    fence: str | None = None
    lang, body = "", []
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, lang, body = "```", stripped[3:].strip().lower(), []
        elif fence is not None and stripped.startswith(fence):
            out.blocks.append((lang, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
            if line.startswith("#"):
                out.headings.append(line.lstrip("#").strip())
    out.prose = "\n".join(prose)
    out.spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", out.prose)]
    return out


def code_lines(snippets: Snippets) -> list[str]:
    """Shell lines of the fenced blocks (continuations joined) and every inline span: where commands are."""
    lines = list(snippets.spans)
    for lang, body in snippets.blocks:
        if lang in SHELL:
            lines += body.replace("\\\n", " ").splitlines()
    return lines


# --------------------------------------------------------------------------- commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_problems(line: str, parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    for match in re.finditer(r"(?<![\w.\-=,])fedpriv[ \t]+([^#|;&>`]*)", line):
        tokens = match.group(1).split()
        current, words, i = parser, ["fedpriv"], 0
        while (choices := _subcommands(current)) and i < len(tokens) and not tokens[i].startswith("-"):
            word = tokens[i].rstrip(":,.;)")
            if word not in choices:
                problems.append(f"`{' '.join(words)} {word}`: no such subcommand (known: {', '.join(choices)})")
                break
            current, i = choices[word], i + 1
            words.append(word)
        else:
            for token in tokens[i:]:
                flag = token.strip("\"'[]").split("=", 1)[0]
                if flag.startswith("-") and flag != "-" and flag not in current._option_string_actions:
                    problems.append(f"`{' '.join(words)}`: no option {flag}")
    return problems


# --------------------------------------------------------------------------- config keys


def _load_node_config():
    try:
        from fedpriv.kernel.config import load_node_config
    except ImportError:  # the node schema may live in a module of its own
        from fedpriv.kernel.node_config import load_node_config
    return load_node_config


@functools.cache
def _packaged_default() -> str:
    return yaml.safe_load(default_config_text())


def _nested(key: str) -> dict:
    """``a.b.c`` as ``{a: {b: {c: None}}}``, the way ``parse_overrides`` nests an override."""
    node: dict = {}
    leaf = node
    parts = key.split(".")
    for part in parts[:-1]:
        leaf = leaf.setdefault(part, {})
    leaf[parts[-1]] = None
    return node


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for name, value in extra.items():
        out[name] = _merged(out[name], value) if isinstance(value, dict) and isinstance(out.get(name), dict) else value
    return out


@functools.cache
def unknown_run_key(key: str) -> bool:
    """Whether the run config refuses ``key`` as unknown: what ``load_config(overrides=[f"{key}=null"])`` does,
    the packaged default parsed once."""
    try:
        config_from_dict(_merged(copy.deepcopy(_packaged_default()), _nested(key)))
    except UserError as exc:
        return "unknown key" in str(exc)
    return False


@functools.cache
def unknown_node_key(key: str) -> bool:
    """Whether an organisation's node.yaml refuses ``key`` as unknown (other complaints do not matter here)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "node.yaml"
        path.write_text(yaml.safe_dump(_nested(key)), encoding="utf-8")
        try:
            _load_node_config()(path)
        except UserError as exc:
            return "unknown key" in str(exc)
    return False


def leaf_keys(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            keys += leaf_keys(value, key + ".")
        else:
            keys.append(key)
    return keys


def config_key_problems(snippets: Snippets) -> list[str]:
    problems = []
    sections = {f.name for f in dataclasses.fields(type(load_config()))} | {"state_dir", "approved_apps"}
    for line in code_lines(snippets):
        for key in re.findall(r"(?<![\w./\-$])([a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_\-]+)+)=", line):
            if unknown_run_key(key):
                problems.append(f"override `{key}=`: no such key in the run config")
    for span in snippets.spans:
        match = re.fullmatch(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?:\s*:\s.*)?", span)
        key = match.group(1) if match else ""
        if match and key.split(".")[0] in sections and key.rsplit(".", 1)[1] not in FILE_SUFFIXES:
            if unknown_run_key(key) and unknown_node_key(key):
                problems.append(f"`{key}`: no such key in the run config or node.yaml")
    for lang, body in snippets.blocks:
        if lang not in ("yaml", "yml"):
            continue
        first = body.lstrip().splitlines()[0] if body.strip() else ""
        if first.startswith("#") and "FEDERATION.yaml" in first:
            continue
        as_node = first.startswith("#") and "node.yaml" in first
        try:
            data = yaml.safe_load(body) or {}
        except yaml.YAMLError as exc:
            problems.append(f"a yaml block is not valid YAML ({exc.__class__.__name__}): {first!r}")
            continue
        if not isinstance(data, dict):
            problems.append(f"a yaml block is not a mapping: {first!r}")
            continue
        for key in leaf_keys(data):
            if as_node and unknown_node_key(key):
                problems.append(f"node.yaml block: `{key}` is no key of node.yaml")
            elif not as_node and unknown_run_key(key):
                problems.append(f"yaml block: `{key}` is no key of the run config")
    return problems


# --------------------------------------------------------------------------- make targets, paths, links


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_][\w.\-]*)\s*:(?!=)", text, flags=re.M))


def make_problems(snippets: Snippets, targets: set[str]) -> list[str]:
    problems = []
    for line in code_lines(snippets):
        for target in re.findall(r"(?<![\w./\-])make[ \t]+([a-z][\w\-]*)", line):
            if target not in targets:
                problems.append(f"`make {target}`: no such target in the Makefile")
    return problems


def path_problems(snippets: Snippets, root: Path) -> list[str]:
    texts = list(snippets.spans) + [body for _, body in snippets.blocks]
    pattern = rf"(?<![\w./~$\-])((?:{'|'.join(PATH_ROOTS)})/[\w./\-]*)"
    problems = []
    for text in texts:
        for path in re.findall(pattern, text):
            path = path.rstrip("./")
            if not (root / path).exists():
                problems.append(f"`{path}`: no such file or folder in the repository")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in split_markdown(path.read_text(encoding="utf-8")).headings:
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(snippets: Snippets, here: Path) -> list[str]:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", snippets.prose):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (here.parent / file).resolve() if file else here
        if not path.exists():
            problems.append(f"link ({target}): {file} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"link ({target}): no heading #{anchor} in {path.name}")
    return problems


def problems_in(text: str, here: Path) -> list[str]:
    snippets = split_markdown(text)
    parser = _parser()
    found = [p for line in code_lines(snippets) for p in command_problems(line, parser)]
    found += config_key_problems(snippets)
    found += make_problems(snippets, make_targets())
    found += path_problems(snippets, ROOT)
    found += link_problems(snippets, here)
    return list(dict.fromkeys(found))


def run_config_keys() -> list[str]:
    def walk(cls, prefix: str) -> list[str]:
        hints, keys = typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            keys += walk(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]
        return keys

    return walk(type(load_config()), "")


# --------------------------------------------------------------------------- tests


def test_the_docs_name_only_commands_keys_targets_paths_and_links_that_exist():
    problems = []
    for doc in documents():
        problems += [f"{doc.relative_to(ROOT)}: {p}" for p in problems_in(doc.read_text("utf-8"), doc)]
    assert not problems, "\n".join(problems)


def test_the_configuration_page_lists_every_run_config_key():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [key for key in run_config_keys() if f"`{key}`" not in page]
    assert not missing, f"docs/configuration.md's key table lacks: {', '.join(missing)}"


SYNTHETIC = """# A page

Run `fedpriv simulate --dry-run training.rounds=2` or `fedpriv federation up F.yaml --kits k/ --rounds 2`;
`privacy.allow_non_private: true` is a node.yaml key, `privacy.delta` a run-config key.

```bash
make demo
fedpriv audit runs/X --keys org-keys/ --strict \\
  --no-pld
fedpriv simulate model.name=tiny "data.labels.map={'0': negative}"
```

```yaml
training:
  rounds: 2
privacy:
  orgs: {hospital-a: {target_epsilon: 3}}
```

```yaml
# node.yaml of org-a
org: org-a
approved_apps: []
privacy: {allow_non_private: true}
```

See `client/disclosures.py`, `docs/threat-model.md` and [the threat model](threat-model.md#what-leaves-a-node-and-whether-dp-covers-it).
"""


def test_the_checker_finds_nothing_in_a_page_of_real_names():
    here = ROOT / "docs" / "synthetic.md"
    assert problems_in(SYNTHETIC, here) == []


def test_the_checker_names_every_made_up_command_flag_key_target_path_and_link():
    bad = """# A page

`fedpriv simulate --fast` and `fedpriv launch` and `fedpriv org adopt KIT`.

```bash
fedpriv simulate training.roundz=3
make deploy
```

`privacy.epsilon_max` is no key anywhere.

```yaml
training:
  rounds: 2
  warmup: 3
```

```yaml
# node.yaml of org-a
privacy: {budget: 3}
```

See `client/nowhere.py` and [a page](missing.md) and [a heading](threat-model.md#no-such-heading).
"""
    found = problems_in(bad, ROOT / "docs" / "synthetic.md")
    expected = [
        "`fedpriv simulate`: no option --fast",
        "`fedpriv launch`: no such subcommand",
        "`fedpriv org adopt`: no such subcommand",
        "override `training.roundz=`: no such key in the run config",
        "`make deploy`: no such target in the Makefile",
        "`privacy.epsilon_max`: no such key in the run config or node.yaml",
        "yaml block: `training.warmup` is no key of the run config",
        "node.yaml block: `privacy.budget` is no key of node.yaml",
        "`client/nowhere.py`: no such file or folder in the repository",
        "link (missing.md): missing.md does not exist",
        "link (threat-model.md#no-such-heading): no heading #no-such-heading in threat-model.md",
    ]
    for line in expected:
        assert any(problem.startswith(line) for problem in found), (line, found)
    assert len(found) == len(expected), found
