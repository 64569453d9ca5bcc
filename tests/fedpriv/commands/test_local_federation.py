"""fedpriv/commands/local_federation.py helpers that need no processes (the real federation: tests/deployment)."""

from __future__ import annotations

from fedpriv.commands.local_federation import printed_since
from fedpriv.runtime.superexec import READY_LINE


def test_a_node_is_warm_only_after_a_ready_line_printed_since_its_start(tmp_path):
    log = tmp_path / "org-0.log"
    assert not printed_since(log, 0, READY_LINE)  # no log yet
    log.write_text(f"INFO : Starting SuperNode\n{READY_LINE} (13 modules preloaded; no cache built)\n")
    start = log.stat().st_size  # a second start appends to the same log: the first start's line does not count
    assert printed_since(log, 0, READY_LINE) and not printed_since(log, start, READY_LINE)
    with log.open("a") as handle:
        handle.write("INFO : Starting SuperNode\nfedpriv-superexec: warm-ish\n")
    assert not printed_since(log, start, READY_LINE + " (")
    with log.open("a") as handle:
        handle.write(f"   {READY_LINE} (13 modules preloaded; presidio.recognizers built)\n")
    assert printed_since(log, start, READY_LINE)


def test_a_run_stopped_by_divergence_or_a_disk_error_ends_with_its_one_error_line():
    from fedpriv.commands.local_federation import stopped_line

    diverged = {"status": "failed", "stopped_reason": "round 1, org-0: training loss became non-finite (nan) at step 2"}
    assert stopped_line(diverged) == f"error: {diverged['stopped_reason']}"
    disk = {"status": "incomplete", "error": "cannot write /r/summary.json: [Errno 28] No space left on device"}
    assert stopped_line(disk) == f"error: {disk['error']}"
    assert stopped_line({"status": "completed"}) is None
    assert stopped_line({"status": "budget_exhausted", "stopped_reason": "org-1 spent its budget"}) is None
