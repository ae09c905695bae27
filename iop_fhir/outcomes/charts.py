"""The charts of the outcome pages (page.py): matplotlib figures drawn from the outcomes' plain data and rendered to
SVG text for inlining. Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot, whose global
figure registry is not safe for the service's threads; the matplotlib settings a chart needs are applied around each
drawing under one lock, so that concurrent pages neither race on them nor leave them changed."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from statistics import median
from typing import Any

import matplotlib
from matplotlib import dates as mdates
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

# Okabe-Ito: told apart by readers with colour-vision deficiency; the below-minimum bars are also hatched.
BLUE, ORANGE, SKY, GREEN, VERMILLION, PURPLE, GREY = (
    "#0072B2",
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#8C8C8C",
)

# Text stays text (<text>, readable and selectable, in the page's font), ids are hashed with a constant salt so that
# the same data draws the same SVG, and the style is that of the pages.
_SETTINGS: Any = {  # matplotlib types the keys as a Literal of every setting
    "svg.fonttype": "none",
    "svg.hashsalt": "iop-fhir-outcomes",
    "text.parse_math": False,  # labels from the records (service codes) are text, never TeX
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica", "sans-serif"],
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#555555",
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "hatch.linewidth": 0.8,
}
_LOCK = threading.Lock()
_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.DOTALL)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_ROOT = re.compile(r"<svg\b[^>]*>")
_SIZE = re.compile(r'\s(width|height)="[^"]*"')
_IDS = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')

WIDE = (7.2, 3.4)  # inches: a chart across the page
HALF = (5.4, 3.4)  # a chart in a column of two


@dataclass(frozen=True)
class Chart:
    """A chart of a page: its key (unique in the page: it prefixes the SVG's ids), title, a description for readers
    who do not see it, and the SVG (None: nothing to draw, the page says so instead)."""

    key: str
    title: str
    description: str
    svg: str | None


def draw(
    key: str,
    title: str,
    description: str,
    size: tuple[float, float],
    paint: Callable[[Figure], None],
    margins: tuple[float, float, float, float] = (0.7, 0.2, 0.55, 0.65),
) -> Chart:
    """The chart ``paint`` draws on a new figure of ``size`` inches with ``margins`` inches (left, right, bottom,
    top) around its axes for their labels, as SVG for inlining. The margins are fixed rather than found by a layout
    engine, which would measure every text twice."""
    width, height = size
    left, right, bottom, top = margins
    with _LOCK, matplotlib.rc_context(_SETTINGS):
        figure = Figure(figsize=size)
        figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
        paint(figure)
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None})
    return Chart(key, title, description, inline(out.getvalue(), key, title))


def inline(svg: str, key: str, label: str) -> str:
    """matplotlib's SVG document as an element of an HTML page: no XML prolog or doctype, no RDF metadata, ids
    prefixed by ``key`` (several charts share a page), sized by the page's CSS from its viewBox, and labelled."""
    svg = _METADATA.sub("", _PROLOG.sub("", svg, count=1), count=1)
    svg = _IDS.sub(lambda m: f"{m.group(1)}{key}-{m.group(2)}", svg)
    root = _ROOT.search(svg)
    assert root is not None  # matplotlib writes one
    tag = _SIZE.sub("", root.group(0))[:-1] + ' class="chart" role="img" focusable="false">'
    escaped = label.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"{tag}<title>{escaped}</title>{svg[root.end() :].strip()}"


# -- helpers --------------------------------------------------------------------------------------------------------


def _day(value: str) -> date:
    return date.fromisoformat(value[:10])


def _date_axis(axes: Any, days: Sequence[date]) -> None:
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if days:
        axes.set_xlim(mdates.date2num(days[0] - timedelta(days=4)), mdates.date2num(days[-1] + timedelta(days=4)))


def _percent_axis(axes: Any) -> None:
    axes.set_ylim(0, 1.05)
    axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _whole_numbers(axis: Any) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def _heading(axes: Any, title: str, handles: Sequence[Any] | None = None) -> None:
    """The chart's title at the top left and, under it, its legend in one row above the axes (never over the
    data)."""
    handles = list(handles if handles is not None else axes.get_legend_handles_labels()[0])
    axes.set_title(title, pad=22 if handles else 8)
    if handles:
        axes.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(0, 1.0),
            ncols=len(handles),
            borderaxespad=0.3,
            handlelength=1.6,
            columnspacing=1.2,
        )


