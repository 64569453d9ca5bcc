"""``--resume RUN_DIR`` on the command line: every way to get it wrong is one line and exit 2, before any work."""

from __future__ import annotations

import json

import pytest
import yaml

from fedpriv.cli import main
from fedpriv.server.resume import ResumePoint, write_resume_point
from tests.deployment.helpers import write_csv


@pytest.fixture
def stopped_run(tmp_path):
    """A run folder whose coordinator stopped after round 1 (its summary says `running`)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "round-0001.safetensors").write_bytes(b"weights")
    write_resume_point(
        ResumePoint(run.resolve(), 1, {"model": {"name": "tiny"}}, [{"round": 1}], {}, [], [], 3.0,
                    checkpoint="round-0001.safetensors", strategy_state=None)
    )  # fmt: skip
    (run / "summary.json").write_text(json.dumps({"status": "running"}))
    return run


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize(
    "extra, message",
    [(["model.name=tiny"], "drop CONFIG/key=value"), (["--out", "elsewhere"], "drop --out")],
    ids=["override", "out"],
)
def test_simulate_resume_refuses_a_changed_config_or_folder(stopped_run, capsys, extra, message):
    assert main(["simulate", "--resume", str(stopped_run), *extra]) == 2
    line = _error_line(capsys)
    assert message in line and "calibrated for that run's plan" in line


def test_simulate_resume_names_what_is_missing_or_finished(stopped_run, tmp_path, capsys):
    assert main(["simulate", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in _error_line(capsys)
    assert main(["simulate", "--resume", str(tmp_path)]) == 2  # a folder, but no run in it
    assert "no checkpoints/resume.json" in _error_line(capsys)
    (stopped_run / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert main(["simulate", "--resume", str(stopped_run)]) == 2
    assert "already ended (summary.json status 'completed'" in _error_line(capsys)


def test_federation_up_resume_refuses_new_settings_before_starting_anything(stopped_run, tmp_path, capsys):
    write_csv(tmp_path / "a.csv", 40, 0)
    fed = {"federation": "f", "coordinator": {"addresses": ["127.0.0.1"]},
           "organisations": [{"name": "org-a", "data": {"path": "a.csv"}}]}  # fmt: skip
    (tmp_path / "FEDERATION.yaml").write_text(yaml.safe_dump(fed))
    args = ["federation", "up", str(tmp_path / "FEDERATION.yaml"), "--kits", str(tmp_path / "kits")]
    assert main([*args, "--resume", str(stopped_run), "--rounds", "3"]) == 2
    assert "drop --rounds" in _error_line(capsys)
    assert main([*args, "--resume", str(stopped_run)]) == 2  # no run config of the first run: started by hand
    assert "logs/run-config.toml: the run config this run started with cannot be read" in _error_line(capsys)
    assert not (tmp_path / "kits").exists()  # nothing provisioned, nothing started
