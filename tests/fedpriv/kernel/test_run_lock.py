"""A run folder belongs to one run at a time (fedpriv/kernel/run_lock.py): a second run is refused with one line naming the
folder and the PID holding it; a killed run does not leave its folder stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from fedpriv.cli import main
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.run_lock import LOCK_FILE, RunFolderBusy, lock_run_dir
from tests.deployment.helpers import write_csv

ROOT = Path(__file__).resolve().parents[3]
HOLD = "import sys, time\nfrom fedpriv.kernel.run_lock import lock_run_dir\nlock_run_dir(sys.argv[1], fresh=True)\n"
HOLD += "print('locked', flush=True)\ntime.sleep(600)\n"
TINY = ["model.name=tiny", "partitioning.num_orgs=2", "partitioning.scheme=iid", "data.max_examples=200"]
TINY += ["training.batch_size=16"]


@pytest.fixture
def holder(tmp_path):
    """A process that holds ``tmp_path/run`` as a run would (killed with SIGKILL at the end if still alive)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc, (tmp_path / "run").resolve()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_simulate_into_a_folder_a_live_run_holds_is_refused_with_its_pid_and_proceeds_once_it_is_killed(holder, capsys):
    proc, run = holder
    args = ["simulate", *TINY, "--out", str(run)]
    assert main(args) == 2
    line = _one_line(capsys)
    assert line == (
        f"error: --out {run}: in use by another fedpriv run (PID {proc.pid}); wait for it to end, stop it, or choose"
        " another run folder"
    )
    assert main(["simulate", "--resume", str(run)]) == 2  # a resume is refused too (here: no resume point yet)
    capsys.readouterr()
    with pytest.raises(RunFolderBusy, match=f"--resume {run}: in use by another fedpriv run \\(PID {proc.pid}\\)"):
        lock_run_dir(run, fresh=False, flag="--resume")
    proc.send_signal(signal.SIGKILL)  # a crashed run: the kernel drops its lock
    proc.wait(10)
    with lock_run_dir(run, fresh=True) as lock:  # the next run gets the folder (only the lock file in it)
        assert lock.folder == run
        assert (run / LOCK_FILE).read_text().split() == [str(os.getpid())]


def test_of_runs_started_together_exactly_one_gets_the_folder(tmp_path):
    folder = tmp_path / "run"
    start = threading.Barrier(6)
    won, refused = [], []

    def start_run() -> None:
        start.wait()
        try:
            won.append(lock_run_dir(folder, fresh=True))
        except RunFolderBusy as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=start_run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        assert all(f"(PID {os.getpid()})" in message for message in refused)
    finally:
        for lock in won:
            lock.release()


def test_a_folder_with_files_of_its_own_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        lock_run_dir(tmp_path / "run", fresh=True)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]  # no lock file left in it
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        lock_run_dir(tmp_path / "file", fresh=True)


def test_federation_up_into_a_folder_a_live_run_holds_is_refused_before_starting_anything(holder, tmp_path, capsys):
    proc, run = holder
    write_csv(tmp_path / "a.csv", 40, 0)
    fed = {"federation": "f", "coordinator": {"addresses": ["127.0.0.1"]},
           "organisations": [{"name": "org-a", "data": {"path": "a.csv"}}]}  # fmt: skip
    (tmp_path / "FEDERATION.yaml").write_text(yaml.safe_dump(fed))
    args = ["federation", "up", str(tmp_path / "FEDERATION.yaml"), "--kits", str(tmp_path / "kits"), "--out", str(run)]
    assert main(args) == 2
    assert f"--out {run}: in use by another fedpriv run (PID {proc.pid})" in _one_line(capsys)
    assert not (tmp_path / "kits").exists()  # nothing provisioned, nothing started
