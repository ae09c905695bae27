"""The transition-of-care document of a discharge: a FHIR document (Bundle of type document) shaped as PACIO
Transitions of Care 1.0 (hl7.fhir.us.pacio-toc STU1, TOC Bundle and TOC Composition), sent to the aftercare partner
with every transition (exchange/transitions.py) and rendered for people without FHIR.

The Composition is a Transfer summary note (LOINC 18761-7, the code the IG fixes as its category, used as its type
too) about the Patient, by the clinician of the discharge assessment (else the program Organization), kept by the
program Organization (custodian). It has every section the IG requires (all 1..1), each with a generated narrative
and, where the program recorded something, entries referring to resources in the Bundle; a section the program
records nothing for says so with an emptyReason (list-empty-reason notasked, or nilknown where the program asks but
found nothing). Where the IG restricts a section's entries to types the program does not produce (advance
directives: ADI DocumentReferences; medications: MedicationRequest and Medication), the program's own resources go in
a sub-section (unconstrained by the IG): the Consent that permits this disclosure, and the MedicationStatements and
MedicationDispenses. The author is a Practitioner as the IG profiles it when a discharge assessment names its
clinician; the program Organization is author otherwise (base R4 admits it, the IG profile does not).

Identity: Composition.identifier stays the same for all documents of a discharge (R4: version-independent), the
Bundle.identifier names one document and is derived from its content, so a package rebuilt from unchanged records
carries the same document (a replay creates nothing new at the receiver: the transaction updates the Bundle by that
identifier); a corrected discharge gives another identifier and Composition.relatesTo replaces the previous one. A
retracted discharge's document is entered-in-error, replacing the one sent.

Privacy: only the discharge's patient's resources are carried (anything naming another Patient is dropped), none
labelled beyond the program's Part 2 labels (a counseling note's PSYTHPN), each with the Part 2 labels, and the Bundle
and Composition carry them with the 42 CFR §2.32 redisclosure notice, also printed in the Composition's narrative.

https://hl7.org/fhir/R4/documents.html, https://hl7.org/fhir/us/pacio-toc/STU1/
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, timedelta
from html import escape
from typing import Any

import orjson

from iop_fhir.exchange.followup import scheduled_for
from iop_fhir.mapping import ids
from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.privacy.disclosure import REDISCLOSURE_NOTICE, redisclosure_mark

LOINC = "http://loinc.org"
# PACIO ToC's temporary code system (input/fsh/CodeSystem.fsh, id toc-temp-cs) for the behavioral health section.
TOC_TEMP_CS = "http://hl7.org/fhir/us/pacio-toc/CodeSystem/toc-temp-cs"
EMPTY_REASON = "http://terminology.hl7.org/CodeSystem/list-empty-reason"
DOCUMENT_SYSTEM = "urn:ietf:rfc:3986"
XHTML = "http://www.w3.org/1999/xhtml"
# TOC Composition: category fixed to LOINC 18761-7 "Transfer Summary Note"; type from doc-typecodes (extensible).
TRANSFER_SUMMARY = {"system": LOINC, "code": "18761-7", "display": "Transfer Summary Note"}
# Drug screens of this many days before the discharge go in the results section.
RESULTS_DAYS = 30
PART2 = ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "42CFRPart2")
_DEFAULT_LABELS = {(label["system"], label["code"]) for label in PART2_LABELS}

# The TOC Composition's section slices (input/fsh/TOCComposition.fsh @93b0940), in the order the document shows them:
# slice name -> (system, code, title). Every one is required (1..1).
SECTIONS: dict[str, tuple[str, str, str]] = {
    "reason_for_referral": (LOINC, "42349-1", "Reason for transfer"),
    "problems": (LOINC, "11450-4", "Problems"),
    "medications": (LOINC, "10160-0", "Medications"),
    "allergies": (LOINC, "48765-2", "Allergies and adverse reactions"),
    "clinical_results": (LOINC, "30954-2", "Results: drug screens"),
    "behavioral_health": (TOC_TEMP_CS, "behavioral_health_summary", "Behavioral health: assessment scores"),
    "functional_status": (LOINC, "47420-5", "Functional status: ASAM dimensions"),
    "social_history": (LOINC, "29762-2", "Social history: substance use"),
    "plan_of_care": (LOINC, "18776-5", "Plan of care"),
    "discharge_instructions": (LOINC, "69730-0", "Discharge instructions"),
    "advance_directives": (LOINC, "42348-3", "Advance directives and consent to disclose"),
    "immunizations": (LOINC, "11369-6", "Immunizations"),
    "medical_devices": (LOINC, "46264-8", "Medical devices"),
    "procedures": (LOINC, "47519-4", "Procedures"),
    "vital_signs": (LOINC, "8716-3", "Vital signs"),
}
# Sections about what an IOP does not record.
NOT_RECORDED = ("allergies", "immunizations", "medical_devices", "procedures", "vital_signs")
ACTIVE_CONDITION = {"active", "recurrence", "relapse"}
# Resources a section entry refers to that are carried too, when the patient's pool has them.
SUPPORTING = {"Practitioner", "PractitionerRole", "Organization", "Specimen", "Goal", "Medication"}
_PATIENT_PATHS = ("subject", "patient", "for", "beneficiary")
# The status of a retracted record, and of its document.
RETRACTED = "entered-in-error"


def transition_document(
    discharge: Mapping[str, Any],
    resources: Iterable[Mapping[str, Any]],
    *,
    timestamp: str,
    replaces: str | None = None,
    base: str = ids.CANONICAL,
) -> dict[str, Any]:
    """The transition-of-care document (a Bundle of type document) of a discharge. Pure: reads nothing.

    - ``discharge``: the discharge record, ``{"id": ..., "content": {...}, "status": ...}`` (content as
      mappings/discharge.yaml takes it: discharge_date, reason, summary, continuing_care, referral; status
      entered-in-error for a retracted discharge, whose document is entered-in-error too).
    - ``resources``: the current FHIR resources of the discharge's patient, as stored: the enrollment's Patient,
      EpisodeOfCare and Conditions; the assessments' summaries, totals, ASAM ratings and substance use with their
      clinicians; the sessions' drug screens with their Specimens; the medications (MedicationRequest, Statement,
      Dispense); the treatment plan's CarePlan and Goals; the discharge's CarePlan, ServiceRequest and Task; the
      Consent that permits this disclosure (only that one); the program and partner Organizations. Each is known by
      its record identifier (system iop-record, kind/record/role); any order; extra resources are ignored, and any
      naming another Patient is dropped.
    - ``timestamp``: the instant the document is dated (Bundle.timestamp, Composition.date).
    - ``replaces``: the Bundle.identifier value of the document this one supersedes (Composition.relatesTo).
    - ``base``: the base of the entries' fullUrls (the server the resources are read from).

    Section titles and narratives are in the Composition (section[].title, section[].text.div) for renderers.
    """
    pool = _Pool(resources, discharge)
    context = _Context(discharge, pool)
    sections = [_section(name, context) for name in SECTIONS]
    roots = [pool.patient, *context.authors, context.organization, context.episode, *_entries(sections)]
    carried = _carried(pool, roots)
    composition = _composition(discharge, context, sections)
    entries = [composition, *carried]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "meta": {"security": _bundle_labels(entries)},
        "identifier": {"system": DOCUMENT_SYSTEM, "value": ""},
        "type": "document",
        "timestamp": timestamp,
        "entry": [{"fullUrl": _full_url(base, r), "resource": r} for r in entries],
    }
    value = document_identifier(bundle)
    bundle["identifier"]["value"] = value
    composition["date"] = timestamp
    if replaces is not None and replaces != value:
        composition["relatesTo"] = [
            {"code": "replaces", "targetIdentifier": {"system": DOCUMENT_SYSTEM, "value": replaces}}
        ]
    return bundle


def document_identifier(bundle: Mapping[str, Any]) -> str:
    """The identifier a document gets from its content (everything but its own identifier, date and relatesTo)."""
    stripped = copy.deepcopy(dict(bundle))
    stripped.pop("identifier", None)
    stripped.pop("timestamp", None)
    for entry in stripped.get("entry") or []:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Composition":
            for key in ("date", "relatesTo"):
                resource.pop(key, None)
    digest = hashlib.sha256(orjson.dumps(stripped, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"urn:uuid:{uuid.uuid5(ids.NAMESPACE, 'transition-document|' + digest)}"


def identifier_of(bundle: Mapping[str, Any]) -> str | None:
    """A document Bundle's identifier value."""
    value = (bundle.get("identifier") or {}).get("value")
    return value if isinstance(value, str) and value else None


