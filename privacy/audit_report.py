"""The audit's files: audit.json for programs, audit.md and a self-contained audit.html for people."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from privacy.audit import RDP_TOLERANCE, AuditResult

JSON_FILE, MARKDOWN_FILE, HTML_FILE = "audit.json", "audit.md", "audit.html"
MAX_PLOTTED_ORGS = 20  # beyond this the plot shows the 20 organisations closest to their budgets


def _fmt(value: float | None, pattern: str = "{:.4f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def _rows(result: AuditResult) -> list[list[str]]:
    rows = []
    for org in result.orgs:
        rows.append(
            [
                f"{org.org} (organisation-level DP)" if org.org == "coordinator" else org.org,
                str(org.entries),
                str(org.dp_rounds),
                str(org.refusals),
                (org.accountant or "n/a").upper(),
                _fmt(org.claimed_epsilon),
                _fmt(org.recomputed_epsilon.get("rdp")),
                _fmt(org.recomputed_epsilon.get("pld")),
                _fmt(org.max_epsilon, "{:g}"),
                {True: "yes", False: "NO", None: "n/a"}[org.within_budget],
                "OK" if org.ok else f"FAILED ({len(org.findings)})",
            ]
        )
    return rows


HEADER = [
    "organisation", "entries", "DP rounds", "refusals", "accountant", "claimed epsilon",
    "RDP (dp-accounting)", "PLD (dp-accounting)", "max_epsilon", "within budget", "checks",
]  # fmt: skip


def markdown(result: AuditResult) -> str:
    lines = [
        "# Privacy-budget audit",
        "",
        f"Verdict: **{result.verdict()}** ({len(result.orgs)} organisations, {result.seconds:.2f} s)  ",
        f"Input: `{result.source}`",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    findings = [f for org in result.orgs for f in org.findings]
    lines += ["", "## Findings", ""]
    if findings:
        for f in findings:
            where = f"line {f.position}" if f.position else "ledger"
            lines.append(f"- **{f.org}** ({where}, {f.check}/{f.problem}): {f.message}")
    else:
        lines.append("None: every signature verifies, every chain is complete and in order, every claimed epsilon")
        lines.append("is at least what its recorded parameters give, and every organisation stayed within its budget.")
    if result.empirical:
        e = result.empirical
        claimed = "n/a (DP off)" if e.get("claimed_epsilon") is None else f"{e['claimed_epsilon']:.4f}"
        lines += [
            "",
            "## Empirical audit (canaries)",
            "",
            f"{e['org']}: {e['correct']} of {e['guesses']} membership guesses right on {e['canaries']} canaries"
            f" ({e['included']} inserted): epsilon >= **{e['epsilon_lower_bound']:.4f}** with"
            f" {e['confidence']:.0%} confidence, next to the claimed epsilon {claimed}. ({e['method']})",
        ]
    lines += ["", "## Redaction", "", *_redaction_lines(result)]
    lines += ["", "## Keys", ""]
    for org in result.orgs:
        lines.append(f"- {org.org}: {org.key_fingerprint or 'no key'}, {org.key_trust} ({org.key_source})")
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    lines += [
        "",
        "Epsilon is recomputed from each ledger's recorded (noise multiplier, sampling rate, steps) alone, by a second",
        "implementation (Google's dp-accounting), not the Opacus code the nodes claim with: its RDP accountant for",
        "every entry (Opacus's and dp-accounting's orders), its PLD accountant (pessimistic) for each ledger's total",
        f"and for every claim more than {RDP_TOLERANCE:.0%} below RDP. A claim below PLD is under-reported; an RDP claim",
        "between PLD and RDP must also equal what its stated accountant (Opacus's RDP) gives. Every entry's parameters",
        "are checked on their own (0 < delta < 1/n, q = 1/k with k <= n batches an epoch, sigma > 0, whole epochs of",
        "steps) and summary.json's figures against the ledgers.",
    ]
    computed = [org for org in result.orgs if org.pld_prefixes_computed > 1]
    if computed:
        lines.append(
            "PLD computed for: "
            + ", ".join(f"{org.org}: {org.pld_prefixes_computed} of {org.dp_rounds} rounds" for org in computed)
            + "."
        )
    return "\n".join(lines) + "\n"


REDACTION_HEADER = ["organisation", "redaction", "rounds on", "rule set", "found (last round on)"]


def _redaction_rows(result: AuditResult) -> list[list[str]]:
    """Per organisation: what its signed entries say about redaction (the coordinator's ledger has none)."""
    rows = []
    for org in result.orgs:
        summary = org.redaction
        if summary is None:
            continue
        share = summary.get("share")
        if share == "none":
            counts = "not shared by the organisation"
        elif summary.get("counts"):  # entries with counts (redaction.share: counts, or written before the setting)
            counts = ", ".join(f"{kind} {n}" for kind, n in summary["counts"].items()) or "-"
        elif share == "kinds":
            counts = (", ".join(summary.get("found", [])) or "nothing") + " (kinds only)"
        else:
            counts = "-"
        rows.append(
            [
                org.org,
                summary["status"],
                f"{summary['rounds_on']} of {summary['dp_rounds']}",
                "; ".join(summary["rule_sets"]) or "-",
                counts,
            ]
        )
    return rows


def _redaction_lines(result: AuditResult) -> list[str]:
    rows = _redaction_rows(result)
    if not rows:
        return ["No DP rounds recorded."]
    lines = ["| " + " | ".join(REDACTION_HEADER) + " |", "|" + "---|" * len(REDACTION_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        "As each organisation's signed dp_round entries record it: the rule set its node applied to its text before",
        "tokenisation, and what it found: how many matches it replaced per kind, or only which kinds, as the",
        "organisation's redaction.share allows (never the values). 'not recorded': entries written before fedpriv",
        "recorded redaction.",
    ]
    return lines


def plot_png(result: AuditResult) -> bytes | None:
    """Epsilon per round per organisation: recomputed (line), claimed (dots), budgets (dashed)."""
    orgs = [org for org in result.orgs if org.rounds]
    if not orgs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(orgs) > MAX_PLOTTED_ORGS:
        orgs = sorted(orgs, key=lambda o: -(o.recomputed_epsilon.get("rdp") or 0) / (o.max_epsilon or 1))
        orgs = orgs[:MAX_PLOTTED_ORGS]
    fig, axis = plt.subplots(figsize=(9, 4.5))
    for org in orgs:
        rounds = [check.round for check in org.rounds]
        recomputed = [
            check.rdp_epsilon if check.accountant == "rdp" or check.prv_epsilon is None else check.prv_epsilon
            for check in org.rounds
        ]
        (line,) = axis.plot(rounds, recomputed, label=org.org, linewidth=1.5)
        axis.scatter(rounds, [c.claimed_epsilon for c in org.rounds], s=12, color=line.get_color())
        if org.max_epsilon is not None:
            axis.axhline(org.max_epsilon, linestyle="--", linewidth=0.8, color=line.get_color())
    axis.set(
        xlabel="round", ylabel="epsilon", title="Epsilon per round: recomputed (lines), claimed (dots), budget (dashed)"
    )
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def html_page(result: AuditResult) -> str:
    verdict = result.verdict()
    colour = "#1a7f37" if result.ok else "#cf222e"
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in HEADER) + "</tr>"
    for row in _rows(result):
        table += "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
    table += "</table>"
    findings = [f for org in result.orgs for f in org.findings]
    items = "".join(
        f"<li><b>{html.escape(f.org)}</b> ({'line ' + str(f.position) if f.position else 'ledger'},"
        f" {html.escape(f.check)}/{html.escape(f.problem)}): {html.escape(f.message)}</li>"
        for f in findings
    )
    png = plot_png(result)
    image = f'<img alt="epsilon per round" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    keys = "".join(
        f"<li>{html.escape(o.org)}: {html.escape(o.key_fingerprint or 'no key')} ({html.escape(o.key_source)})</li>"
        for o in result.orgs
    )
    redaction = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in REDACTION_HEADER) + "</tr>"
    for row in _redaction_rows(result):
        redaction += "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
    redaction += "</table>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Privacy-budget audit</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