# -- the program ----------------------------------------------------------------------------------------------------


def census_and_attendance(weeks: Sequence[Mapping[str, Any]]) -> Chart:
    title = "Census and attendance by week"
    description = (
        "Bars: patients enrolled during each week of the period. Line: the share of sessions scheduled for "
        "patients that week that they attended (late and left early count as attended). Pale bars: weeks not over."
    )
    if not any(w["census"] for w in weeks):
        return Chart("census", title, description, None)

    def paint(figure: Figure) -> None:
        days = [_day(w["week"]) for w in weeks]
        x = mdates.date2num(days)
        axes = figure.add_subplot()
        colours = [SKY if w.get("in_progress") else BLUE for w in weeks]
        axes.bar(x, [w["census"] for w in weeks], width=5, color=colours, alpha=0.85, label="Patients enrolled")
        axes.set_ylabel("Patients enrolled")
        _whole_numbers(axes.yaxis)
        axes.set_xlabel("Week starting")
        _date_axis(axes, days)
        rates = axes.twinx()
        rates.spines["right"].set_visible(True)
        rates.grid(False)
        shown = [(xi, w["attendance_rate"]) for xi, w in zip(x, weeks, strict=True) if w["attendance_rate"] is not None]
        rates.plot(
            [p[0] for p in shown],
            [p[1] for p in shown],
            color=ORANGE,
            linewidth=2,
            marker="o",
            markersize=3.5,
            label="Attendance rate",
        )
        _percent_axis(rates)
        rates.set_ylabel("Sessions attended")
        _heading(axes, title, [Patch(color=BLUE, label="Patients enrolled"), *rates.get_lines()])

    return draw("census", title, description, WIDE, paint, margins=(0.7, 0.7, 0.55, 0.65))


def hours_distribution(rows: Sequence[Mapping[str, Any]], partial: int) -> Chart:
    """Delivered hours of full patient-weeks (``rows``: the stays' hours.weeks rows); ``partial`` weeks (admission or
    discharge mid-week, their minimum prorated) are left out of the picture."""
    title = "Treatment hours per patient-week"
    minimums = sorted({float(r["minimum"]) for r in rows})
    description = (
        "Histogram of the treatment hours delivered in each full calendar week of a stay that began in the period, "
        "split by whether the week met the ASAM level 2.1 minimum; the dashed line is the weekly minimum "
        f"({', '.join(f'{m:g} hours' for m in minimums) or 'none'})."
    )
    if partial:
        description += (
            f" {partial} partial week{'s' if partial != 1 else ''} (admission or discharge mid-week) not shown."
        )
    if not rows:
        return Chart("hours", title, description, None)

    def paint(figure: Figure) -> None:
        axes = figure.add_subplot()
        values = [float(r["delivered"]) for r in rows]
        top = max([*values, *minimums]) + 1
        edges = [float(i) for i in range(int(top) + 2)]
        below = [float(r["delivered"]) for r in rows if not r["meets_minimum"]]
        meets = [float(r["delivered"]) for r in rows if r["meets_minimum"]]
        axes.hist(
            [below, meets],
            bins=edges,
            stacked=True,
            color=[VERMILLION, BLUE],
            hatch=["//", ""],
            edgecolor="white",
            linewidth=0.6,
            label=["Below the minimum", "Met the minimum"],
        )
        for minimum in minimums:
            axes.axvline(minimum, color="#222222", linestyle="--", linewidth=1.4)
        axes.plot(
            [], [], color="#222222", linestyle="--", label=f"Minimum ({' / '.join(f'{m:g}' for m in minimums)} h)"
        )
        axes.set_xlim(0, edges[-1])
        _whole_numbers(axes.yaxis)
        axes.set_xlabel("Treatment hours delivered in the week")
        axes.set_ylabel("Patient-weeks")
        handles, labels = axes.get_legend_handles_labels()
        _heading(axes, title, handles)

    return draw("hours", title, description, HALF, paint)


