"""The /iop outcomes: one stay's (GET /iop/enrollments/{id}/outcomes) and a program's over a period (GET
/iop/outcomes), as JSON, CSV or HTML pages. The figures come from iop_fhir/outcomes; this module reads the request's
parameters, loads the stays through the app's outcome reader, and notes the resources each answer was computed from
in the request's audit trail. A program's report is computed again only when what it depends on changed: it is kept
(the reader's ReportCache) under the keys of the stays it was computed from, the query, the patients and the day."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from flask import current_app, request

from iop_fhir.errors import BadRequest, NotFound
from iop_fhir.iop import schemas, web
from iop_fhir.outcomes import load, patient
from iop_fhir.outcomes import program as figures
from iop_fhir.outcomes.load import Loaded, Reader
from iop_fhir.outcomes.program import Period
from iop_fhir.privacy import trail

PROGRAM_PARAMETERS = ("program", "from", "to")
# Without `from`, a program's outcomes cover the 12 weeks up to `to` (today unless given).
DEFAULT_WEEKS = 12


def _reader() -> Reader:
    found: Reader = current_app.extensions["iop_fhir.outcomes"]
    return found


def today() -> date:
    return date.today()


def _noted(loaded: Loaded, enrollment_ids: list[str]) -> None:
    """The stays' resources in the request's audit trail: what the answer was computed from."""
    current = trail.current()
    if current is not None:
        current.saw_references([ref for eid in enrollment_ids for ref in loaded.references.get(eid, [])])


def enrollment(record_id: str) -> dict[str, Any]:
    """One stay's outcomes; 404 for an enrollment that does not exist or was retracted."""
    reader = _reader()
    loaded = reader.stays(enrollment_id=record_id)
    if not loaded.stays:
        raise NotFound(f"there is no enrollment record with id {record_id[:80]!r}", "id")
    _noted(loaded, [record_id])
    return patient.outcomes(loaded.stays[0], reader.rules, today())


@dataclass(frozen=True)
class Query:
    program: str | None
    period: Period


def _date(name: str) -> date | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if not schemas.DATE_ONLY.fullmatch(raw):
        raise BadRequest(f"{name} must be a date (YYYY-MM-DD), got {raw[:40]!r}", name)
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name} is not a calendar date: {raw[:40]!r}", name) from None


def program_query() -> Query:
    """program (a program code, every program if absent), from and to (dates; to defaults to today, from to 12 weeks
    before to)."""
    web.check_parameters(PROGRAM_PARAMETERS)
    code = request.args.get("program")
    programs = _reader().programs
    if code is not None and code not in programs:
        raise BadRequest(f"program must be one of: {', '.join(sorted(programs))}; got {code[:40]!r}", "program")
    end = _date("to") or today()
    start = _date("from") or end - timedelta(weeks=DEFAULT_WEEKS) + timedelta(days=1)
    if start > end:
        raise BadRequest(f"from ({start.isoformat()}) is after to ({end.isoformat()})", "from")
    if (end - start).days >= figures.MAX_PERIOD_DAYS:
        raise BadRequest(
            f"the period {start.isoformat()} to {end.isoformat()} is longer than {figures.MAX_PERIOD_DAYS} days; "
            "ask for five years or less",
            "from",
        )
    return Query(code, Period(start, end))


@dataclass
class _Computed:
    """A program's report as computed, the enrollments of the stays it counts, and (once a page asked) the outcomes
    of each of those stays. Shared by the requests that take it from the cache: read only."""

    report: dict[str, Any]
    counted: list[str]
    each: list[Mapping[str, Any]] | None = None


def program_outcomes(
    query: Query, *, each: bool = True, patients: frozenset[str] | None = None
) -> tuple[dict[str, Any], list[Mapping[str, Any]]]:
    """The program's outcomes for the period, and (``each``: the pages want them) the outcomes of each stay it
    counts, over the stays of ``patients`` (a partner's restriction; None: every patient). Only the stays that can
    overlap the period are read.

    The answer is the one kept from an earlier request when every stay read now was taken as kept under the same key
    (outcomes/load.py Loaded.built_from: the same enrollments, each unchanged) for the same query, patients and day,
    computed with the process's rules; computed (and kept) otherwise."""
    reader = _reader()
    loaded = reader.stays(patients=patients, program=query.program, period=query.period)
    now, rules = today(), reader.rules
    key = (loaded.built_from, query.program, query.period, patients, now)
    computed = reader.reports.get(key, rules) if loaded.all_kept and loaded.built_from is not None else None
    if not isinstance(computed, _Computed):
        group = figures.cohort(loaded.stays, query.period, query.program)
        report = figures.outcomes(group, rules, query.period, now, query.program)
        computed = _Computed(report, [s.enrollment_id for s in group])
        if loaded.built_from is not None:
            reader.reports.put(key, rules, computed)
    _noted(loaded, computed.counted)
    if not each:
        return computed.report, []
    if computed.each is None:
        counted = load.stays_of(loaded, computed.counted)
        computed.each = [patient.outcomes(s, rules, now) for s in counted]
    return computed.report, computed.each


def csv_text(report: dict[str, Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(figures.csv_rows(report))
    return out.getvalue()