.verdict{{color:{colour};font-weight:bold}}</style></head><body>
<h1>Privacy-budget audit</h1>
<p>Input: <code>{html.escape(result.source)}</code><br>
Verdict: <span class="verdict">{html.escape(verdict)}</span> ({len(result.orgs)} organisations, {result.seconds:.2f} s)</p>
{table}
<h2>Epsilon per round</h2>{image or "<p>No DP rounds recorded.</p>"}
{_empirical_html(result)}
<h2>Findings</h2>{f"<ul>{items}</ul>" if items else "<p>None.</p>"}
<h2>Redaction</h2>{redaction if _redaction_rows(result) else "<p>No DP rounds recorded.</p>"}
<h2>Keys</h2><ul>{keys}</ul>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
</body></html>
"""


def _empirical_html(result: AuditResult) -> str:
    e = result.empirical
    if not e:
        return ""
    claimed = "n/a (DP off)" if e.get("claimed_epsilon") is None else f"{e['claimed_epsilon']:.4f}"
    return (
        "<h2>Empirical audit (canaries)</h2><table><tr><th>organisation</th><th>canaries</th><th>right guesses</th>"
        "<th>empirical lower bound</th><th>claimed epsilon</th></tr>"
        f"<tr><td>{html.escape(str(e['org']))}</td><td>{e['canaries']}</td><td>{e['correct']} / {e['guesses']}</td>"
        f"<td>{e['epsilon_lower_bound']:.4f} ({e['confidence']:.0%})</td><td>{claimed}</td></tr></table>"
    )


def write_reports(result: AuditResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / JSON_FILE, out / MARKDOWN_FILE, out / HTML_FILE]
    paths[0].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    paths[2].write_text(html_page(result), encoding="utf-8")
    return paths