def negative_screens(weeks: Sequence[Mapping[str, Any]]) -> Chart:
    title = "Negative drug screens by week"
    description = (
        "Line: the share of the week's drug screens that were negative (positive only for prescribed medication "
        "counts as negative). Grey bars: screens collected that week."
    )
    if not any(w["screens"] for w in weeks):
        return Chart("screens", title, description, None)

    def paint(figure: Figure) -> None:
        days = [_day(w["week"]) for w in weeks]
        x = mdates.date2num(days)
        axes = figure.add_subplot()
        counts = axes.twinx()
        counts.bar(x, [w["screens"] for w in weeks], width=5, color="#d9d9d9", label="Screens collected")
        counts.set_ylabel("Screens collected")
        counts.spines["right"].set_visible(True)
        counts.grid(False)
        _whole_numbers(counts.yaxis)
        axes.set_zorder(counts.get_zorder() + 1)
        axes.patch.set_visible(False)
        shown = [(xi, w["negative_screen_rate"]) for xi, w in zip(x, weeks, strict=True) if w["screens"]]
        axes.plot(
            [p[0] for p in shown],
            [p[1] for p in shown],
            color=GREEN,
            linewidth=2,
            marker="o",
            markersize=3.5,
            label="Negative rate",
        )
        _percent_axis(axes)
        axes.set_ylabel("Screens negative")
        axes.set_xlabel("Week starting")
        _date_axis(axes, days)
        _heading(axes, title, [*axes.get_lines(), Patch(color="#d9d9d9", label="Screens collected")])

    return draw("screens", title, description, HALF, paint, margins=(0.7, 0.7, 0.55, 0.65))


def _days_since(admission: str, scores: Iterable[Mapping[str, Any]]) -> list[tuple[int, float]]:
    start = _day(admission)
    return [((_day(s["date"]) - start).days, float(s["score"])) for s in scores]


def median_trajectory(trajectories: Sequence[Sequence[tuple[int, float]]], step: int = 7) -> list[tuple[int, float]]:
    """The median score every ``step`` days since admission, over the stays measured both before and after that day
    (each stay's score read off the straight line between its scores); days with fewer than three such stays (one
    when fewer than three stays have two scores) have none."""
    spans = [t for t in trajectories if len(t) > 1]
    if not spans:
        return []
    enough = 3 if len(spans) >= 3 else 1
    last = max(t[-1][0] for t in spans)
    found = []
    for day in range(0, last + 1, step):
        values = [_at(t, day) for t in spans if t[0][0] <= day <= t[-1][0]]
        if len(values) >= enough:
            found.append((day, float(median(values))))
    return found


def _at(points: Sequence[tuple[int, float]], day: int) -> float:
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= day <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (day - x0) / (x1 - x0)
    return points[-1][1]


