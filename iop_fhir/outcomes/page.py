"""The outcomes as HTML pages: a program's report for a period (headline figures, charts, its stays) and one stay's
outcomes. Each page is one self-contained HTML5 document (its styles and SVG charts inline, no script, nothing
fetched), from the plain data of program.outcomes and patient.outcomes; every text value is escaped. The data holds
ids, never names, and so do the pages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date
from html import escape
from typing import Any

from iop_fhir.outcomes import charts
from iop_fhir.outcomes.charts import Chart
from iop_fhir.outcomes.patient import monday, summary

STYLE = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --card: #f6f8fa; --accent: #0072B2; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--ink); background: #fff; }
header, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 20px; border-bottom: 1px solid var(--line); padding-bottom: 10px; }
h1 { font-size: 1.5rem; margin: 0 0 4px; }
h2 { font-size: 1.15rem; margin: 28px 0 10px; }
.meta { color: var(--muted); margin: 0; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(165px, 1fr)); gap: 10px; margin: 0;
  padding: 0; }
.figure { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
  list-style: none; }
.figure .label { display: block; color: var(--muted); font-size: 0.82rem; }
.figure .value { display: block; font-size: 1.55rem; font-weight: 650; line-height: 1.2; }
.figure .count { display: block; color: var(--muted); font-size: 0.82rem; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 16px; }
.charts.small { grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 10px; background: #fff; }
figure.wide { grid-column: 1 / -1; }
figure svg.chart { display: block; width: 100%; height: auto; }
figure.wide svg.chart { max-width: 900px; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 0.85rem; margin-top: 6px; }
.nodata { color: var(--muted); font-style: italic; padding: 18px 4px; margin: 0; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--card); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.day, td.id { white-space: nowrap; }
.scroll { overflow-x: auto; }
code, span.id, a.id { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.85em; }
a { color: var(--accent); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
footer { color: var(--muted); font-size: 0.8rem; padding-top: 24px; padding-bottom: 24px; }
@media print { figure, .figure { break-inside: avoid; } }
"""


def text(value: Any) -> str:
    """A value as escaped HTML text ('—' for none)."""
    return "—" if value is None or value == "" else escape(str(value))


def percent(value: float | None) -> str:
    return "—" if value is None else f"{round(100 * value)}%"


def document(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def figure_html(chart: Chart, *, wide: bool = False) -> str:
    """A chart in a <figure> captioned with what it shows, or the note that there is nothing to draw."""
    classes = ' class="wide"' if wide else ""
    label = f' aria-label="{escape(chart.title)}"'
    if chart.svg is None:
        return (
            f'<figure{classes}{label} id="{escape(chart.key)}"><p class="nodata">{escape(chart.title)}: no data.</p>'
            f"<figcaption>{escape(chart.description)}</figcaption></figure>"
        )
    return (
        f'<figure{classes}{label} id="{escape(chart.key)}">{chart.svg}'
        f"<figcaption>{escape(chart.description)}</figcaption></figure>"
    )


def headline(label: str, value: str, count: str = "", note: str = "") -> str:
    title = f' title="{escape(note)}"' if note else ""
    count_html = f'<span class="count">{count}</span>' if count else ""
    return (
        f'<li class="figure"{title}><span class="label">{escape(label)}</span>'
        f'<span class="value">{value}</span>{count_html}</li>'
    )


def rate_figure(label: str, found: Mapping[str, Any] | None, note: str = "") -> str:
    found = found or {}
    numerator, denominator = found.get("numerator"), found.get("denominator")
    count = f"{text(numerator)} of {text(denominator)}" if denominator else "no data"
    return headline(label, percent(found.get("rate")), count, note)


def table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]], empty: str) -> str:
    """An HTML table; ``headers`` are (label, the column's CSS class: "num", "day", "id" or ""), ``rows`` cells of
    HTML already escaped; ``empty`` is said when there are no rows."""

    def cls(kind: str) -> str:
        return f' class="{kind}"' if kind else ""

    head = "".join(f'<th scope="col"{cls(kind)}>{escape(h)}</th>' for h, kind in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{cls(kind)}>{cell}</td>" for cell, (_, kind) in zip(row, headers, strict=True)) + "</tr>"
        for row in rows
    )
    if not body:
        return f'<p class="nodata">{escape(empty)}</p>'
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# -- a program ------------------------------------------------------------------------------------------------------


