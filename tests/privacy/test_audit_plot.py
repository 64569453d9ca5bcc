"""audit.html's plot: whole rounds on the x axis, coinciding lines and claims still told apart, the legend off the
data; the empirical audit's section says what the audit can reach."""

from __future__ import annotations

import matplotlib
import pytest

from fedpriv.privacy.audit import AuditResult, OrgAudit, RoundCheck
from fedpriv.privacy.audit_report import html_page, markdown, plot_figure

matplotlib.use("Agg")


def _org(name: str, rounds: int, step: float = 1.0) -> OrgAudit:
    org = OrgAudit(org=name, ledger=f"{name}.jsonl", key_source="test", key_fingerprint=None, max_epsilon=8.0)
    for r in range(1, rounds + 1):
        eps = step * r  # claimed = recomputed: the lines and the claims coincide
        org.rounds.append(RoundCheck(r, r, r, 10, eps, eps, None, "rdp"))
    return org


@pytest.mark.parametrize("rounds", [1, 3, 7, 40])
def test_the_round_axis_shows_whole_rounds(rounds):
    fig = plot_figure(AuditResult("test", [_org("org-0", rounds), _org("org-1", rounds)], []))
    fig.canvas.draw()
    axis = fig.axes[0]
    labels = [t.get_text() for t in axis.get_xticklabels() if t.get_text()]
    lo, hi = axis.get_xlim()
    shown = [t for t in axis.get_xticks() if lo <= t <= hi]
    assert labels and all(label.lstrip("-").isdigit() for label in labels), labels
    assert all(float(t).is_integer() for t in shown) and len(shown) >= min(rounds, 2)
    matplotlib.pyplot.close(fig)


def test_coinciding_organisations_and_claims_stay_distinguishable():
    fig = plot_figure(AuditResult("test", [_org("org-0", 3), _org("org-1", 3), _org("org-2", 3)], []))
    fig.canvas.draw()
    axis = fig.axes[0]
    lines = [line for line in axis.get_lines() if line.get_label() in ("org-0", "org-1", "org-2")]
    assert len({line.get_linestyle() for line in lines}) == 3 and len({line.get_marker() for line in lines}) == 3
    assert len({line.get_linewidth() for line in lines}) == 3  # later lines thinner: a coinciding one shows beneath
    claims = [line for line in axis.get_lines() if line.get_linestyle() == "None"]
    assert len(claims) == 3 and all(c.get_markerfacecolor() == "none" for c in claims)  # hollow, around the line
    # every legend lies outside the axes: it hides no data
    box = axis.get_window_extent()
    legends = [child for child in axis.get_children() if isinstance(child, matplotlib.legend.Legend)]
    assert len(legends) == 2 and all(leg.get_window_extent().x0 >= box.x1 for leg in legends)
    # the budget line sits inside the plot, not on its frame
    assert axis.get_ylim()[1] > 8.0
    matplotlib.pyplot.close(fig)


def _empirical(claimed: float | None, reach: float | None) -> dict:
    e = {
        "org": "org-0", "method": "test", "kind": "text", "claimed_epsilon": claimed, "round": 3, "canaries": 200,
        "included": 101, "guesses": 40, "correct": 30, "confidence": 0.95, "delta": 1e-5,
        "epsilon_lower_bound": 0.4, "consistent": True,
    }  # fmt: skip
    if reach is not None:
        e["max_reachable_epsilon"] = reach
    return e


def test_the_report_says_when_a_claim_is_beyond_the_audits_reach():
    low = AuditResult("test", [_org("org-0", 3)], [], empirical=_empirical(8.0, None))  # an old file: recomputed
    text = markdown(low)
    assert "The most this audit can show (every guess right): epsilon >= 2.548" in text
    assert "cannot contradict a claim above 2.55" in text
    assert "cannot contradict a claim above 2.55" in html_page(low)
    high = AuditResult("test", [_org("org-0", 3)], [], empirical=_empirical(8.0, 8.11))
    assert "the audit could contradict it" in markdown(high) and "cannot contradict" not in html_page(high)