def phq9_trajectories(stays: Sequence[Mapping[str, Any]]) -> Chart:
    title = "PHQ-9 from admission"
    trajectories = [
        _days_since(s["admission_date"], s["instruments"]["phq-9"]["scores"])
        for s in stays
        if (s.get("instruments") or {}).get("phq-9")
    ]
    description = (
        f"One thin line per stay ({len(trajectories)} stays with a PHQ-9): total score by days since admission. "
        "Bold line: the median of the stays measured before and after each week's day. Scores of 5, 10, 15 and 20 "
        "begin mild, moderate, moderately severe and severe depression."
    )
    if not trajectories:
        return Chart("phq9", title, description, None)

    def paint(figure: Figure) -> None:
        axes = figure.add_subplot()
        for low, high, shade in ((10, 15, "#fbf3e4"), (15, 20, "#f8e6d0"), (20, 27, "#f5d9c2")):
            axes.axhspan(low, high, color=shade, linewidth=0, zorder=0)
        lines = [t for t in trajectories if len(t) > 1]
        axes.add_collection(LineCollection(lines, colors=PURPLE, linewidths=0.8, alpha=0.45))
        single = [t[0] for t in trajectories if len(t) == 1]
        axes.plot(
            [p[0] for p in single], [p[1] for p in single], linestyle="none", marker="o", markersize=2.5, color=PURPLE
        )
        typical = median_trajectory(trajectories)
        if typical:
            axes.plot(
                [p[0] for p in typical],
                [p[1] for p in typical],
                color="#222222",
                linewidth=2.6,
                marker="o",
                markersize=4,
                label="Median",
            )
        axes.plot([], [], color=PURPLE, linewidth=0.8, label="One stay")
        last = max(p[0] for t in trajectories for p in t)
        axes.set_xlim(-2, max(last, 28) + 2)
        axes.set_ylim(0, 27)
        axes.set_yticks([0, 5, 10, 15, 20, 27])
        axes.set_xlabel("Days since admission")
        axes.set_ylabel("PHQ-9 total score")
        _heading(axes, title)

    return draw("phq9", title, description, HALF, paint)


# -- one stay -------------------------------------------------------------------------------------------------------


def attendance_by_service(by_service: Mapping[str, Mapping[str, Any]]) -> Chart:
    title = "Attendance by service"
    description = (
        "For each service, the sessions scheduled for the patient split into attended (late and left early "
        "included) and missed."
    )
    services = [(name, tally) for name, tally in sorted(by_service.items()) if tally["scheduled"]]
    if not services:
        return Chart("attendance", title, description, None)

    def paint(figure: Figure) -> None:
        axes = figure.add_subplot()
        names = [name for name, _ in services][::-1]
        attended = [tally["attended"] for _, tally in services][::-1]
        missed = [tally["scheduled"] - tally["attended"] for _, tally in services][::-1]
        axes.barh(names, attended, color=BLUE, label="Attended")
        axes.barh(names, missed, left=attended, color=VERMILLION, hatch="//", edgecolor="white", label="Missed")
        for y, (got, lost) in enumerate(zip(attended, missed, strict=True)):
            axes.annotate(
                f"{got}/{got + lost}", xy=(got + lost, y), xytext=(3, 0), textcoords="offset points", va="center"
            )
        axes.set_xlim(0, max(a + m for a, m in zip(attended, missed, strict=True)) * 1.15 + 0.5)
        _whole_numbers(axes.xaxis)
        axes.grid(axis="y", visible=False)
        axes.set_xlabel("Sessions scheduled")
        _heading(axes, title)

    height = max(2.6, 1.3 + 0.3 * len(services))
    # The service names label the bars: room for the longest (about 0.07 inch a character at 9 points).
    left = 0.2 + 0.07 * max(len(name) for name, _ in services)
    return draw("attendance", title, description, (HALF[0], height), paint, margins=(left, 0.2, 0.55, 0.65))