def _period_rows(stays: Sequence[Mapping[str, Any]], period: Mapping[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The stays' complete weeks starting in the period (as program.patient_weeks counts them): the full ones, and
    how many partial ones."""
    start, end = period.get("start"), period.get("end")
    first = monday(date.fromisoformat(start)).isoformat() if start else ""
    rows = [
        r
        for s in stays
        for r in (s.get("hours") or {}).get("weeks") or []
        if r["complete"] and first <= r["start"] and (end is None or r["start"] <= end)
    ]
    full = [r for r in rows if r["days"] == 7]
    return full, len(rows) - len(full)


def _stay_row(stay: Mapping[str, Any], patient_href: Callable[[str], str] | None) -> list[str]:
    eid = str(stay["enrollment_id"])
    link = (
        f'<a class="id" href="{escape(patient_href(eid))}">{escape(eid)}</a>'
        if patient_href is not None
        else f'<span class="id">{escape(eid)}</span>'
    )
    seen = stay.get("attendance") or {}
    attendance = (
        f"{percent(seen.get('rate'))} ({text(seen.get('attended'))}/{text(seen.get('scheduled'))})"
        if seen.get("scheduled")
        else "—"
    )
    hours = stay.get("hours") or {}
    judged = hours.get("weeks_judged")
    weeks = f"{text(hours.get('weeks_meeting_minimum'))} of {text(judged)}" if judged else "—"
    phq = (stay.get("instruments") or {}).get("phq-9")
    phq9 = f"{text(phq['first']['score'])} → {text(phq['latest']['score'])}" if phq else "—"
    return [
        link,
        text(stay.get("program")),
        text(stay.get("admission_date")),
        text(stay.get("discharge_date")) if stay.get("discharge_date") else "ongoing",
        text(stay.get("discharge_reason")),
        attendance,
        weeks,
        phq9,
        _aftercare_cell(stay.get("aftercare") or {}),
    ]


def _aftercare_cell(found: Mapping[str, Any]) -> str:
    if not found.get("referred"):
        return "not referred"
    parts = [text(found.get("status"))]
    if found.get("first_visit"):
        window = " (in window)" if found.get("first_visit_in_window") else ""
        parts.append(f"first visit {text(found['first_visit'])}{window}")
    return "; ".join(parts)


def program_page(
    report: Mapping[str, Any],
    stays: Sequence[Mapping[str, Any]],
    *,
    patient_href: Callable[[str], str] | None = None,
    title: str | None = None,
) -> str:
    """The page of a program's outcomes for a period: ``report`` from program.outcomes, ``stays`` the outcomes
    (patient.outcomes) of the stays it counts; each stay's enrollment id links to ``patient_href(id)`` if given."""
    period = report.get("period") or {}
    program = report.get("program") or "every program"
    title = title or f"IOP outcomes: {program}, {period.get('start', '?')} to {period.get('end', '?')}"
    stays = sorted(stays, key=lambda s: (str(s.get("admission_date")), str(s.get("enrollment_id"))))
    weeks = report.get("weeks") or []
    full, partial = _period_rows(stays, period)
    retention = report.get("retention") or {}
    reasons = report.get("discharge_reasons") or {}
    los = report.get("median_length_of_stay_days")
    figures = [
        headline("Stays", text(report.get("stays", 0)), "enrolled at some time in the period"),
        headline("Admissions", text(report.get("admissions", 0))),
        headline(
            "Discharges",
            text(report.get("discharges", 0)),
            ", ".join(f"{text(k)} {text(v)}" for k, v in reasons.items()),
        ),
        *(
            rate_figure(
                f"Retention at {days} days",
                retention.get(f"{days}_days"),
                f"admissions in the period still enrolled (or completed) {days} days after admission",
            )
            for days in (30, 60, 90)
        ),
        rate_figure("Completion", report.get("completion"), "discharges in the period that completed the program"),
        headline(
            "Median length of stay",
            f"{los:g} days" if isinstance(los, (int, float)) else "—",
            "of the discharges" if los is not None else "no data",
        ),
        rate_figure("Attendance", report.get("attendance"), "scheduled sessions attended"),
        rate_figure("Weeks at ASAM minimum", report.get("asam_minimum"), "complete patient-weeks meeting the minimum"),
        rate_figure("Negative screens", report.get("drug_screens"), "prescribed-only positives count as negative"),
        rate_figure("PHQ-9 response", report.get("phq9_response"), "a reduction of at least half from the first"),
        rate_figure("PHQ-9 remission", report.get("phq9_remission"), "latest score below the remission cut-off"),
        rate_figure("Aftercare accepted", report.get("aftercare_accepted"), "referred discharges accepted"),
        rate_figure(
            "Aftercare first visit",
            report.get("aftercare_first_visit"),
            "referred discharges with a first visit in the window",
        ),
    ]
    program_charts = [
        (charts.census_and_attendance(weeks), True),
        (charts.hours_distribution(full, partial), False),
        (charts.negative_screens(weeks), False),
        (charts.phq9_trajectories(stays), False),
    ]
    headers = [
        ("Enrollment", "id"),
        ("Program", ""),
        ("Admission", "day"),
        ("Discharge", "day"),
        ("Reason", ""),
        ("Attendance", "num"),
        ("Weeks at minimum", "num"),
        ("PHQ-9 first → latest", "num"),
        ("Aftercare", ""),
    ]
    body = f"""<header>
<h1>{escape(title)}</h1>
<p class="meta">Program <strong>{text(program)}</strong> · period {text(period.get("start"))} to \
{text(period.get("end"))} · as of {text(report.get("as_of"))}</p>
</header>
<main>
<h2>Headline figures</h2>
<ul class="figures">{"".join(figures)}</ul>
<h2>Charts</h2>
<div class="charts">{"".join(figure_html(chart, wide=wide) for chart, wide in program_charts)}</div>
<h2>Stays ({len(stays)})</h2>
{table(headers, (_stay_row(s, patient_href) for s in stays), "No stays in this period.")}
</main>
<footer>Computed from the program's records by iop-fhir; rates give their numerator and denominator. Patients are \
shown by enrollment id only.</footer>"""
    return document(title, body)


# -- one stay -------------------------------------------------------------------------------------------------------

SCALES = (("phq-9", "PHQ-9", 27), ("gad-7", "GAD-7", 21))


def _goal_rows(goals: Iterable[Mapping[str, Any]]) -> Iterable[list[str]]:
    for goal in goals:
        achieved = goal.get("achieved")
        yield [
            text(goal.get("description") or goal.get("key")),
            text(goal.get("measure")),
            text(goal.get("target")),
            text(goal.get("due")),
            text(goal.get("status")) if goal.get("status") else "not recorded",
            "yes" if achieved else "no" if achieved is False else "—",
        ]


def _scale_rows(instruments: Mapping[str, Mapping[str, Any]]) -> Iterable[list[str]]:
    def yes_no(value: Any) -> str:
        return "—" if value is None else "yes" if value else "no"

    for name, found in sorted(instruments.items()):
        yield [
            text(name.upper()),
            text(found["count"]),
            f"{text(found['first']['score'])} ({text(found['first']['date'])})",
            f"{text(found['latest']['score'])} ({text(found['latest']['date'])})",
            text(found.get("change")),
            yes_no(found.get("response")),
            yes_no(found.get("remission")),
        ]


def _aftercare_facts(found: Mapping[str, Any]) -> str:
    if not found.get("referred"):
        return '<p class="nodata">No referral to aftercare.</p>'
    window = found.get("first_visit_in_window")
    facts = [
        ("Partner", text(found.get("partner"))),
        ("Service", text(found.get("service"))),
        ("Status", text(found.get("status"))),
        ("Accepted", f"yes, {text(found.get('accepted_at'))}" if found.get("accepted") else "no"),
        ("First visit", text(found.get("first_visit"))),
        (
            f"Within {text(found.get('window_days'))} days of discharge",
            "—" if window is None else "yes" if window else "no",
        ),
    ]
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"


def patient_page(outcome: Mapping[str, Any], *, title: str | None = None) -> str:
    """The page of one stay's outcomes (``outcome`` from patient.outcomes)."""
    eid = outcome.get("enrollment_id")
    title = title or f"Stay outcomes: enrollment {eid}"
    seen = outcome.get("attendance") or {}
    hours = outcome.get("hours") or {}
    screens = outcome.get("drug_screens") or {}
    instruments = outcome.get("instruments") or {}
    craving = outcome.get("craving") or {}
    goals = outcome.get("goals") or {}
    admission = str(outcome.get("admission_date"))
    stay_charts = [
        charts.attendance_by_service(seen.get("by_service") or {}),
        charts.weekly_hours(hours),
        charts.screens_by_week(screens.get("weeks") or []),
    ]
    scale_charts = [
        *(
            charts.trajectory(
                key.replace("-", ""), label, admission, (instruments.get(key) or {}).get("scores") or [], top
            )
            for key, label, top in SCALES
        ),
        charts.trajectory("craving", "Craving", admission, craving.get("points") or [], 10),
    ]
    facts = [
        ("Enrollment", f'<span class="id">{text(eid)}</span>'),
        ("Program", text(outcome.get("program"))),
        ("Admission", text(outcome.get("admission_date"))),
        ("Discharge", text(outcome.get("discharge_date")) if outcome.get("discharge_date") else "ongoing"),
        ("Reason", text(outcome.get("discharge_reason"))),
        ("Length of stay", f"{text(outcome.get('length_of_stay_days'))} days"),
    ]
    missed = ", ".join(f"{text(k)} {text(v)}" for k, v in (seen.get("missed") or {}).items())
    judged = hours.get("weeks_judged")
    figures = [
        headline(
            "Attendance",
            percent(seen.get("rate")),
            f"{text(seen.get('attended'))} of {text(seen.get('scheduled'))}" if seen.get("scheduled") else "no data",
            f"missed: {missed}" if missed else "",
        ),
        headline(
            "Weeks at ASAM minimum",
            f"{text(hours.get('weeks_meeting_minimum'))}/{text(judged)}" if judged else "—",
            f"minimum {text(hours.get('minimum_per_week'))} h a week",
        ),
        headline(
            "Median hours a week",
            text(hours.get("median_per_week")),
            f"plan {text(hours.get('planned_per_week'))} h" if hours.get("planned_per_week") is not None else "no plan",
        ),
        headline(
            "Negative screens",
            percent(screens.get("negative_rate")),
            f"{text(screens.get('negative', 0) + screens.get('expected_positive', 0))} of "
            f"{text(screens.get('screens'))}; {text(screens.get('missed', 0))} missed"
            if screens.get("screens")
            else "no data",
        ),
        headline(
            "Goals achieved",
            f"{text(goals.get('achieved'))}/{text(goals.get('total'))}" if goals.get("total") else "—",
        ),
        headline("Craving trend", text(craving.get("trend")), f"{text(craving.get('slope_per_week'))} a week"),
    ]
    try:
        paragraph = f"<p>{escape(summary(outcome))}</p>"
    except (KeyError, TypeError, ZeroDivisionError):  # an outcome of an older shape: the figures say it all
        paragraph = ""
    scale_headers = [
        ("Scale", ""),
        ("Scores", "num"),
        ("First", "num"),
        ("Latest", "num"),
        ("Change", "num"),
        ("Response", ""),
        ("Remission", ""),
    ]
    goal_headers = [("Goal", ""), ("Measure", ""), ("Target", ""), ("Due", "day"), ("Outcome", ""), ("Achieved", "")]
    body = f"""<header>
<h1>{escape(title)}</h1>
<dl class="facts">{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)}</dl>
</header>
<main>
{paragraph}
<ul class="figures">{"".join(figures)}</ul>
<h2>Attendance, treatment hours and drug screens</h2>
<div class="charts">{"".join(figure_html(c) for c in stay_charts)}</div>
<h2>Symptoms and craving</h2>
<div class="charts small">{"".join(figure_html(c) for c in scale_charts)}</div>
<h2>Symptom scales</h2>
{table(scale_headers, _scale_rows(instruments), "No symptom scale was scored.")}
<h2>Goals</h2>
{table(goal_headers, _goal_rows(goals.get("goals") or []), "The treatment plan has no goals.")}
<h2>Aftercare</h2>
{_aftercare_facts(outcome.get("aftercare") or {})}
</main>
<footer>Computed from the stay's records by iop-fhir. The patient is shown by enrollment id only.</footer>"""
    return document(title, body)
