"""The outcome pages (iop_fhir/outcomes/page.py and charts.py) on hand-built stays: every text value escaped, a page
for an empty report with "no data" notes instead of charts, the same input drawing the same page, and charts that
are inline SVG elements with ids unique in the page. Calendar: 2026-01-05 is a Monday. The stays built here are also
the browser test's (test_pages_in_browser.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.outcomes import charts, page, patient, program, rules, stays
from iop_fhir.outcomes.stays import Stay

RULES = rules.load((Path(__file__).resolve().parents[2] / "mappings" / "outcomes").resolve())
PERIOD = program.Period(date(2026, 1, 5), date(2026, 3, 29))
TODAY = date(2026, 3, 30)
SCRIPT = "<script>alert('x')</script>"

# -- hand-built stays ------------------------------------------------------------------------------------------------

PLAN_INTERVENTIONS = [
    {"service": "group-therapy", "frequency": 3, "period": 1, "period_unit": "wk", "minutes": 180},
    {"service": "individual-counseling", "frequency": 1, "period": 1, "period_unit": "wk", "minutes": 60},
    {"service": "drug-testing", "specimen": "urine", "frequency": 1, "period": 1, "period_unit": "wk"},
]


def _at(day: date, start: str, end: str) -> tuple[str, str]:
    return f"{day.isoformat()}T{start}:00-05:00", f"{day.isoformat()}T{end}:00-05:00"


def sessions_of(
    admitted: date, weeks: int, missed_weeks: Iterable[int] = (), positive_weeks: Iterable[int] = ()
) -> list[dict[str, Any]]:
    """Three 3-hour groups and one counseling hour a week (Mon, Wed, Fri, Tue), and a urine screen each Monday;
    every session of a week in ``missed_weeks`` (1-based) but the Monday is a no-show."""
    found: list[dict[str, Any]] = []
    for week in range(weeks):
        monday = admitted + timedelta(weeks=week)
        for offset, service, end in ((0, "group-therapy", "21:00"), (1, "individual-counseling", "19:00")):
            start, stop = _at(monday + timedelta(days=offset), "18:00", end)
            attendance = "no-show" if week + 1 in missed_weeks and offset else "attended"
            found.append({"service": service, "start": start, "end": stop, "attendance": attendance})
        for offset in (2, 4):
            start, stop = _at(monday + timedelta(days=offset), "18:00", "21:00")
            attendance = "no-show" if week + 1 in missed_weeks else "attended"
            found.append(
                {
                    "service": "group-therapy",
                    "start": start,
                    "end": stop,
                    "attendance": attendance,
                    "craving_score": max(0, 7 - week),
                }
            )
        result = "positive" if week + 1 in positive_weeks else "negative"
        found[-4]["drug_screen"] = {
            "specimen": "urine",
            "collected_at": _at(monday, "18:05", "18:05")[0],
            "results": [{"analyte": "opiates", "result": result}, {"analyte": "cocaine", "result": "negative"}],
        }
    return found


def stay_of(
    number: int,
    admitted: date,
    weeks: int,
    *,
    phq9: Iterable[int] = (),
    reason: str | None = "completed",
    goal: str = "Keep craving at 3 or below",
    missed_weeks: Iterable[int] = (),
    positive_weeks: Iterable[int] = (),
) -> Stay:
    """A stay of ``weeks`` weeks from ``admitted`` (a Monday), a PHQ-9 every four weeks, discharged with ``reason``
    (None: still enrolled) and referred to aftercare."""
    assessments = [
        {
            "performed_at": f"{(admitted + timedelta(weeks=4 * i)).isoformat()}T10:00:00-05:00",
            "instruments": [
                {"instrument": "phq-9", "total_score": score},
                {"instrument": "gad-7", "total_score": max(0, score - 3)},
            ],
        }
        for i, score in enumerate(phq9)
    ]
    plan = {
        "interventions": PLAN_INTERVENTIONS,
        "goals": [
            {"key": "craving", "description": goal, "measure": "craving", "target": 3},
            {"key": "attendance", "description": "Attend 90% of sessions", "target": 0.9},
        ],
    }
    discharge = None
    if reason is not None:
        discharge = {
            "discharge_date": (admitted + timedelta(weeks=weeks, days=-3)).isoformat(),
            "reason": reason,
            "goal_outcomes": [{"goal": "craving", "status": "achieved"}, {"goal": "attendance", "status": "improving"}],
            "referral": {"partner": "passaic-valley-recovery", "service": "outpatient-sud-counseling"},
        }
    transition = [{"event": "accepted", "at": "2026-03-02T09:00:00Z"}] if number % 2 else []
    found = stays.build(
        enrollment_id=f"stay-{number}",
        enrollment={"program": "adult-sud", "admission_date": admitted.isoformat()},
        patient=f"patient-{number}",
        sessions=sessions_of(admitted, weeks, missed_weeks, positive_weeks),
        assessments=assessments,
        plan=plan,
        discharge=discharge,
        transition=transition if discharge is not None else (),
    )
    assert found is not None
    return found


def program_stays() -> list[Stay]:
    """Five stays of the adult program in the first quarter of 2026."""
    monday = date(2026, 1, 5)
    return [
        stay_of(1, monday, 8, phq9=[16, 11, 6]),
        stay_of(2, monday, 6, phq9=[12, 13], reason="against-advice", missed_weeks=[3, 4], positive_weeks=[2, 3]),
        stay_of(3, monday + timedelta(weeks=2), 9, phq9=[19, 12, 8], positive_weeks=[1]),
        stay_of(4, monday + timedelta(weeks=3), 10, phq9=[8], reason=None, missed_weeks=[5]),
        stay_of(5, monday + timedelta(weeks=5), 6, phq9=[14, 9], reason="transferred"),
    ]


def report_of(found: list[Stay]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    group = program.cohort(found, PERIOD, "adult-sud")
    report = program.outcomes(group, RULES, PERIOD, TODAY, "adult-sud")
    return report, [patient.outcomes(s, RULES, TODAY) for s in group]


def svgs(html: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", html, re.DOTALL)


# -- the program page -------------------------------------------------------------------------------------------------


def test_program_page_draws_its_four_charts_inline_and_links_each_stay() -> None:
    report, outcomes = report_of(program_stays())
    html = page.program_page(report, outcomes, patient_href=lambda eid: f"stays/{eid}.html")
    assert html.startswith("<!DOCTYPE html>")
    assert len(svgs(html)) == 4
    for key in ("census", "hours", "screens", "phq9"):
        assert re.search(rf'<figure[^>]* id="{key}"><svg\b', html), key
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html and "<metadata>" not in html
    for number in range(1, 6):
        assert f'<a class="id" href="stays/stay-{number}.html">stay-{number}</a>' in html
    assert "no data." not in html
    # self-contained: nothing fetched (SVG namespaces are names, not requests)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<script" not in html


def test_program_page_headline_figures_carry_numerator_and_denominator() -> None:
    report, outcomes = report_of(program_stays())
    html = page.program_page(report, outcomes)
    attendance = report["attendance"]
    assert attendance["denominator"] > attendance["numerator"] > 0
    expected = f'{round(100 * attendance["rate"])}%</span><span class="count">{attendance["numerator"]} of '
    assert expected + f"{attendance['denominator']}</span>" in html
    assert "PHQ-9 response" in html and "Aftercare first visit" in html
    assert '<span class="id">stay-1</span>' in html  # no link without patient_href


def test_ids_inside_the_charts_are_unique_in_the_page_and_every_reference_resolves() -> None:
    report, outcomes = report_of(program_stays())
    html = page.program_page(report, outcomes)
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))
    referenced = set(re.findall(r'url\(#([^)]+)\)|href="#([^"]+)"', html))
    assert {name for pair in referenced for name in pair if name} <= set(ids)


def test_same_report_draws_the_same_page() -> None:
    report, outcomes = report_of(program_stays())
    first = page.program_page(report, outcomes, patient_href=lambda eid: f"{eid}.html")
    again_report, again_outcomes = report_of(program_stays())
    assert page.program_page(again_report, again_outcomes, patient_href=lambda eid: f"{eid}.html") == first
    one = outcomes[0]
    assert page.patient_page(one) == page.patient_page(report_of(program_stays())[1][0])


def test_pages_drawn_by_concurrent_threads_are_those_drawn_alone() -> None:
    outcomes = report_of(program_stays())[1]
    alone = [page.patient_page(o) for o in outcomes]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(page.patient_page, outcomes)) == alone


def test_empty_report_renders_no_data_notes_instead_of_charts() -> None:
    report = program.outcomes([], RULES, PERIOD, TODAY, "adolescent-sud")
    html = page.program_page(report, [])
    assert svgs(html) == []
    for title in (
        "Census and attendance by week",
        "Treatment hours per patient-week",
        "Negative drug screens by week",
        "PHQ-9 from admission",
    ):
        assert f"{title}: no data." in html
    assert "No stays in this period." in html
    assert "0 of 0" not in html  # rates with nothing to count say so, not 0%


def test_report_of_every_program_without_weeks_is_no_data_too() -> None:
    report = program.outcomes([], RULES, PERIOD, TODAY, None)
    html = page.program_page({**report, "weeks": []}, [])
    assert "Census and attendance by week: no data." in html
    assert "IOP outcomes: every program, 2026-01-05 to 2026-03-29" in html


def test_every_text_value_of_the_program_page_is_escaped() -> None:
    report, outcomes = report_of(program_stays())
    hostile = {**report, "program": SCRIPT, "discharge_reasons": {SCRIPT: 1}}
    stays_ = [{**outcomes[0], "enrollment_id": SCRIPT, "discharge_reason": SCRIPT}, *outcomes[1:]]
    html = page.program_page(hostile, stays_, patient_href=lambda eid: f'x" onclick="{eid}', title=SCRIPT)
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert 'onclick="' not in html
    assert 'href="x&quot; onclick=&quot;&lt;script&gt;' in html


def test_every_text_value_of_the_patient_page_is_escaped() -> None:
    found = stay_of(1, date(2026, 1, 5), 4, phq9=[14, 9], goal=SCRIPT)
    outcome = patient.outcomes(found, RULES, TODAY)
    outcome["aftercare"]["partner"] = SCRIPT
    outcome["attendance"]["by_service"][SCRIPT] = outcome["attendance"]["by_service"]["group-therapy"]
    html = page.patient_page(outcome, title=SCRIPT)
    assert "<script" not in html
    assert html.count("&lt;script&gt;") >= 3  # title, goal, partner
    assert "<title>&lt;script&gt;" in html


# -- the patient page -------------------------------------------------------------------------------------------------


def test_patient_page_draws_hours_with_the_weeks_below_minimum_marked() -> None:
    found = stay_of(2, date(2026, 1, 5), 6, phq9=[12, 13], missed_weeks=[3, 4], positive_weeks=[2])
    outcome = patient.outcomes(found, RULES, TODAY)
    assert outcome["hours"]["weeks_below_minimum"] == [3, 4]
    html = page.patient_page(outcome)
    assert len(svgs(html)) == 6  # attendance, hours, screens, PHQ-9, GAD-7, craving
    assert "Hatched red bars: weeks below the minimum (3, 4)." in html
    assert "Keep craving at 3 or below" in html and "improving" in html
    assert "passaic-valley-recovery" in html
    assert "Stay outcomes: enrollment stay-2" in html


def test_patient_page_of_a_stay_without_sessions_or_scores_says_no_data() -> None:
    found = stays.build(
        enrollment_id="E0", enrollment={"program": "adult-sud", "admission_date": "2026-03-30"}, patient="P0"
    )
    assert found is not None
    html = page.patient_page(patient.outcomes(found, RULES, TODAY))
    # its first week has begun: 0 hours so far against the minimum; nothing else to draw
    assert len(svgs(html)) == 1 and re.search(r'<figure[^>]* id="hours"><svg\b', html)
    titles = ("Attendance by service", "Drug screens by week", "PHQ-9 during the stay", "GAD-7 during the stay")
    for title in (*titles, "Craving during the stay"):
        assert f"{title}: no data." in html
    assert "No referral to aftercare." in html
    assert "The treatment plan has no goals." in html


# -- the charts -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trajectories", "expected"),
    [
        # three stays measured from day 0 to 28: medians at 0, 7, 14, 21, 28 of the straight lines
        (
            [[(0, 20.0), (28, 8.0)], [(0, 10.0), (28, 6.0)], [(0, 14.0), (28, 14.0)]],
            [(0, 14.0), (7, 14.0), (14, 14.0), (21, 11.0), (28, 8.0)],
        ),
        # day 14 has only two stays measured on both sides of it: no median there
        ([[(0, 10.0), (28, 6.0)], [(0, 12.0), (7, 10.0)], [(0, 9.0), (28, 3.0)]], [(0, 10.0), (7, 9.0)]),
        # fewer than three stays: their own median wherever one is measured
        ([[(0, 12.0), (14, 6.0)], [(0, 20.0)]], [(0, 12.0), (7, 9.0), (14, 6.0)]),
        ([[(0, 12.0)]], []),
    ],
)
def test_median_trajectory_reads_the_stays_measured_around_each_week(
    trajectories: list[list[tuple[int, float]]], expected: list[tuple[int, float]]
) -> None:
    assert charts.median_trajectory(trajectories) == expected


def test_hours_histogram_leaves_partial_weeks_out_and_says_how_many() -> None:
    full = {"complete": True, "days": 7, "delivered": 10.0, "minimum": 9.0, "meets_minimum": True}
    chart = charts.hours_distribution([full, {**full, "delivered": 6.0, "meets_minimum": False}], partial=2)
    assert chart.svg is not None and "2 partial weeks" in chart.description
    assert chart.svg.startswith('<svg xmlns:xlink="http://www.w3.org/1999/xlink" viewBox=')
    assert 'role="img"' in chart.svg and "<title>Treatment hours per patient-week</title>" in chart.svg