def weekly_hours(hours: Mapping[str, Any]) -> Chart:
    title = "Treatment hours by week"
    rows = hours.get("weeks") or []
    below = hours.get("weeks_below_minimum") or []
    description = (
        "Bars: treatment hours delivered in each calendar week of the stay. Dashed line: the ASAM level 2.1 "
        "minimum; solid line: the hours the treatment plan schedules (both in proportion for a partial week). "
        f"Hatched red bars: weeks below the minimum ({', '.join(str(w) for w in below) or 'none'}). "
        "Pale bars: weeks not over."
    )
    if not rows:
        return Chart("hours", title, description, None)

    def paint(figure: Figure) -> None:
        axes = figure.add_subplot()
        x = [r["week"] for r in rows]
        short = [r["meets_minimum"] is False for r in rows]
        axes.bar(
            x,
            [r["delivered"] for r in rows],
            color=[VERMILLION if s else SKY if not r["complete"] else BLUE for s, r in zip(short, rows, strict=True)],
            hatch=["//" if s else "" for s in short],
            edgecolor="white",
            width=0.7,
        )
        steps = [*x, x[-1] + 1]
        minimum = [r["minimum"] for r in rows]
        axes.stairs(minimum, [s - 0.5 for s in steps], color="#222222", linestyle="--", linewidth=1.4, baseline=None)
        planned = [r["planned"] for r in rows]
        if all(p is not None for p in planned):
            axes.stairs(planned, [s - 0.5 for s in steps], color=GREEN, linewidth=1.6, baseline=None)
        handles = [
            Patch(color=BLUE, label="Delivered"),
            Patch(facecolor=VERMILLION, hatch="//", edgecolor="white", label="Below minimum"),
            axes.plot([], [], color="#222222", linestyle="--", label="ASAM minimum")[0],
        ]
        if all(p is not None for p in planned):
            handles.append(axes.plot([], [], color=GREEN, label="Plan")[0])
        top = max([*(r["delivered"] for r in rows), *minimum, *(p or 0 for p in planned)])
        axes.set_ylim(0, top * 1.1 + 0.2)
        axes.set_xlim(0.4, x[-1] + 0.6)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
        axes.grid(axis="x", visible=False)
        axes.set_xlabel("Week of the stay")
        axes.set_ylabel("Hours")
        _heading(axes, title, handles)

    return draw("hours", title, description, HALF, paint)


SCREEN_STACK = (
    ("negative", "Negative", GREEN, ""),
    ("expected_positive", "Prescribed only", SKY, ""),
    ("positive", "Positive", VERMILLION, ""),
    ("inconclusive", "Inconclusive", GREY, ""),
    ("missed", "Missed", "white", "xx"),
)


def screens_by_week(weeks: Sequence[Mapping[str, Any]]) -> Chart:
    title = "Drug screens by week"
    description = (
        "Stacked bars: the week's drug screens by result (negative; positive only for prescribed medication; "
        "positive; inconclusive) and the screens the plan scheduled that were not collected (missed)."
    )
    if not any(w["screens"] or w["missed"] for w in weeks):
        return Chart("screens", title, description, None)

    def paint(figure: Figure) -> None:
        axes = figure.add_subplot()
        x = [w["week"] for w in weeks]
        bottom = [0] * len(weeks)
        for key, label, colour, hatch in SCREEN_STACK:
            heights = [w[key] for w in weeks]
            if not any(heights):
                continue
            edge = "#555555" if colour == "white" else "white"
            axes.bar(x, heights, bottom=bottom, color=colour, hatch=hatch, edgecolor=edge, width=0.7, label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axes.set_ylim(0, max(bottom) * 1.1 + 0.2)
        axes.set_xlim(0.4, x[-1] + 0.6)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
        _whole_numbers(axes.yaxis)
        axes.grid(axis="x", visible=False)
        axes.set_xlabel("Week of the stay")
        axes.set_ylabel("Screens")
        _heading(axes, title)

    return draw("screens", title, description, HALF, paint)


def trajectory(key: str, label: str, admission: str, scores: Sequence[Mapping[str, Any]], top: int) -> Chart:
    """A symptom scale's (or craving's) scores during the stay, by days since admission, on its whole range."""
    title = f"{label} during the stay"
    description = f"{label} score ({len(scores)} measurements) by days since admission, on its range 0 to {top}."
    if not scores:
        return Chart(key, title, description, None)

    def paint(figure: Figure) -> None:
        axes = figure.add_subplot()
        points = _days_since(admission, scores)
        many = len(points) > 12
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            color=PURPLE if key != "craving" else ORANGE,
            linewidth=1.4 if many else 2,
            marker="o",
            markersize=2.5 if many else 5,
        )
        axes.set_ylim(0, top)
        axes.set_xlim(-2, max(points[-1][0], 28) + 2)
        _whole_numbers(axes.yaxis)
        axes.set_xlabel("Days since admission")
        axes.set_ylabel(f"{label} score")
        _heading(axes, title, [])

    return draw(key, title, description, (3.6, 2.8), paint, margins=(0.6, 0.15, 0.55, 0.35))
