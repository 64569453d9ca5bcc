"""The real ``fedpriv`` command, run as a subprocess: user mistakes end with one line, exit 2, nothing written.

The invocations are slow to start (torch, datasets), so every invocation that the
selected tests need is started at once, in parallel, by a module fixture; each
test then waits for its own result.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fedpriv.kernel.config import config_from_dict, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DRUGS = SHARED_DATA / "drug_reviews" / "drugs.csv"
TIMEOUT_S = 300  # a run that got past the checks would start Ray and train: far longer than any check

DRUG_DATA = (
    "data.source=file",
    f"data.path={DRUGS}",
    "data.text_column=review",
    "data.label_column=rating",
    "data.html_unescape=true",
    "data.max_examples=null",
)
DRUG_RANGES = "data.labels.ranges={negative: [1, 4], neutral: [5, 6], positive: [7, 10]}"


@dataclass(frozen=True)
class Invocation:
    args: tuple[str, ...]
    needs_data: bool = False
    files: dict[str, str] = field(default_factory=dict)  # written into the (empty) working directory first


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    before: frozenset[str]  # what the working directory held before the run


# id -> invocation, expected substrings of the one error line (for the bad inputs)
BAD: dict[str, tuple[Invocation, tuple[str, ...]]] = {
    "unknown-key": (Invocation(("simulate", "training.epochs=2")), ("training.epochs",)),
    "unknown-key-dry-run": (Invocation(("simulate", "model.lora.rank=4", "--dry-run")), ("model.lora.rank",)),
    "wrong-type": (Invocation(("simulate", "training.rounds=three")), ("training.rounds",)),
    "wrong-type-list": (Invocation(("simulate", "privacy.delta=[1, 2]", "--dry-run")), ("privacy.delta",)),
    "malformed-override": (Invocation(("simulate", "training.rounds", "--dry-run")), ("training.rounds",)),
    "missing-data-file": (
        Invocation(("simulate", "data.source=file", "data.path=/nonexistent.csv", "--dry-run")),
        ("/nonexistent.csv",),
    ),
    "missing-data-file-no-dry-run": (  # no --dry-run: the checks must still stop it before training
        Invocation(("simulate", "data.source=file", "data.path=/nonexistent.csv")),
        ("/nonexistent.csv",),
    ),
    "wrong-text-column": (
        Invocation(("simulate", *DRUG_DATA, "data.text_column=body", DRUG_RANGES, "--dry-run"), needs_data=True),
        (str(DRUGS), "'body'", "data.text_column"),
    ),
    "labels-outside-map": (
        Invocation(
            ("simulate", *DRUG_DATA, 'data.labels.map={"1": negative, "10": positive}', "--dry-run"), needs_data=True
        ),
        (str(DRUGS), "'rating'", "data.labels.map"),
    ),
    "labels-outside-ranges": (
        Invocation(
            ("simulate", *DRUG_DATA, "data.labels.ranges={negative: [1, 4], positive: [7, 10]}", "--dry-run"),
            needs_data=True,
        ),
        (str(DRUGS), "'rating'", "data.labels.ranges"),
    ),
    "partition-smaller-than-batch": (
        Invocation(
            (
                "simulate",
                *DRUG_DATA,
                DRUG_RANGES,
                "partitioning.scheme=natural",
                "partitioning.column=condition",
                "partitioning.num_orgs=10",
                "training.batch_size=200",
                "--dry-run",
            ),
            needs_data=True,
        ),
        ("training.batch_size=200", "organisation"),
    ),
    "epsilon-zero": (Invocation(("simulate", "privacy.target_epsilon=0")), ("privacy.target_epsilon",)),
    "epsilon-negative-per-org": (
        Invocation(("simulate", "privacy.orgs={org-1: {target_epsilon: -1}}", "--dry-run")),
        ("privacy.orgs.org-1.target_epsilon",),
    ),
    "epsilon-infinite": (
        Invocation(("simulate", "privacy.target_epsilon=.inf", "--dry-run")),
        ("privacy.target_epsilon",),
    ),
    "delta-above-1-over-n": (Invocation(("simulate", "privacy.delta=0.5", "--dry-run")), ("privacy.delta", "1/n")),
    "delta-above-1-over-n-no-dry-run": (  # found after loading and partitioning the data, still before training
        Invocation(("simulate", "privacy.delta=0.5")),
        ("privacy.delta", "1/n"),
    ),
    "negative-seed": (Invocation(("simulate", "run.seed=-1", "--dry-run")), ("run.seed",)),
    "config-file-missing": (Invocation(("simulate", "missing.yaml")), ("missing.yaml",)),
    "config-file-missing-dry-run": (Invocation(("simulate", "nowhere/missing.yaml", "--dry-run")), ("missing.yaml",)),
    "config-file-not-yaml": (
        Invocation(("simulate", "broken.yaml", "--dry-run"), files={"broken.yaml": "training: [rounds: 3\n"}),
        ("broken.yaml", "YAML"),
    ),
    "config-file-top-level-list": (
        Invocation(("simulate", "list.yaml", "--dry-run"), files={"list.yaml": "- training\n- privacy\n"}),
        ("list.yaml",),
    ),
    "config-file-bad-key": (
        Invocation(("simulate", "mine.yaml", "--dry-run"), files={"mine.yaml": "training:\n  rounds: 2\n  epoch: 1\n"}),
        ("training.epoch",),
    ),
    "model-dir-missing": (
        Invocation(("simulate", "model.name=/nonexistent-model-dir", "--dry-run")),
        ("model.name", "/nonexistent-model-dir"),
    ),
    "config-command-bad-key": (Invocation(("config", "privacy.epsilon=3")), ("privacy.epsilon",)),
    # issue 27: overrides after an option reach validation (argparse left them as "unrecognized arguments")
    "override-after-option": (
        Invocation(("simulate", "model.name=tiny", "--dry-run", "training.rounds=0")),
        ("training.rounds", "expected an integer > 0"),
    ),
    "config-file-duplicate-key": (
        Invocation(("simulate", "dup.yaml", "--dry-run"), files={"dup.yaml": "training:\n  rounds: 2\n  rounds: 7\n"}),
        ("dup.yaml", "'training.rounds'", "lines 2 and 3"),
    ),
    "learning-rate-overflows-float32": (
        Invocation(("simulate", "model.name=tiny", "training.learning_rate=1e300", "--dry-run")),
        ("training.learning_rate",),
    ),
}

CONFIG_OVERRIDES = (
    "training.rounds=5",
    "privacy.delta=1e-6",
    "privacy.orgs={org-1: {target_epsilon: 2}}",
    "model.lora.target_modules=[query, key]",
    "data.labels.map={0: negative, 1: positive}",
)
GOOD: dict[str, Invocation] = {
    "dry-run-default": Invocation(("simulate", "--dry-run")),
    "config-default": Invocation(("config",)),
    "config-overrides": Invocation(("config", *CONFIG_OVERRIDES)),
    "config-file": Invocation(
        ("config", "conf/mine.yaml", "training.rounds=4"),
        files={"conf/mine.yaml": "data:\n  source: file\n  path: data/x.csv\ntraining:\n  rounds: 9\n"},
    ),
    "dry-run-overrides-after-option": Invocation(
        ("simulate", "model.name=tiny", "--dry-run", "training.rounds=2", "partitioning.num_orgs=2")
    ),
    "help": Invocation(("--help",)),
    "simulate-help": Invocation(("simulate", "--help")),
    "config-help": Invocation(("config", "--help")),
}
ALL = {**{key: inv for key, (inv, _) in BAD.items()}, **GOOD}


def _run(invocation: Invocation, cwd: Path) -> Result:
    for name, text in invocation.files.items():
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(text, encoding="utf-8")
    before = frozenset(os.listdir(cwd))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fedpriv.cli", *invocation.args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        return Result(-1, str(exc.stdout), f"timed out after {TIMEOUT_S} s: {exc.stderr}", cwd, before)
    return Result(proc.returncode, proc.stdout, proc.stderr, cwd, before)


@pytest.fixture(scope="module")
def cli(request, tmp_path_factory):
    """``cli(id) -> Result``; starts every invocation the selected tests use, in parallel, on first use."""
    wanted = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and params.get("case") in ALL and params["case"] not in wanted:
            wanted.append(params["case"])
    if not SHARED_DATA.is_dir():
        wanted = [case for case in wanted if not ALL[case].needs_data]
    # slowest (data loading, calibration) first
    wanted.sort(key=lambda case: "--dry-run" not in ALL[case].args and case != "delta-above-1-over-n-no-dry-run")
    pool = ThreadPoolExecutor(max_workers=max(2, min(6, (os.cpu_count() or 2) * 2)))
    futures: dict[str, Future] = {case: pool.submit(_run, ALL[case], tmp_path_factory.mktemp(case)) for case in wanted}

    def result(case: str) -> Result:
        if ALL[case].needs_data and not SHARED_DATA.is_dir():
            pytest.skip(f"shared test data not found at {SHARED_DATA} (present in CI and on dev machines)")
        if case not in futures:
            futures[case] = pool.submit(_run, ALL[case], tmp_path_factory.mktemp(case))
        return futures[case].result()

    yield result
    pool.shutdown(wait=True, cancel_futures=True)


def _describe(result: Result) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(cli, case):
    _, names = BAD[case]
    result = cli(case)
    assert result.returncode == 2, _describe(result)
    assert "Traceback" not in result.stdout + result.stderr, _describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr\n{_describe(result)}"
    line = lines[0]
    assert line.startswith("error:") and line[len("error:") :].strip(), _describe(result)
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    assert not (result.cwd / "runs").exists(), "a run folder was created"
    assert frozenset(os.listdir(result.cwd)) == result.before, "the command wrote into the working directory"
    assert "run folder:" not in result.stdout, _describe(result)


@pytest.mark.parametrize("case", ["dry-run-default"])
def test_dry_run_default_prints_the_plan(cli, case):
    result = cli(case)
    assert result.returncode == 0, _describe(result)
    assert "Traceback" not in result.stdout + result.stderr, _describe(result)
    default = load_config()
    rows = [
        line
        for line in result.stdout.splitlines()
        if re.match(
            r"^\s+org-\d+\s+train\s+\d+\s+test\s+\d+\s+target eps \S+ delta \S+\s+sigma [\d.]+\s+q [\d.]+", line
        )
    ]
    assert len(rows) == default.partitioning.num_orgs, _describe(result)
    assert sorted(row.split()[0] for row in rows) == [f"org-{i}" for i in range(default.partitioning.num_orgs)]
    assert f"{default.partitioning.num_orgs} organisations" in result.stdout
    assert "DP-SGD" in result.stdout
    for row in rows:
        sigma = float(re.search(r"sigma (\S+)", row).group(1))
        q = float(re.search(r"q (\S+)", row).group(1))
        assert sigma > 0 and 0 < q <= 1, row
    assert not (result.cwd / "runs").exists(), "a dry run created a run folder"
    assert frozenset(os.listdir(result.cwd)) == result.before


@pytest.mark.parametrize("case", ["dry-run-overrides-after-option"])
def test_overrides_after_an_option_are_applied(cli, case):
    """``simulate a=1 --dry-run b=2``: argparse fills the positionals before the option only; b=2 counts too."""
    result = cli(case)
    assert result.returncode == 0, _describe(result)
    assert "Traceback" not in result.stdout + result.stderr, _describe(result)
    assert "fedpriv simulate: 2 organisations, 2 round(s), model tiny" in result.stdout, _describe(result)


@pytest.mark.parametrize(
    "case, path, overrides",
    [
        ("config-default", None, ()),
        ("config-overrides", None, CONFIG_OVERRIDES),
        ("config-file", "conf/mine.yaml", ("training.rounds=4",)),
    ],
)
def test_config_prints_yaml_that_loads_back(cli, case, path, overrides):
    result = cli(case)
    assert result.returncode == 0, _describe(result)
    assert result.stderr == ""
    printed = yaml.safe_load(result.stdout)
    expected = load_config(result.cwd / path if path else None, list(overrides))
    assert config_from_dict(printed) == expected
    # and as a config file of its own
    again = result.cwd / "printed.yaml"
    again.write_text(result.stdout, encoding="utf-8")
    assert load_config(again) == expected
    if case == "config-file":
        assert expected.training.rounds == 4
        assert Path(expected.data.path) == (result.cwd / "conf" / "data" / "x.csv").resolve()
    if case == "config-overrides":
        assert expected.privacy.delta == 1e-6 and expected.training.rounds == 5


@pytest.mark.parametrize(
    "case, expect",
    [("help", ("simulate", "config")), ("simulate-help", ("--dry-run", "--out")), ("config-help", ("CONFIG.yaml",))],
)
def test_help(cli, case, expect):
    result = cli(case)
    assert result.returncode == 0, _describe(result)
    assert result.stderr == ""
    for text in expect:
        assert text in result.stdout


def test_console_script_is_installed():
    script = shutil.which("fedpriv", path=str(Path(sys.executable).parent)) or shutil.which("fedpriv")
    if script is None:
        pytest.skip("the fedpriv console script is not on PATH (package not installed)")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "simulate" in proc.stdout


def test_cli_module_is_runnable():
    source = (REPO_ROOT / "fedpriv" / "cli.py").read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in source
