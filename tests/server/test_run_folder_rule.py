"""One rule for a run folder a new run may use: the simulator, `federation up` and the ServerApp agree."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fedpriv.commands.local_federation import _refuse_a_used_folder
from fedpriv.kernel.config import load_config
from fedpriv.kernel.errors import UserError
from fedpriv.server.server_app import run_dir_for
from fedpriv.simulations.runner import resolve_run_dir


def _missing(folder: Path) -> None:
    pass


def _empty(folder: Path) -> None:
    folder.mkdir()


def _stray_file(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")


def _summary(folder: Path) -> None:
    folder.mkdir()
    (folder / "summary.json").write_text("{}")


def _crashed_run(folder: Path) -> None:  # a ServerApp that died before its first summary: its ledgers remain
    (folder / "ledgers").mkdir(parents=True)
    (folder / "ledgers" / "org-1.jsonl").write_text("{}\n")


def _federation_logs(folder: Path) -> None:  # what `fedpriv federation up` writes before its ServerApp starts
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "superlink.log").write_text("up\n")
    (folder / "run.lock").write_text("")


CASES = {
    "missing": (_missing, None),
    "empty": (_empty, None),
    "federation-logs": (_federation_logs, None),
    "stray-file": (_stray_file, "not an empty folder"),
    "summary": (_summary, "holds a run"),
    "crashed-run": (_crashed_run, "not an empty folder"),
}


def _simulator(cfg) -> None:
    _, lock = resolve_run_dir(cfg)
    lock.release()


def _server_app(cfg) -> None:
    run_dir_for(cfg)


def _federation_up(cfg) -> None:
    _refuse_a_used_folder(Path(cfg.run.out_dir))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("start", [_simulator, _server_app, _federation_up], ids=["simulate", "serverapp", "up"])
def test_every_way_a_run_starts_accepts_and_refuses_the_same_folders(tmp_path, case, start):
    make, refused = CASES[case]
    folder = tmp_path / "run"
    make(folder)
    cfg = load_config(overrides=["model.name=tiny"])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(folder)))
    if refused is None:
        start(cfg)  # no error
    else:
        with pytest.raises(UserError, match=rf"{re.escape(str(folder.resolve()))}: already exists and .*{refused}"):
            start(cfg)


def test_a_file_is_never_a_run_folder(tmp_path):
    (tmp_path / "run").write_text("")
    cfg = load_config(overrides=["model.name=tiny"])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "run")))
    for start in (_simulator, _server_app, _federation_up):
        with pytest.raises(UserError, match="is a file, not a run folder"):
            start(cfg)