def section_codes(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (system, code) of every top-level section of a document's Composition."""
    composition = document["entry"][0]["resource"]
    return [(s["code"]["coding"][0]["system"], s["code"]["coding"][0]["code"]) for s in composition["section"]]


# -- what the patient's resources are ---------------------------------------------------------------------------------


class _Pool:
    """The patient's resources by reference and by the record role that made them."""

    def __init__(self, resources: Iterable[Mapping[str, Any]], discharge: Mapping[str, Any]) -> None:
        everything = [copy.deepcopy(dict(r)) for r in resources if r.get("resourceType") and r.get("id")]
        self.patient = _the_patient(everything, str(discharge.get("id", "")))
        patient_ref = f"Patient/{self.patient['id']}"
        self.by_ref: dict[str, dict[str, Any]] = {}
        self.roles: list[tuple[tuple[str, str, str, str | None], dict[str, Any]]] = []
        for resource in everything:
            if resource["resourceType"] == "Patient" and resource is not self.patient:
                continue
            if not _only_for(resource, patient_ref) or not _disclosable(resource):
                continue
            self.by_ref[f"{resource['resourceType']}/{resource['id']}"] = resource
            parsed = _record_identity(resource)
            if parsed is not None:
                self.roles.append((parsed, resource))

    def of(self, kind: str, role: str) -> list[dict[str, Any]]:
        return [r for (k, _rid, ro, _key), r in self.roles if k == kind and ro == role and _current(r)]

    def record_of(self, resource: Mapping[str, Any]) -> str | None:
        parsed = _record_identity(resource)
        return parsed[1] if parsed is not None else None

    def get(self, reference: Any) -> dict[str, Any] | None:
        if not isinstance(reference, str):
            return None
        return self.by_ref.get(reference.split("/_history/")[0])


def _the_patient(resources: list[dict[str, Any]], discharge_id: str) -> dict[str, Any]:
    """The discharge's patient: the subject of its continuing-care plan, else the one Patient given."""
    plan = next(
        (
            r
            for r in resources
            if (_record_identity(r) or ("", "", "", None))[:3] == ("discharge", discharge_id, "continuing-care")
        ),
        None,
    )
    wanted = ((plan or {}).get("subject") or {}).get("reference")
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    for patient in patients:
        if wanted == f"Patient/{patient['id']}":
            return patient
    if len(patients) != 1:
        raise ValueError("the discharge's Patient is not among the resources")
    return patients[0]


def _record_identity(resource: Mapping[str, Any]) -> tuple[str, str, str, str | None] | None:
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == ids.RECORD_SYSTEM:
            return ids.parse_identifier_value(str(identifier.get("value", "")))
    return None


def _only_for(resource: Mapping[str, Any], patient_ref: str) -> bool:
    """Whether every patient a resource names is this patient."""
    if resource.get("resourceType") == "Patient":
        return True
    for path in _PATIENT_PATHS:
        value = resource.get(path)
        reference = value.get("reference") if isinstance(value, dict) else None
        if isinstance(reference, str) and "Patient/" in reference and reference.split("/_history/")[0] != patient_ref:
            return False
    return True


def _disclosable(resource: Mapping[str, Any]) -> bool:
    """No label beyond the program's Part 2 labels (a counseling note's PSYTHPN stays home)."""
    for label in (resource.get("meta") or {}).get("security") or []:
        key = (label.get("system"), label.get("code"))
        if key not in _DEFAULT_LABELS and key[0] == PART2[0] and key[1] != "RedisclosureProhibitionMark":
            return False
    return True


def _current(resource: Mapping[str, Any]) -> bool:
    return resource.get("status") != "entered-in-error"


class _Context:
    """What the sections are built from."""

    def __init__(self, discharge: Mapping[str, Any], pool: _Pool) -> None:
        self.pool = pool
        self.record_id = str(discharge.get("id", ""))
        self.content: Mapping[str, Any] = discharge.get("content") or {}
        self.date = str(self.content.get("discharge_date") or "")
        self.patient = pool.patient
        self.organization = next(iter(pool.of("organization", "organization")), None)
        self.continuing = next(iter(_own(pool, "discharge", self.record_id, "continuing-care")), None)
        self.referral = next(iter(_own(pool, "discharge", self.record_id, "referral")), None)
        self.task = next(iter(_own(pool, "discharge", self.record_id, "referral-task")), None)
        self.episode = next(iter(pool.of("enrollment", "episode")), None)
        summaries = sorted(pool.of("assessment", "summary"), key=_effective)
        self.assessment_kinds = {pool.record_of(s): _assessment_kind(s) for s in summaries}
        discharge_summaries = [s for s in summaries if _assessment_kind(s) == "discharge"]
        self.discharge_summary = _last(discharge_summaries or summaries)
        clinician = _first_reference(self.discharge_summary, "performer") if discharge_summaries else None
        author = pool.get(clinician)
        if author is not None:
            self.authors: list[dict[str, Any]] = [author]
        else:
            self.authors = [self.organization] if self.organization is not None else []


def _own(pool: _Pool, kind: str, record_id: str, role: str) -> list[dict[str, Any]]:
    return [r for (k, rid, ro, _key), r in pool.roles if (k, rid, ro) == (kind, record_id, role) and _current(r)]


def _assessment_kind(summary: Mapping[str, Any]) -> str | None:
    for component in summary.get("component") or []:
        if _code(component.get("code")) == "assessment-kind":
            # iop-concepts assessment-kind-<kind> (ConceptMap iop-assessment-kind)
            return str(_code(component.get("valueCodeableConcept")) or "").removeprefix("assessment-kind-")
    return None


# -- sections -------------------------------------------------------------------------------------------------------


class _Section:
    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: list[dict[str, Any]] = []
        self.body = ""
        self.empty_reason: str | None = None
        self.subsections: list[_Section] = []
        # Whether the parent section's narrative already shows this sub-section's content.
        self.shown_in_parent = False
        self.title = SECTIONS[name][2] if name in SECTIONS else name


def _section(name: str, context: _Context) -> _Section:
    section = _Section(name)
    build = _BUILDERS.get(name)
    if build is None:
        section.body = _p("Not recorded by the intensive outpatient program.")
        section.empty_reason = "notasked"
        return section
    build(section, context)
    return section


def _reason_for_referral(section: _Section, context: _Context) -> None:
    content = context.content
    reason = _reason(content.get("reason"), _display(_extension_value(context.episode, "discharge-reason")))
    level = _level_of_care(context.continuing)
    rows = [("Discharged from the intensive outpatient program", _date(context.date))]
    if reason:
        rows.append(("Reason for discharge", str(reason)))
    if level:
        rows.append(("Level of care after discharge", level))
    referral = content.get("referral") if isinstance(content.get("referral"), dict) else None
    if context.referral is not None:
        rows.append(("Referred for", _display(context.referral.get("code")) or ""))
        reasons = [c.get("text") for c in context.referral.get("reasonCode") or [] if c.get("text")]
        if reasons:
            rows.append(("Reason for referral", "; ".join(reasons)))
    elif referral is None:
        rows.append(("Referral", "No referral to another provider was made."))
    section.body = _rows(rows)


def _reason(code: Any, disposition: str) -> str:
    """The record's discharge reason in words, with the discharge disposition it maps to when that says more."""
    words = str(code or "").replace("-", " ").capitalize()
    if disposition and disposition.lower() != words.lower():
        return f"{words} ({disposition})" if words else disposition
    return words


def _problems(section: _Section, context: _Context) -> None:
    conditions = [
        c
        for c in context.pool.of("enrollment", "diagnosis")
        if _code(c.get("clinicalStatus")) in ACTIVE_CONDITION and _code(c.get("verificationStatus")) != "refuted"
    ]
    if not conditions:
        section.body = _p("No active problem is recorded.")
        section.empty_reason = "nilknown"
        return
    section.entries = conditions
    section.body = _table(
        ("Problem", "Code", "Status", "Since"),
        [
            (
                _display(c.get("code")),
                _coded(c.get("code")),
                _display(c.get("clinicalStatus")),
                _date(c.get("onsetDateTime") or c.get("recordedDate")),
            )
            for c in conditions
        ],
    )


def _medications(section: _Section, context: _Context) -> None:
    requests = _sorted(context.pool.of("medication", "request"), "authoredOn")
    statements = _sorted(context.pool.of("medication", "statement"), "effectivePeriod")
    dispenses = _sorted(context.pool.of("medication", "dispense"), "whenHandedOver")
    everything = [*requests, *statements, *dispenses]
    if not everything:
        section.body = _p("No medication is recorded.")
        section.empty_reason = "nilknown"
        return
    section.entries = requests
    section.body = _table(
        ("Medication", "Category", "Status", "Source", "Dose"), [_medication_row(m) for m in everything]
    )
    for title, found in (
        ("Medications taken, prescribed elsewhere or reported by the patient", statements),
        ("Medications dispensed by the program", dispenses),
    ):
        if found:
            sub = _Section(title)
            sub.entries = found
            sub.shown_in_parent = True
            sub.body = _table(
                ("Medication", "Status", "Source"), [_medication_row(m)[0:1] + _medication_row(m)[2:4] for m in found]
            )
            section.subsections.append(sub)


def _medication_row(resource: Mapping[str, Any]) -> tuple[str, ...]:
    name = _display(resource.get("medicationCodeableConcept")) or "medication"
    strength = next(
        (e.get("valueString") for e in resource.get("extension") or [] if str(e.get("url", "")).endswith("strength")),
        None,
    )
    if strength:
        name = f"{name} {strength}"
    category = resource.get("category")
    categories = category if isinstance(category, list) else [category] if category else []
    dosage = resource.get("dosageInstruction") or resource.get("dosage") or []
    dose = "; ".join(d.get("text") or "" for d in dosage if isinstance(d, dict)) or _dose(dosage)
    return (
        name,
        ", ".join(_display(c) for c in categories if c),
        resource.get("status") or "",
        _display(_extension_value(resource, "medication-source")),
        dose,
    )


def _dose(dosage: list[Any]) -> str:
    parts = []
    for item in dosage:
        if not isinstance(item, dict):
            continue
        amount = next((d.get("doseQuantity") for d in item.get("doseAndRate") or [] if d.get("doseQuantity")), None)
        repeat = (item.get("timing") or {}).get("repeat") or {}
        text = ", ".join(
            x
            for x in (
                f"{amount.get('value')} {amount.get('unit', '')}".strip() if amount else "",
                _timing({"repeat": repeat}),
            )
            if x
        )
        if text:
            parts.append(text)
    return "; ".join(parts)


def _clinical_results(section: _Section, context: _Context) -> None:
    end = _day(context.date)
    start = end - timedelta(days=RESULTS_DAYS) if end is not None else None
    screens = [
        o
        for o in _sorted(context.pool.of("session", "drug-screen"), "effectiveDateTime")
        if start is None or (day := _day(_effective(o))) is None or start <= day <= end  # type: ignore[operator]
    ]
    if not screens:
        section.body = _p(f"No drug screen in the {RESULTS_DAYS} days before discharge.")
        section.empty_reason = "nilknown"
        return
    section.entries = screens
    section.body = _p(f"Drug screens of the {RESULTS_DAYS} days before discharge.") + _table(
        ("Date", "Test", "Result", "Note"),
        [
            (
                _date(_effective(o)),
                _display(o.get("code")),
                _display(o.get("valueCodeableConcept")) or _quantity(o.get("valueQuantity")),
                "; ".join(i.get("text") for i in o.get("interpretation") or [] if i.get("text")),
            )
            for o in screens
        ],
    )


def _behavioral_health(section: _Section, context: _Context) -> None:
    totals = _sorted(context.pool.of("assessment", "total"), "effectiveDateTime")
    by_instrument: dict[str, list[dict[str, Any]]] = {}
    for total in totals:
        by_instrument.setdefault(_display(total.get("code")), []).append(total)
    if not by_instrument:
        section.body = _p("No screening instrument was scored.")
        section.empty_reason = "nilknown"
        return
    section.entries = totals
    rows = []
    for instrument, scores in by_instrument.items():
        first, last = scores[0], scores[-1]
        trend = _trend(_score(first), _score(last)) if len(scores) > 1 else "scored once"
        rows.append(
            (
                instrument,
                _scored(first),
                _scored(last) if len(scores) > 1 else "",
                trend,
                str(len(scores)),
            )
        )
    section.body = _p("Each instrument's first and last score in the program.") + _table(
        ("Instrument", "First", "Last", "Change", "Times scored"), rows
    )


def _scored(total: Mapping[str, Any]) -> str:
    band = "; ".join(_display(i) for i in total.get("interpretation") or [] if _display(i))
    text = f"{_score(total)} on {_date(_effective(total))}"
    return f"{text} ({band})" if band else text


def _trend(first: Any, last: Any) -> str:
    if not isinstance(first, int | float) or not isinstance(last, int | float):
        return ""
    change = last - first
    if change == 0:
        return "unchanged"
    return f"{'+' if change > 0 else '−'}{abs(change):g} ({'higher' if change > 0 else 'lower'})"


def _functional_status(section: _Section, context: _Context) -> None:
    ratings = _sorted(context.pool.of("assessment", "asam-dimensions"), "effectiveDateTime")
    at_discharge = [r for r in ratings if context.assessment_kinds.get(context.pool.record_of(r)) == "discharge"]
    chosen = _last(at_discharge or ratings)
    if chosen is None:
        section.body = _p("No ASAM dimension rating is recorded.")
        section.empty_reason = "nilknown"
        return
    which = "the discharge assessment" if at_discharge else "the latest assessment"
    rows = [(_display(c.get("code")), _text(c.get("valueInteger"))) for c in chosen.get("component") or []]
    section.entries = [chosen]
    section.body = _p(f"ASAM dimension risk ratings (0-4) from {which} on {_date(_effective(chosen))}.") + _table(
        ("Dimension", "Rating"), rows
    )
    recommended = context.discharge_summary
    if recommended is not None and recommended.get("valueCodeableConcept"):
        # The assessment's summary: the level of care it recommends.
        section.entries.append(recommended)
        section.body += _p(f"Recommended level of care: {_display(recommended['valueCodeableConcept'])}.")


def _social_history(section: _Section, context: _Context) -> None:
    uses = _sorted(context.pool.of("assessment", "substance-use"), "effectiveDateTime")
    if not uses:
        section.body = _p("No substance use is recorded.")
        section.empty_reason = "nilknown"
        return
    latest: dict[str, dict[str, Any]] = {}
    for use in uses:
        latest[_display(use.get("valueCodeableConcept"))] = use
    section.entries = list(latest.values())
    section.body = _p("Substance use as last assessed.") + _table(
        ("Substance", "Frequency", "Last use", "Route", "Assessed"),
        [
            (
                substance,
                _component(use, "use-frequency"),
                _component(use, "last-use"),
                _component(use, "route-of-use"),
                _date(_effective(use)),
            )
            for substance, use in latest.items()
        ],
    )


def _plan_of_care(section: _Section, context: _Context) -> None:
    plans = [p for p in (context.continuing, *context.pool.of("treatment-plan", "careplan")) if p is not None]
    goals = context.pool.of("treatment-plan", "goal")
    if not plans:
        section.body = _p("No plan of care is recorded.")
        section.empty_reason = "nilknown"
        return
    section.entries = plans
    body = ""
    if context.continuing is not None:
        plan = context.continuing
        if plan.get("description"):
            body += _p(f"Discharge summary: {plan['description']}")
        for note in plan.get("note") or []:
            if isinstance(note, dict) and note.get("text"):
                body += _p(f"Clinician's note: {note['text']}")
        groups: dict[str, list[str]] = {}
        services = []
        for activity in plan.get("activity") or []:
            detail = activity.get("detail") or {}
            code = _code(detail.get("code"))
            if code in ("relapse-trigger", "relapse-warning-sign", "coping-strategy"):
                groups.setdefault(_display(detail.get("code")), []).append(str(detail.get("description") or ""))
            elif code == "emergency-contact":
                who = ", ".join(p.get("display", "") for p in detail.get("performer") or [])
                relation = "; ".join(_display(r) for r in detail.get("reasonCode") or [])
                groups.setdefault("Emergency contacts", []).append(
                    " ".join(
                        x for x in (who, f"({relation})" if relation else "", detail.get("description") or "") if x
                    )
                )
            else:
                services.append((_display(detail.get("code")), _timing(detail.get("scheduledTiming"))))
        if services:
            body += _h("Continuing care") + _table(("Service", "How often"), services)
        if groups:
            body += _h("Relapse prevention plan") + "".join(
                f"<p><b>{escape(label)}</b></p>" + _list(items) for label, items in groups.items()
            )
    if goals:
        sub = _Section("Treatment goals")
        sub.entries = goals
        sub.shown_in_parent = True
        sub.body = _table(
            ("Goal", "Achievement", "As of"),
            [
                (_display(g.get("description")), _display(g.get("achievementStatus")), _date(g.get("statusDate")))
                for g in goals
            ],
        )
        section.subsections.append(sub)
        body += _h("Treatment goals") + sub.body
    section.body = body or _p("See the plans referred to.")


def _discharge_instructions(section: _Section, context: _Context) -> None:
    rows: list[tuple[str, str]] = []
    referral = context.referral
    if referral is not None:
        partner = context.pool.get(_first_reference(referral, "performer"))
        name = (partner or {}).get("name") or _first_display(referral, "performer")
        rows.append(("Referred to", str(name or "the aftercare provider")))
        rows.append(("Service", _display(referral.get("code"))))
        if referral.get("priority"):
            rows.append(("Priority", str(referral["priority"])))
        start = (referral.get("occurrencePeriod") or {}).get("start")
        if start:
            rows.append(("From", _date(start)))
        task = context.task
        if task is not None:
            # where the partner says the referral stands, as following its Task brought it back (exchange/followup.py)
            rows.append(("Referral status", _display(task.get("businessStatus")) or str(task.get("status") or "")))
            visit = scheduled_for(task.get("output"))
            if visit:
                rows.append(("Next appointment", visit.replace("T", " ")[:16]))
        referral_section = _Section("Aftercare referral")
        referral_section.entries = [r for r in (referral, task) if r is not None]
        referral_section.shown_in_parent = True
        referral_section.body = _rows(rows)
        section.subsections.append(referral_section)
    else:
        rows.append(("Referral", "None was made."))
    if context.organization is not None:
        contact = _telecom(context.organization)
        rows.append(
            ("Questions", f"{context.organization.get('name', 'The program')}{': ' + contact if contact else ''}")
        )
    section.body = _rows(rows)


def _advance_directives(section: _Section, context: _Context) -> None:
    consents = [c for c in context.pool.by_ref.values() if c["resourceType"] == "Consent" and _current(c)]
    section.body = _p("No advance directive is recorded by the program.")
    section.empty_reason = "notasked"
    if consents:
        sub = _Section("Consent to this disclosure (42 CFR Part 2)")
        sub.entries = consents
        sub.body = _table(
            ("Consent", "Status", "Period", "Scope"),
            [
                (
                    _display(c.get("category", [{}])[0]) or "Consent",
                    c.get("status", ""),
                    " to ".join(
                        x
                        for x in (
                            _date((c.get("provision") or {}).get("period", {}).get("start")),
                            _date((c.get("provision") or {}).get("period", {}).get("end")),
                        )
                        if x
                    ),
                    "; ".join(_display(p) for p in (c.get("provision") or {}).get("purpose", []) or []),
                )
                for c in consents
            ],
        )
        section.subsections.append(sub)
        section.body += _p("The patient's consent that permits this disclosure is attached.")


_BUILDERS: dict[str, Callable[[_Section, _Context], None]] = {
    "reason_for_referral": _reason_for_referral,
    "problems": _problems,
    "medications": _medications,
    "clinical_results": _clinical_results,
    "behavioral_health": _behavioral_health,
    "functional_status": _functional_status,
    "social_history": _social_history,
    "plan_of_care": _plan_of_care,
    "discharge_instructions": _discharge_instructions,
    "advance_directives": _advance_directives,
}


# -- the Composition ---------------------------------------------------------------------------------------------------


def _composition(discharge: Mapping[str, Any], context: _Context, sections: list[_Section]) -> dict[str, Any]:
    patient = context.patient
    name = _person(patient)
    record_id = str(discharge.get("id", ""))
    title = f"Transition of care summary: discharge from the intensive outpatient program on {_date(context.date)}"
    retracted = discharge.get("status") == RETRACTED
    if retracted:
        title = f"Entered in error: {title}"
    composition: dict[str, Any] = {
        "resourceType": "Composition",
        "id": ids.resource_id("discharge", record_id, "transition-document"),
        "meta": {"security": [*copy.deepcopy(PART2_LABELS), redisclosure_mark()]},
        "language": "en-US",
        "text": {"status": "generated", "div": _composition_div(title, context, sections)},
        "identifier": {
            "system": ids.RECORD_SYSTEM,
            "value": ids.identifier_value("discharge", record_id, "transition-document"),
        },
        "status": RETRACTED if retracted else "final",
        "type": {"coding": [dict(TRANSFER_SUMMARY)]},
        "category": [{"coding": [dict(TRANSFER_SUMMARY)]}],
        "subject": {"reference": f"Patient/{patient['id']}", "display": name} if name else _ref(patient),
        "date": "",
        "author": [_ref(a) for a in context.authors] or [{"display": "Intensive outpatient program"}],
        "title": title,
    }
    if context.organization is not None:
        composition["custodian"] = _ref(context.organization)
    if context.episode is not None:
        period = context.episode.get("period")
        event: dict[str, Any] = {"detail": [_ref(context.episode)]}  # the stay: its program and discharge reason
        if period:
            event["period"] = period
        composition["event"] = [event]
    composition["section"] = [_section_json(s) for s in sections]
    return composition


def _section_json(section: _Section) -> dict[str, Any]:
    out: dict[str, Any] = {"title": section.title}
    if section.name in SECTIONS:
        system, code, _title = SECTIONS[section.name]
        out["code"] = {"coding": [{"system": system, "code": code}]}
    out["text"] = {"status": "generated", "div": _div(section.body)}
    if section.entries:
        out["entry"] = [_ref(r, display=False) for r in section.entries]
    elif section.empty_reason is not None:
        out["emptyReason"] = {"coding": [{"system": EMPTY_REASON, "code": section.empty_reason}]}
    if section.subsections:
        out["section"] = [_section_json(s) for s in section.subsections]
    return out


def _composition_div(title: str, context: _Context, sections: list[_Section]) -> str:
    patient = context.patient
    facts = [("Patient", _person(patient) or "(name not recorded)")]
    if patient.get("birthDate"):
        facts.append(("Date of birth", _date(patient["birthDate"])))
    period = (context.episode or {}).get("period") or {}
    if period.get("start"):
        facts.append(("In the program", f"{_date(period['start'])} to {_date(period.get('end') or context.date)}"))
    if context.organization is not None:
        facts.append(("Program", str(context.organization.get("name") or "")))
    authors = [_person(a) if a["resourceType"] == "Practitioner" else str(a.get("name") or "") for a in context.authors]
    if authors:
        facts.append(("Author", ", ".join(a for a in authors if a)))
    body = f"<h1>{escape(title)}</h1>" + _rows(facts)
    for section in sections:
        body += _h(section.title) + section.body
        for sub in section.subsections:
            if not sub.shown_in_parent:
                body += f"<p><b>{escape(sub.title)}</b></p>" + sub.body
    body += _h("Notice of redisclosure prohibition (42 CFR 2.32)") + _p(REDISCLOSURE_NOTICE)
    return _div(body)


# -- the Bundle -------------------------------------------------------------------------------------------------------


def _entries(sections: list[_Section]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for section in sections:
        found += section.entries
        found += _entries(section.subsections)
    return found


def _carried(pool: _Pool, roots: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The resources the document carries: the roots, and what they refer to of the supporting types, once each,
    each with the Part 2 labels and without server-assigned meta."""
    out: dict[str, dict[str, Any]] = {}
    queue = [r for r in roots if r is not None]
    while queue:
        resource = queue.pop(0)
        reference = f"{resource['resourceType']}/{resource['id']}"
        if reference in out:
            continue
        out[reference] = resource
        for found in _references(resource):
            target = pool.get(found)
            if target is not None and target["resourceType"] in SUPPORTING:
                queue.append(target)
    return [_labelled(r) for r in out.values()]


def _references(value: Any) -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                found.append(item)
            else:
                found += _references(item)
    elif isinstance(value, list):
        for item in value:
            found += _references(item)
    return found


def _labelled(resource: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(resource)
    meta = {k: v for k, v in (body.get("meta") or {}).items() if k not in ("versionId", "lastUpdated", "source")}
    security = list(meta.get("security") or [])
    present = {(s.get("system"), s.get("code")) for s in security}
    security += [copy.deepcopy(label) for label in PART2_LABELS if (label["system"], label["code"]) not in present]
    meta["security"] = security
    ordered: dict[str, Any] = {"resourceType": body["resourceType"], "id": body["id"], "meta": meta}
    ordered.update((k, v) for k, v in body.items() if k not in ordered)
    return ordered


def _bundle_labels(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    labels: list[dict[str, Any]] = []
    seen: set[tuple[Any, Any]] = set()
    for resource in resources:
        for label in (resource.get("meta") or {}).get("security") or []:
            key = (label.get("system"), label.get("code"))
            if key not in seen and key[1] != "RedisclosureProhibitionMark":
                seen.add(key)
                labels.append(copy.deepcopy(label))
    return [*labels, redisclosure_mark()]


def _full_url(base: str, resource: Mapping[str, Any]) -> str:
    return f"{base.rstrip('/')}/{resource['resourceType']}/{resource['id']}"


def _ref(resource: Mapping[str, Any], *, display: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": f"{resource['resourceType']}/{resource['id']}"}
    if display:
        shown = _person(resource) if resource["resourceType"] in ("Patient", "Practitioner") else resource.get("name")
        if isinstance(shown, str) and shown:
            out["display"] = shown
    return out


# -- narrative helpers ---------------------------------------------------------------------------------------------


def _div(body: str) -> str:
    return f'<div xmlns="{XHTML}">{body}</div>'


def _p(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _h(text: str) -> str:
    return f"<h2>{escape(text)}</h2>"


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>"


def _rows(rows: list[tuple[str, str]]) -> str:
    return (
        "<table><tbody>"
        + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
        + "</tbody></table>"
    )


def _table(head: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> str:
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{escape(_text(c))}</td>" for c in row) + "</tr>" for row in rows)
        + "</tbody></table>"
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _code(concept: Any) -> str | None:
    if isinstance(concept, dict):
        for coding in concept.get("coding") or []:
            if coding.get("code"):
                return str(coding["code"])
    return None


def _display(concept: Any) -> str:
    if isinstance(concept, str):
        return concept
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    if concept.get("display") and not concept.get("coding"):
        return str(concept["display"])
    for coding in concept.get("coding") or []:
        if coding.get("display"):
            return str(coding["display"])
    return _code(concept) or str(concept.get("code") or "")


def _coded(concept: Any) -> str:
    for coding in (concept or {}).get("coding") or []:
        system = str(coding.get("system", ""))
        label = {"http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM", "http://snomed.info/sct": "SNOMED CT"}.get(system)
        if label and coding.get("code"):
            return f"{label} {coding['code']}"
    return ""


def _person(resource: Mapping[str, Any]) -> str:
    for name in resource.get("name") or []:
        if not isinstance(name, dict):
            continue
        if name.get("text"):
            return str(name["text"])
        parts = [*(name.get("given") or []), name.get("family") or ""]
        joined = " ".join(p for p in parts if p)
        if joined:
            return joined
    return ""


def _telecom(resource: Mapping[str, Any]) -> str:
    return ", ".join(str(t.get("value")) for t in resource.get("telecom") or [] if t.get("value"))


def _extension_value(resource: Mapping[str, Any] | None, name: str) -> Any:
    for extension in (resource or {}).get("extension") or []:
        if str(extension.get("url", "")).endswith(f"/{name}"):
            return extension.get("valueCodeableConcept") or extension.get("valueCoding") or extension.get("valueString")
    return None


def _level_of_care(plan: Mapping[str, Any] | None) -> str:
    for category in (plan or {}).get("category") or []:
        for coding in category.get("coding") or []:
            if str(coding.get("system", "")).endswith("/asam-level-of-care"):
                return f"ASAM {coding.get('code')} {coding.get('display', '')}".strip()
    return ""


def _timing(timing: Any) -> str:
    repeat = (timing or {}).get("repeat") or {}
    if not repeat.get("frequency"):
        return ""
    units = {"d": "day", "wk": "week", "mo": "month", "h": "hour", "a": "year"}
    period = repeat.get("period", 1)
    unit = units.get(repeat.get("periodUnit", ""), repeat.get("periodUnit", ""))
    per = f"{unit}" if period == 1 else f"{period:g} {unit}s"
    times = repeat["frequency"]
    return f"{times} time{'' if times == 1 else 's'} per {per}"


def _component(observation: Mapping[str, Any], code: str) -> str:
    for component in observation.get("component") or []:
        if _code(component.get("code")) == code:
            if "valueDateTime" in component:
                return _date(component["valueDateTime"])
            return _display(component.get("valueCodeableConcept")) or _text(component.get("valueString"))
    return ""


def _quantity(quantity: Any) -> str:
    if not isinstance(quantity, dict):
        return ""
    return f"{quantity.get('value')} {quantity.get('unit', '')}".strip()


def _score(total: Mapping[str, Any]) -> Any:
    return (total.get("valueQuantity") or {}).get("value", total.get("valueInteger"))


def _first_reference(resource: Mapping[str, Any] | None, path: str) -> str | None:
    value = (resource or {}).get(path)
    items = value if isinstance(value, list) else [value]
    return next((i["reference"] for i in items if isinstance(i, dict) and i.get("reference")), None)


def _first_display(resource: Mapping[str, Any] | None, path: str) -> str | None:
    value = (resource or {}).get(path)
    items = value if isinstance(value, list) else [value]
    return next((i["display"] for i in items if isinstance(i, dict) and i.get("display")), None)


def _effective(resource: Mapping[str, Any] | None) -> str:
    resource = resource or {}
    return str(resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start") or "")


def _sorted(resources: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    def key(resource: dict[str, Any]) -> str:
        value = resource.get(path)
        if isinstance(value, dict):
            value = value.get("start")
        return str(value or "")

    return sorted(resources, key=key)


def _last(resources: list[dict[str, Any]]) -> dict[str, Any] | None:
    return resources[-1] if resources else None


def _day(value: Any) -> date | None:
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        return None


def _date(value: Any) -> str:
    """A date as people read it (2026-02-27 stays ISO: unambiguous for every reader)."""
    return str(value)[:10] if value else ""


# -- gathering a discharge's resources ------------------------------------------------------------------------------

# The record kinds of an enrollment whose resources a document may carry, with the roles that matter.
GATHERED: dict[str, tuple[str, ...]] = {
    "enrollment": ("patient", "episode", "diagnosis"),
    "assessment": ("clinician", "summary", "total", "asam-dimensions", "substance-use"),
    "session": ("drug-screen", "specimen"),
    "medication": ("prescriber", "request", "statement", "dispense"),
    "treatment-plan": ("careplan", "goal"),
}
PAGE = 1000
# Outbox statuses of rows whose document the partner has not had and will not have as it is.
NEVER_SENT = ("superseded", "blocked")


def gather(
    store: Any,
    record: Any,
    *,
    read: Callable[[str, str], dict[str, Any] | None] | None = None,
    consents: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The resources `transition_document` takes for a discharge record (a StoredRecord of kind discharge): its
    enrollment's records' resources of the roles in GATHERED, its own, the program Organization, the partner's
    Organization, and the Consents named (``Consent/<id>``: the one that permits the disclosure). ``store`` reads
    records (RecordStore) and, unless ``read`` is given, resources (``store.read``); inside a write transaction pass
    ``read`` reading from it (its updates, such as goal outcomes, are not committed yet)."""

    def current(reference: str) -> dict[str, Any] | None:
        res_type, res_id = reference.split("/", 1)
        if read is not None:
            return read(res_type, res_id)
        found = store.read(res_type, res_id)
        if found is None or found.deleted or found.content is None:
            return None
        return dict(orjson.loads(found.content))

    chosen: list[tuple[Any, tuple[str, ...] | None]] = [(record, None)]
    if record.enrollment_id is not None:
        enrollment = store.record("enrollment", record.enrollment_id)
        if enrollment is not None:
            chosen.append((enrollment, GATHERED["enrollment"]))
        for kind, roles in GATHERED.items():
            if kind == "enrollment":
                continue
            offset = 0
            while True:
                page, total = store.records(kind, enrollment_id=record.enrollment_id, offset=offset, count=PAGE)
                chosen += [(r, roles) for r in page if r.status == "active"]
                offset += PAGE
                if offset >= total or not page:
                    break
    organizations, _ = store.records("organization", offset=0, count=1)
    chosen += [(r, ("organization",)) for r in organizations]
    partner = (record.content.get("referral") or {}).get("partner")
    if partner:
        found = store.record("partner", str(partner))
        if found is not None:
            chosen.append((found, ("organization",)))
    references: list[str] = []
    for source, wanted in chosen:
        for entry in source.resources:
            if (wanted is None and entry["role"] != "provenance") or (wanted is not None and entry["role"] in wanted):
                references.append(entry["reference"])
    references += list(consents)
    out: list[dict[str, Any]] = []
    for reference in dict.fromkeys(references):
        resource = current(reference)
        if resource is not None:
            out.append(resource)
    return out


def transaction_entry(document: Mapping[str, Any]) -> dict[str, Any]:
    """The document as an entry of a transaction Bundle: a conditional update on its identifier, so a replayed
    transaction leaves one copy and a corrected discharge's document (another identifier) is created beside it. Its
    fullUrl is not its identifier (a receiver rewrites every value equal to a fullUrl of the transaction)."""
    value = str(identifier_of(document))
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid5(ids.NAMESPACE, 'transition-document-entry|' + value)}",
        "resource": dict(document),
        "request": {"method": "PUT", "url": f"Bundle?identifier={DOCUMENT_SYSTEM}|{value}"},
    }


def settle(document: dict[str, Any], rows: Iterable[Any]) -> dict[str, Any]:
    """The document to send, given the discharge's outbox rows (oldest first): the one sent or queued before with
    the same identifier (the same content: a replay sends the same bytes), else ``document`` replacing the newest
    other document of the rows that went or may go (neither superseded nor held back for want of consent) by
    Composition.relatesTo."""
    current = identifier_of(document)
    found: list[dict[str, Any]] = []
    for row in rows:
        if getattr(row, "status", None) not in NEVER_SENT:
            found += documents_in((getattr(row, "payload", None) or {}).get("body"))
    for earlier in found:
        if identifier_of(earlier) == current:
            return earlier
    older = [value for d in found if (value := identifier_of(d)) is not None and value != current]
    if older:
        composition = document["entry"][0]["resource"]
        composition["relatesTo"] = [
            {"code": "replaces", "targetIdentifier": {"system": DOCUMENT_SYSTEM, "value": older[-1]}}
        ]
    return document


def documents_in(bundle: Any) -> list[dict[str, Any]]:
    """The transition documents a transaction Bundle carries."""
    if not isinstance(bundle, dict):
        return []
    return [
        e["resource"]
        for e in bundle.get("entry") or []
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == "Bundle"
        and e["resource"].get("type") == "document"
    ]
