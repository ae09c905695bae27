"""$evaluate-measure on the program's Measures (https://hl7.org/fhir/R4/measure-operation-evaluate-measure.html):
its parameters parsed (pure), and the MeasureReport computed for one client. Part 2 applies as to a search: a
partner's client counts only the stays of patients whose records it may read, a subject it may not see is answered
as one that does not exist, and every patient whose stay was counted is noted in the request's audit trail."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from iop_fhir.errors import BadRequest, NotFound
from iop_fhir.fhir.operation import short
from iop_fhir.fhir.repository import Repository
from iop_fhir.outcomes import measures
from iop_fhir.outcomes.load import Reader
from iop_fhir.outcomes.program import Period
from iop_fhir.privacy import disclosure, trail
from iop_fhir.r4.search import is_id
from iop_fhir.security.access import Access

# What a client needs to evaluate a Measure: to read the Measure and the report, and every type the figures are
# computed from (the enrollment's EpisodeOfCare, sessions, assessments, plans with their goals, medications, the
# transitions' Tasks).
SOURCE_TYPES = ("Patient", "EpisodeOfCare", "Encounter", "Observation", "CarePlan", "Goal", "Task", "MedicationRequest")
REQUIRED_READS = ("Measure", "MeasureReport", *SOURCE_TYPES)
REPORT_TYPES = ("subject", "population", "subject-list")
# Parameters of the R4 operation this server does not implement (answered not-supported, or ignored when lenient).
_UNSUPPORTED = frozenset({"measure", "practitioner", "lastReceivedOn"})
_PARAMETERS = ("periodStart", "periodEnd", "subject", "reportType", "program")
_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


@dataclass(frozen=True)
class EvaluateRequest:
    period: Period
    subject: str | None  # a Patient id
    report_type: str  # subject | population
    program: str | None
    ignored: tuple[str, ...] = ()  # parameters dropped under Prefer: handling=lenient


def parse(params: list[tuple[str, str]], *, programs: frozenset[str], lenient: bool = False) -> EvaluateRequest:
    """The operation's parameters (the query string's, then a POST's Parameters). Each is given at most once;
    periodStart and periodEnd are required (a FHIR date: YYYY, YYYY-MM or YYYY-MM-DD, the start its first day and
    the end its last); ``program`` is one of ``programs`` (this server's extension). A parameter of another name is
    a 400 naming it, unless ``lenient``."""
    given: dict[str, str] = {}
    ignored: list[str] = []
    for name, value in params:
        if name in ("_format", "_pretty"):
            continue  # checked with the Accept header by the view
        if name not in _PARAMETERS:
            if lenient:
                ignored.append(name)
                continue
            if name in _UNSUPPORTED:
                raise BadRequest(
                    f"{name} is not supported by this server's $evaluate-measure", name, code="not-supported"
                )
            raise BadRequest(f"'{short(name)}' is not a parameter of $evaluate-measure", name, code="not-supported")
        if name in given:
            raise BadRequest(f"{name} is given more than once", name)
        given[name] = value
    for name in ("periodStart", "periodEnd"):
        if not given.get(name):
            raise BadRequest(f"{name} is required (a date such as 2026-01-01)", name, code="required")
    period = Period(_date(given["periodStart"], "periodStart"), _date(given["periodEnd"], "periodEnd"))
    if period.end < period.start:
        raise BadRequest("periodEnd is before periodStart", "periodEnd")
    subject = _subject(given["subject"]) if "subject" in given else None
    report_type = given.get("reportType") or ("subject" if subject is not None else "population")
    if report_type not in REPORT_TYPES:
        raise BadRequest(f"reportType '{short(report_type)}' is not one of {', '.join(REPORT_TYPES)}", "reportType")
    if report_type == "subject-list":
        raise BadRequest(
            "reportType subject-list is not supported; ask for population", "reportType", code="not-supported"
        )
    if report_type == "subject" and subject is None:
        raise BadRequest("reportType subject needs a subject (Patient/<id>)", "subject", code="required")
    if report_type == "population" and subject is not None:
        raise BadRequest("a report of one subject is reportType subject, not population", "reportType")
    program = given.get("program") or None
    if program is not None and program not in programs:
        raise BadRequest(f"program '{short(program)}' is not one of {', '.join(sorted(programs))}", "program")
    return EvaluateRequest(period, subject, report_type, program, tuple(ignored))


def _date(value: str, name: str) -> date:
    match = _DATE.fullmatch(value.strip())
    error = BadRequest(f"{name} '{short(value)}' is not a date such as 2026-01-01", name)
    if match is None:
        raise error
    year, month, day = match.group(1), match.group(2), match.group(3)
    try:
        if day is not None:
            return date(int(year), int(month), int(day))
        first = name == "periodStart"
        if month is not None:
            m = int(month)
            return date(int(year), m, 1 if first else calendar.monthrange(int(year), m)[1])
        return date(int(year), 1, 1) if first else date(int(year), 12, 31)
    except ValueError:
        raise error from None


def _subject(value: str) -> str:
    """``Patient/x`` or ``x``: the Patient's id."""
    found = disclosure.patient_id(value) if "/" in value else (value if is_id(value) else None)
    if found is None or ("/" in value and not value.startswith("Patient/")):
        raise BadRequest(f"subject '{short(value)}' is not a Patient such as Patient/123", "subject")
    return found


def evaluate(
    access: Access,
    repository: Repository,
    reader: Reader,
    definitions: dict[str, dict[str, Any]],
    measure_id: str,
    asked: EvaluateRequest,
    today: date,
) -> dict[str, Any]:
    """The MeasureReport of Measure ``measure_id`` for the client of ``access``: 403 naming the first type it may
    not read, 404 for a Measure this server does not define or a subject it does not know (or the client may not
    see, alike)."""
    for res_type in REQUIRED_READS:
        access.require(res_type, "read")
    measure = definitions.get(measure_id)
    if measure is None:
        raise NotFound(f"Measure/{short(measure_id)} is not known")
    restriction = access.restriction
    patients = restriction.patients if restriction is not None else None
    if asked.subject is not None:
        if not _visible_patient(repository, asked.subject):
            raise NotFound(f"subject Patient/{asked.subject} is not known", "subject")
        patients = frozenset({asked.subject}) if patients is None else patients & {asked.subject}
    loaded = reader.stays(patients=patients, program=asked.program, period=asked.period)
    found = measures.evaluation(
        measure, loaded.stays, reader.rules, asked.period, today, subject=asked.subject, program=asked.program
    )
    current = trail.current()
    if current is not None:
        # Each counted stay's resources are its patient's (a partner's audit has a row per patient counted).
        for stay in found.stays:
            patient = {stay.patient} if stay.patient else set()
            current.returned.extend((r, patient) for r in loaded.references.get(stay.enrollment_id, []))
        if asked.subject is not None:
            current.saw_references([f"Patient/{asked.subject}"])
    return found.report


def _visible_patient(repository: Repository, patient_id: str) -> bool:
    """Whether the Patient exists for the client: live, and one it may see."""
    stored = repository.store.read("Patient", patient_id)
    return stored is not None and not stored.deleted and repository.sees(repository.store, stored)
