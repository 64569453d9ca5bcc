"""What an organisation's signed entries say about the redaction of the data its DP steps used."""

from __future__ import annotations

from typing import Any


def redaction_summary(dp_rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Redaction as the organisation's signed entries record it: on in how many rounds, which rule sets, counts.

    ``status``: "on" (every round recorded redaction on), "off", "mixed", or "not recorded" (entries written
    before redaction was recorded). The counts are those of the last round with redaction on; its ``share`` says
    what the organisation let its entries say (``redaction.share``): "counts" (entries from before the setting
    have counts and no ``share``), "kinds" (``found``: the kinds with matches, ``counts`` empty) or "none".
    """
    if not dp_rounds:
        return None
    recorded = [e.get("redaction") for e in dp_rounds]
    known = [r for r in recorded if isinstance(r, dict)]
    on = [r for r in known if r.get("enabled") is True]
    if not known:
        status = "not recorded"
    elif len(on) == len(recorded):
        status = "on"
    elif not on:
        status = "off"
    else:
        status = "mixed"
    rule_sets = sorted({f"{r.get('rules')} v{r.get('version')} ({str(r.get('digest', ''))[:12]})" for r in on})
    return {
        "status": status,
        "dp_rounds": len(recorded),
        "rounds_recorded": len(known),
        "rounds_on": len(on),
        "rule_sets": rule_sets,
        "kinds": list(on[-1].get("kinds", [])) if on else [],
        "counts": dict(on[-1].get("counts", {})) if on else {},
        "share": str(on[-1].get("share", "counts")) if on else None,
        "found": _found(on[-1]) if on else [],
    }


def _found(report: dict[str, Any]) -> list[str]:
    """The kinds a redaction report says were found: its ``found``, or the kinds with counts in an older one."""
    if isinstance(report.get("found"), list):
        return [str(kind) for kind in report["found"]]
    counts = report.get("counts")
    return sorted(str(kind) for kind, n in counts.items() if n) if isinstance(counts, dict) else []
