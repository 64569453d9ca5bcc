"""The audit's files: audit.json for programs, audit.md and a self-contained audit.html for people."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from fedpriv.kernel import atomic_files
from fedpriv.privacy.audit_result import RDP_TOLERANCE, AuditResult

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
        lines += ["", "## Empirical audit (canaries)", "", *_empirical_lines(result.empirical)]
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


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def plot_figure(result: AuditResult):
    """Epsilon per round per organisation (a matplotlib Figure; None without DP rounds).

    Recomputed epsilons are lines with small filled markers, the ledgers' claims larger hollow markers of the
    same colour on top (a claim that equals its recomputation shows as a ring around the line's marker), budgets
    dotted horizontal lines. Each organisation has its own colour, line style and marker, and lines drawn later
    are thinner, so organisations whose values coincide stay visible. Rounds are whole numbers on the x axis; the
    legend sits outside the axes, hiding no data.
    """
    orgs = [org for org in result.orgs if org.rounds]
    if not orgs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    if len(orgs) > MAX_PLOTTED_ORGS:
        orgs = sorted(orgs, key=lambda o: -(o.recomputed_epsilon.get("rdp") or 0) / (o.max_epsilon or 1))
        orgs = orgs[:MAX_PLOTTED_ORGS]
    fig, axis = plt.subplots(figsize=(10, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    rounds_seen: list[int] = []
    highest = 0.0
    for number, org in enumerate(orgs):
        rounds = [check.round for check in org.rounds]
        rounds_seen += rounds
        recomputed = [
            check.rdp_epsilon if check.accountant == "rdp" or check.pld_epsilon is None else check.pld_epsilon
            for check in org.rounds
        ]
        highest = max([highest, *recomputed, *(c.claimed_epsilon for c in org.rounds), org.max_epsilon or 0.0])
        colour, marker = colours[number % len(colours)], MARKERS[number % len(MARKERS)]
        few = len(rounds) <= 60  # markers only where they stay apart
        axis.plot(
            rounds, recomputed, label=org.org, color=colour, linestyle=LINE_STYLES[number % len(LINE_STYLES)],
            linewidth=max(0.8, 2.6 - 0.3 * number), marker=marker if few else None, markersize=4, zorder=2,
        )  # fmt: skip
        axis.plot(
            rounds, [c.claimed_epsilon for c in org.rounds], linestyle="none", marker=marker,
            markersize=9 if few else 5, markerfacecolor="none", markeredgecolor=colour, markeredgewidth=1.2, zorder=3,
        )  # fmt: skip
        if org.max_epsilon is not None:
            axis.axhline(org.max_epsilon, linestyle=":", linewidth=1.0, color=colour, zorder=1)
    kinds = [
        Line2D([], [], color="0.3", linewidth=1.8, marker="o", markersize=4, label="recomputed (line)"),
        Line2D([], [], color="0.3", linestyle="none", marker="o", markersize=9, markerfacecolor="none",
               label="claimed (hollow marker)"),
        Line2D([], [], color="0.3", linestyle=":", linewidth=1.0, label="budget max_epsilon (dotted)"),
    ]  # fmt: skip
    org_legend = axis.legend(
        title="organisation", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
        ncol=1 if len(orgs) <= 12 else 2,
    )  # fmt: skip
    axis.add_artist(org_legend)
    axis.legend(handles=kinds, fontsize="small", loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0.0)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axis.xaxis.set_major_formatter(FormatStrFormatter("%d"))
    axis.set_xlim(min(rounds_seen) - 0.5, max(rounds_seen) + 0.5)
    axis.set(xlabel="round", ylabel="epsilon", title="Epsilon per round: recomputed, claimed and budget")
    axis.set_ylim(0, highest * 1.08 if highest > 0 else 1.0)  # a budget line never sits on the frame
    axis.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_png(result: AuditResult) -> bytes | None:
    """:func:`plot_figure` as PNG bytes (None without DP rounds)."""
    fig = plot_figure(result)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
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


def _empirical_reach(e: dict) -> tuple[float | None, str]:
    """The largest bound the audit's settings can show (every guess right), and what it means for the claim."""
    from fedpriv.privacy.canaries import max_reachable_epsilon, reach_note

    reach = e.get("max_reachable_epsilon")
    if reach is None:  # an empirical_audit.json written before the field existed: the same computation
        try:
            reach = max_reachable_epsilon(int(e["canaries"]), int(e["guesses"]) // 2, float(e["delta"]),
                                          float(e["confidence"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None, ""
    return float(reach), reach_note(float(reach), e.get("claimed_epsilon"))


def _empirical_lines(e: dict) -> list[str]:
    claimed = "n/a (DP off)" if e.get("claimed_epsilon") is None else f"{e['claimed_epsilon']:.4f}"
    lines = [
        f"{e['org']}: {e['correct']} of {e['guesses']} membership guesses right on {e['canaries']} canaries"
        f" ({e['included']} inserted): epsilon >= **{e['epsilon_lower_bound']:.4f}** with"
        f" {e['confidence']:.0%} confidence, next to the claimed epsilon {claimed}. ({e['method']})",
    ]
    reach, note = _empirical_reach(e)
    if reach is not None:
        text = f"The most this audit can show (every guess right): epsilon >= {reach:.4f}."
        if note and e.get("claimed_epsilon") is not None:
            text += f" **{note[0].upper() + note[1:]}.**"  # below the claim: it cannot contradict it
        elif e.get("claimed_epsilon") is not None:
            text += " That is above the claim: the audit could contradict it."
        lines += ["", text]
    return lines


def _empirical_html(result: AuditResult) -> str:
    e = result.empirical
    if not e:
        return ""
    claimed = "n/a (DP off)" if e.get("claimed_epsilon") is None else f"{e['claimed_epsilon']:.4f}"
    reach, note = _empirical_reach(e)
    shown = "n/a" if reach is None else f"{reach:.4f}"
    warning = f'<p class="reach"><b>{html.escape(note[0].upper() + note[1:])}.</b></p>' if note else ""
    return (
        "<h2>Empirical audit (canaries)</h2><table><tr><th>organisation</th><th>canaries</th><th>right guesses</th>"
        "<th>empirical lower bound</th><th>most it can show</th><th>claimed epsilon</th></tr>"
        f"<tr><td>{html.escape(str(e['org']))}</td><td>{e['canaries']}</td><td>{e['correct']} / {e['guesses']}</td>"
        f"<td>{e['epsilon_lower_bound']:.4f} ({e['confidence']:.0%})</td><td>{shown}</td><td>{claimed}</td></tr>"
        f"</table>{warning}<p>{html.escape(str(e.get('method', '')))}</p>"
    )


def write_reports(result: AuditResult, out: Path) -> list[Path]:
    """Write the three files as one change: all three, or (a read-only or full folder) none, with a one-line
    DiskError naming the file; an earlier audit's files are then left as they were."""
    paths = [out / JSON_FILE, out / MARKDOWN_FILE, out / HTML_FILE]
    texts = [json.dumps(result.to_dict(), indent=2) + "\n", markdown(result), html_page(result)]
    atomic_files.write_all([(path, text.encode("utf-8"), None) for path, text in zip(paths, texts, strict=True)])
    return paths
