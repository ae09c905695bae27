"""Referral intake and the closed loop with referring units: an inbound referral Task becomes a referral record, and
staff decisions on it update the Task (status, statusReason, BSeR businessStatus) and go back to the referring partner.

Pattern: Gravity SDOH CC TaskForReferralManagement with BSeR TaskBusinessStatusCS codes (TERMINOLOGY.md §5.5).

Consent for the push-backs (privacy/pushes.py applies it, here and again in the worker):
- The answers before admission (accepted with a planned date, declined with a reason, no-show) go without a consent
  check. They answer the unit's own request about the person it referred, on the Task it created, and carry no
  record this program made of the patient's treatment; the closed referral loop depends on them, and withholding
  "declined" would leave the unit's patient without a placement while it waits.
- The admission (Task completed, the EpisodeOfCare as output) tells the unit that the person is now a patient of a
  Part 2 program and points at a treatment record: that is a disclosure of Part 2 records (42 CFR §2.11, §2.13). It
  goes only when a consent of the enrolled patient permits disclosure to the referring partner for treatment or care
  coordination, and then carries that Consent (§2.32); without one it waits as `blocked: no consent` and a consent
  recorded later releases it (exchange/transitions.py `release`).
Every delivered push-back, either kind, is audited as a disclosure by the worker.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import orjson

from iop_fhir.errors import Conflict, FhirError, Invalid, Issue, NotFound, Unprocessable
from iop_fhir.exchange import outbox, package
from iop_fhir.fhir.repository import Repository
from iop_fhir.iop import schemas
from iop_fhir.iop.service import RecordService
from iop_fhir.mapping import ids
from iop_fhir.mapping.engine import PART2_LABELS, Engine
from iop_fhir.privacy import pushes
from iop_fhir.r4 import search, validation
from iop_fhir.r4.instants import instant, now_us
from iop_fhir.store.base import REFERRAL, StoredRecord, StoredResource, WriteTx

log = logging.getLogger("iop_fhir.referrals")

KIND = REFERRAL
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
BSER_STATUS = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
PARTNER_SYSTEM = package.PARTNER_SYSTEM

# Referral status -> Task.status. SDOHCC's task status value set is R4 TaskStatus without ready and received; a
# no-show is "failed" (the admission was scheduled and did not happen), not "cancelled" (nobody withdrew it).
STATUSES = ("requested", "accepted", "declined", "no-show", "admitted")
TASK_STATUS = {
    "requested": "requested",
    "accepted": "accepted",
    "declined": "rejected",
    "no-show": "failed",
    "admitted": "completed",
}
BUSINESS_STATUS = {
    "accepted": ("3.0", "Service Request Accepted"),
    "declined": ("4.0", "Service Request Declined"),
    "no-show": ("5.1.2", "Scheduled Service Request Event Unattended"),
    "admitted": ("7.0", "Service Request Fulfillment Completed"),
}
# action -> (the status it leads to, the statuses it may start from). Accepting an accepted referral reschedules it.
ACTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "accept": ("accepted", ("requested", "accepted")),
    "decline": ("declined", ("requested", "accepted")),
    "no-show": ("no-show", ("accepted",)),
    "admit": ("admitted", ("accepted",)),
}
# Task.output types (text only: no standard code exists for these outputs).
PLANNED_ADMISSION = "planned admission"
EPISODE_OF_CARE = "episode of care"
DIAGNOSIS_SYSTEMS = {"http://hl7.org/fhir/sid/icd-10-cm": "icd-10-cm", "http://snomed.info/sct": "snomed"}
DEFAULT_REFERRAL_SOURCE = "inpatient-step-down"
_LOCAL_REFERENCE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(/_history/[A-Za-z0-9\-.]{1,64})?")


# -- pure: reading the inbound resources ---------------------------------------------------------------------------


def local_id(reference: Any, res_type: str) -> str | None:
    """The id of a relative ``Type/id`` reference to ``res_type``, or None."""
    value = reference.get("reference") if isinstance(reference, dict) else None
    found = _LOCAL_REFERENCE.fullmatch(value) if isinstance(value, str) else None
    return found.group(2) if found is not None and found.group(1) == res_type else None


def is_referral_task(task: dict[str, Any]) -> bool:
    """A new fulfilment request for a ServiceRequest (SDOHCC TaskForReferralManagement), not one of our own Tasks
    (those carry the record identifier: a discharge's referral to an aftercare partner)."""
    codings = (task.get("code") or {}).get("coding") or []
    own = any(isinstance(i, dict) and i.get("system") == ids.RECORD_SYSTEM for i in task.get("identifier") or [])
    return (
        task.get("resourceType") == "Task"
        and task.get("status") == "requested"
        and task.get("intent") == "order"
        and any(isinstance(c, dict) and (c.get("system"), c.get("code")) == (TASK_CODE, "fulfill") for c in codings)
        and local_id(task.get("focus"), "ServiceRequest") is not None
        and not own
    )


def partner_named(reference: Any) -> str | None:
    """The partner id a Reference names: by the partner identifier, or as ``Organization/<partner id>`` (a partner's
    Organization has the partner's id)."""
    if not isinstance(reference, dict):
        return None
    identifier = reference.get("identifier")
    if isinstance(identifier, dict) and identifier.get("system") == PARTNER_SYSTEM and identifier.get("value"):
        return str(identifier["value"])
    return local_id(reference, "Organization")


def referral_from(
    task: dict[str, Any],
    service_request: dict[str, Any],
    patient: dict[str, Any] | None,
    conditions: list[dict[str, Any]],
    engine: Engine | None = None,
) -> dict[str, Any]:
    """The referral record of an inbound referral Task, reverse-mapped from its resources. The patient has the shape
    of an enrollment's patient, and diagnoses use the enrollment's system names where they are known, so that
    admission can start from them. With the mapping engine, the Patient and Conditions are read back through the
    enrollment mapping (mappings/enrollment.yaml: race, ethnicity, address and language in the record's
    vocabularies too); what that reading does not recognise (another system's names, identifiers without a
    system, a ServiceRequest's reasonCode) is read leniently as before."""
    requesters = [task.get("requester"), service_request.get("requester")]
    organization = next((r["display"] for r in requesters if isinstance(r, dict) and r.get("display")), None)
    partner = next((p for p in map(partner_named, requesters) if p is not None), None)
    occurrence = service_request.get("occurrencePeriod") or {}
    code = service_request.get("code") or {}
    notes = [n["text"] for n in [*service_request.get("note", []), *task.get("note", [])] if n.get("text")]
    reversed_enrollment = _reverse(engine, patient, conditions)
    return {
        "status": "requested",
        "patient": {**_patient(patient or {}), **_reversed_patient(reversed_enrollment)},
        "diagnoses": _merged(_reversed_diagnoses(reversed_enrollment), _diagnoses(service_request, conditions)),
        "service": code.get("text") or next((c.get("display") for c in code.get("coding", [])), None),
        "requested_start": occurrence.get("start") or service_request.get("occurrenceDateTime"),
        "authored_on": task.get("authoredOn") or service_request.get("authoredOn"),
        "referring": {"organization": organization, "partner": partner},
        "notes": notes,
        "service_request": f"ServiceRequest/{service_request['id']}",
        "task": f"Task/{task['id']}",
        "duplicate_tasks": [],
    }


def _reverse(engine: Engine | None, patient: dict[str, Any] | None, conditions: list[dict[str, Any]]) -> dict[str, Any]:
    """The enrollment record the engine reads back from the referral's Patient and Conditions ({} without an
    engine, or when another system's resources do not read back)."""
    if engine is None:
        return {}
    produced = [("patient", patient)] if patient else []
    produced += [("diagnosis", condition) for condition in conditions]
    if not produced:
        return {}
    try:
        return engine.reverse("enrollment", produced)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        # Another system's resources are not bound to match our templates; the lenient reading stands.
        log.warning("inbound referral: the mapping engine could not read the Patient/Conditions back (%s)", type(error))
        return {}


# What of the patient read back through the enrollment mapping is kept: identifiers are read leniently (any system
# with a value, the assigner's display) and name as the official one; the rest in the record's own vocabularies.
_REVERSED_PATIENT = ("gender", "birth_date", "phone", "email", "address", "race", "ethnicity", "preferred_language")


def _reversed_patient(enrollment: dict[str, Any]) -> dict[str, Any]:
    patient = enrollment.get("patient")
    if not isinstance(patient, dict):
        return {}
    return {k: patient[k] for k in _REVERSED_PATIENT if patient.get(k) not in (None, "", [], {})}


def _reversed_diagnoses(enrollment: dict[str, Any]) -> list[dict[str, Any]]:
    found = enrollment.get("diagnoses")
    return [
        {k: d[k] for k in ("system", "code", "display") if d.get(k)}
        for d in (found if isinstance(found, list) else [])
        if isinstance(d, dict) and d.get("system") in DIAGNOSIS_SYSTEMS.values() and d.get("code")
    ]


def _merged(first: list[dict[str, Any]], then: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = list(first)
    for diagnosis in then:
        if all((d["system"], d["code"]) != (diagnosis["system"], diagnosis["code"]) for d in out):
            out.append(diagnosis)
    return out


def _patient(patient: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    identifiers = []
    for identifier in patient.get("identifier", []):
        if identifier.get("system") and identifier.get("value"):
            item = {"system": identifier["system"], "value": identifier["value"]}
            if (identifier.get("assigner") or {}).get("display"):
                item["assigner"] = identifier["assigner"]["display"]
            identifiers.append(item)
    if identifiers:
        out["identifiers"] = identifiers
    names = [n for n in patient.get("name", []) if n.get("family")]
    official = next((n for n in names if n.get("use") == "official"), names[0] if names else None)
    if official is not None:
        out["name"] = {**({"given": official["given"]} if official.get("given") else {}), "family": official["family"]}
    for field, key in (("birthDate", "birth_date"), ("gender", "gender")):
        if patient.get(field):
            out[key] = patient[field]
    phones = [t for t in patient.get("telecom", []) if t.get("system") == "phone" and t.get("value")]
    if phones:
        out["phone"] = next((t for t in phones if t.get("use") == "mobile"), phones[0])["value"]
    return out


def _diagnoses(service_request: dict[str, Any], conditions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    concepts = [c.get("code") or {} for c in conditions] + list(service_request.get("reasonCode", []))
    found: list[dict[str, Any]] = []
    for concept in concepts:
        codings = [c for c in concept.get("coding", []) if c.get("system") and c.get("code")]
        if not codings:
            continue
        coding = next((c for c in codings if c["system"] in DIAGNOSIS_SYSTEMS), codings[0])
        diagnosis = {"system": DIAGNOSIS_SYSTEMS.get(coding["system"], coding["system"]), "code": coding["code"]}
        if coding.get("display"):
            diagnosis["display"] = coding["display"]
        if all((d["system"], d["code"]) != (diagnosis["system"], diagnosis["code"]) for d in found):
            found.append(diagnosis)
    return found


# -- pure: the Task as the referral's state, and what goes back to the referrer -------------------------------------


def task_for(task: dict[str, Any], referral: dict[str, Any], modified: str) -> dict[str, Any]:
    """The Task updated to the referral's status: status, businessStatus, statusReason and the outputs (planned
    admission date, the EpisodeOfCare once admitted). Other outputs and elements are kept as the referrer sent them."""
    status = referral["status"]
    body = copy.deepcopy(task)
    body["status"] = TASK_STATUS[status]
    if status in BUSINESS_STATUS:
        code, display = BUSINESS_STATUS[status]
        body["businessStatus"] = {"coding": [{"system": BSER_STATUS, "code": code, "display": display}]}
    reason = None
    if status == "declined":
        reason = referral.get("decline_reason")
    elif status == "no-show":
        reason = f"The patient did not attend the planned admission on {referral.get('planned_admission')}."
    if reason:
        body["statusReason"] = {"text": reason}
    else:
        body.pop("statusReason", None)
    ours = (PLANNED_ADMISSION, EPISODE_OF_CARE)
    outputs = [o for o in body.get("output", []) if (o.get("type") or {}).get("text") not in ours]
    if referral.get("planned_admission"):
        outputs.append({"type": {"text": PLANNED_ADMISSION}, "valueDate": referral["planned_admission"]})
    if referral.get("episode_of_care"):
        episode = {"reference": referral["episode_of_care"]}
        outputs.append({"type": {"text": EPISODE_OF_CARE}, "valueReference": episode})
    if outputs:
        body["output"] = outputs
    else:
        body.pop("output", None)
    body["lastModified"] = modified
    return body


def task_identifier(referral_id: str) -> dict[str, str]:
    """The identifier the copy of a referral Task at the referrer is matched by when the Task has none of its own."""
    return {"system": ids.RECORD_SYSTEM, "value": ids.identifier_value(KIND, referral_id, "task")}


def outbound_task(
    task: dict[str, Any],
    referral_id: str,
    base_url: str,
    service_request: dict[str, Any] | None = None,
    patient: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Task as the referrer receives it: references to resources on this server become absolute URLs (the
    referrer's server holds none of them), and focus and for also carry the identifiers the referrer itself gave
    its ServiceRequest and Patient, so it can match them without following the URLs."""
    body: dict[str, Any] = _absolute(copy.deepcopy(task), base_url.rstrip("/"))
    for element, target in (("focus", service_request), ("for", patient)):
        reference = body.get(element)
        identifiers = [i for i in (target or {}).get("identifier", []) if i.get("system") and i.get("value")]
        if isinstance(reference, dict) and "identifier" not in reference and identifiers:
            reference["identifier"] = {"system": identifiers[0]["system"], "value": identifiers[0]["value"]}
    own = task_identifier(referral_id)
    if own not in body.get("identifier", []):
        body["identifier"] = [*body.get("identifier", []), own]
    return body


def delivery_bundle(outbound: dict[str, Any]) -> dict[str, Any]:
    """One conditional update of the Task, with the Part 2 labels and redisclosure notice. The referrer's own Task
    identifier is the condition when it gave one (its copy is updated); else the referral's identifier (a copy is
    created once, then updated)."""
    bundle = package.transaction([outbound], labels=[dict(label) for label in PART2_LABELS])
    theirs = next(
        (
            i
            for i in outbound.get("identifier", [])
            if i.get("system") and i.get("value") and i.get("system") != ids.RECORD_SYSTEM
        ),
        None,
    )
    if theirs is not None:
        entry = bundle["entry"][0]
        entry["request"]["url"] = (
            f"Task?identifier={quote(str(theirs['system']), safe=':/')}|{quote(str(theirs['value']), safe='/.-')}"
        )
        entry["resource"].pop("id", None)
    return bundle


def with_consent(
    tx: WriteTx, bundle: dict[str, Any], record: StoredRecord, partner: str
) -> tuple[dict[str, Any], str | None]:
    """The admission push-back with the patient's Consent to the referrer in place of any it carried, and why it
    may not go (None when a consent permits it). The Consent names the patient as the referrer's Task does (its
    copy there has no Patient of ours to point to)."""
    reader = pushes.TxReader(tx)
    entries = [e for e in bundle.get("entry", []) if e["resource"].get("resourceType") != "Consent"]
    tasks = [e["resource"] for e in entries if e["resource"].get("resourceType") == "Task"]
    patient = pushes.patient_of(reader, record)
    decided = pushes.decision(
        pushes.consents(reader, patient),
        partner,
        tasks,
        pushes.today(),
        bundle_labels=(bundle.get("meta") or {}).get("security", []),
    )
    rebuilt = {**bundle, "entry": entries}
    consent = _current(tx, "Consent", decided.consent.split("/", 1)[1]) if decided.consent else None
    if not decided.permit or consent is None:
        return rebuilt, pushes.blocked_reason(partner, decided)
    subject = next((t["for"] for t in tasks if isinstance(t.get("for"), dict)), None)
    if subject is not None:
        consent["patient"] = copy.deepcopy(subject)
    rebuilt["entry"] = [*entries, *package.transaction([consent])["entry"]]
    return rebuilt, None


def _absolute(value: Any, base_url: str) -> Any:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and _LOCAL_REFERENCE.fullmatch(item):
                value[key] = f"{base_url}/{item}"
            else:
                _absolute(item, base_url)
    elif isinstance(value, list):
        for item in value:
            _absolute(item, base_url)
    return value


def enrollment_for(referral: dict[str, Any], given: dict[str, Any], base_url: str) -> dict[str, Any]:
    """The enrollment payload of an admission: what staff sent, with the patient, diagnoses and referral taken from
    the referral where they left them out. ``referral.service_request`` is always the referral's ServiceRequest."""
    payload = dict(given)
    if "patient" not in payload and referral.get("patient"):
        payload["patient"] = referral["patient"]
    known = [d for d in referral.get("diagnoses", []) if d.get("system") in DIAGNOSIS_SYSTEMS.values()]
    if "diagnoses" not in payload and known:
        payload["diagnoses"] = known
    source = payload.get("referral", {})
    if isinstance(source, dict):
        link = f"{base_url.rstrip('/')}/{referral['service_request']}"
        if source.get("service_request", link) != link:
            raise Invalid(
                [
                    Issue(
                        "invariant",
                        f"must be the referral's ServiceRequest ({link}) or left out",
                        "enrollment.referral.service_request",
                    )
                ]
            )
        organization = (referral.get("referring") or {}).get("organization")
        payload["referral"] = {
            "source": DEFAULT_REFERRAL_SOURCE,
            **({"organization": organization} if organization else {}),
            **source,
            "service_request": link,
        }
    return payload


def check_transition(referral_id: str, status: str, action: str) -> str:
    """The status ``action`` leads to from ``status``; Conflict naming the current status if it is not allowed."""
    target, allowed = ACTIONS[action]
    if status not in allowed:
        raise Conflict(
            f"referral {referral_id} is {status}; {action} is allowed only when it is {' or '.join(allowed)}",
            "status",
            code="business-rule",
        )
    return target


# -- the write hook: intake ---------------------------------------------------------------------------------------


def on_resource_stored(
    tx: WriteTx, resource: dict[str, Any], stored: StoredResource, *, engine: Engine | None = None
) -> None:
    """Repository write hook: the first version of an inbound referral Task creates its referral record, in the
    Task's transaction. A Task for a ServiceRequest that already has a referral (a replayed Bundle: the Task has no
    condition) is recorded as a duplicate of it and follows its changes. ``engine`` reads the Patient and
    Conditions back through the enrollment mapping (runtime.py gives it)."""
    if stored.res_type != "Task" or stored.version_id != 1 or not is_referral_task(resource):
        return
    sr_id = local_id(resource["focus"], "ServiceRequest")
    service_request = _current(tx, "ServiceRequest", sr_id)
    if service_request is None:
        return
    tx.lock(f"{KIND}:ServiceRequest/{sr_id}")
    existing = _referral_for(tx, f"ServiceRequest/{sr_id}", stored.res_id)
    if existing is not None:
        duplicates = [*existing.content.get("duplicate_tasks", []), f"Task/{stored.res_id}"]
        tx.save_referral(
            replace(
                existing,
                content={**existing.content, "duplicate_tasks": duplicates},
                version=existing.version + 1,
                updated=now_us(),
            )
        )
        return
    patient_id = local_id(resource.get("for"), "Patient") or local_id(service_request.get("subject"), "Patient")
    conditions = [
        found
        for reference in service_request.get("reasonReference", [])
        if (found := _current(tx, "Condition", local_id(reference, "Condition"))) is not None
    ]
    content = referral_from(resource, service_request, _current(tx, "Patient", patient_id), conditions, engine)
    referring = content["referring"]
    if referring["partner"] is not None:
        partner = tx.record("partner", referring["partner"], lock=False)
        if partner is None or partner.status != "active":
            referring["partner"] = None  # not a partner we exchange with: nothing is pushed back
        elif referring["organization"] is None:
            referring["organization"] = partner.content.get("name")
    now = now_us()
    resources = [
        {"role": "task", "reference": content["task"]},
        {"role": "service-request", "reference": content["service_request"]},
    ]
    if patient_id is not None:
        resources.append({"role": "patient", "reference": f"Patient/{patient_id}"})
    tx.save_referral(
        StoredRecord(
            kind=KIND,
            id=stored.res_id,
            enrollment_id=None,
            status="active",
            version=1,
            content=content,
            resources=resources,
            created=now,
            updated=now,
        )
    )
    log.info("referral %s received", stored.res_id)


def _current(tx: WriteTx, res_type: str, res_id: str | None) -> dict[str, Any] | None:
    if res_id is None:
        return None
    found = tx.current(res_type, res_id)
    if found is None or found.deleted or found.content is None:
        return None
    body: dict[str, Any] = orjson.loads(found.content)
    return body


def _referral_for(tx: WriteTx, service_request: str, task_id: str) -> StoredRecord | None:
    """The referral of another Task with the same focus, if there is one."""
    request = search.parse("Task", [("focus", service_request), ("_count", "100")], default_count=100, max_count=100)
    for match in tx.search(request).matches:
        if match.res_id == task_id:
            continue
        referral = tx.referral(match.res_id)
        if referral is not None:
            return referral
    return None


# -- staff decisions ----------------------------------------------------------------------------------------------


class ReferralService:
    """Lists referrals and applies staff decisions: each one updates the referral record and its Task(s) in one
    transaction, and enqueues the updated Task for the referring partner when the referral names one."""

    def __init__(self, repository: Repository, records: RecordService) -> None:
        self.repository = repository
        self.store = repository.store
        self.records = records

    def list_referrals(self, *, status: str | None, offset: int, count: int) -> dict[str, Any]:
        page, total = self.store.referrals(status=status, offset=offset, count=count)
        return {"total": total, "offset": offset, "count": count, "items": [body(r) for r in page]}

    def get(self, referral_id: str) -> dict[str, Any]:
        return body(self._record(referral_id))

    def accept(self, referral_id: str, planned_admission: str, base_url: str) -> dict[str, Any]:
        return self._decide(referral_id, "accept", {"planned_admission": planned_admission}, base_url)

    def decline(self, referral_id: str, reason: str, base_url: str) -> dict[str, Any]:
        return self._decide(referral_id, "decline", {"decline_reason": reason}, base_url)

    def no_show(self, referral_id: str, base_url: str) -> dict[str, Any]:
        return self._decide(referral_id, "no-show", {}, base_url)

    def admit(self, referral_id: str, enrollment: dict[str, Any], base_url: str) -> dict[str, Any]:
        """Records the enrollment (linked to the referral's ServiceRequest), then completes the Task with its
        EpisodeOfCare. These are two transactions: if the second fails the enrollment stays, and admitting again
        finds it (a repeated enrollment with the same content is not a new one) and completes the Task."""
        record = self._record(referral_id)
        check_transition(referral_id, record.content["status"], "admit")
        with _within("enrollment"):
            payload = schemas.load("enrollment", enrollment_for(record.content, enrollment, base_url))
            created, _ = self.records.create("enrollment", payload)
        enrollment_id = str(created["id"])
        stored = self.store.record("enrollment", enrollment_id)
        episode = next((r["reference"] for r in (stored.resources if stored else []) if r["role"] == "episode"), None)
        return self._decide(
            referral_id, "admit", {"enrollment_id": enrollment_id, "episode_of_care": episode}, base_url
        )

    def _record(self, referral_id: str) -> StoredRecord:
        found = self.store.referral(referral_id)
        if found is None:
            raise NotFound(f"there is no referral with id {referral_id[:80]!r}", "id")
        return found

    def _decide(self, referral_id: str, action: str, changes: dict[str, Any], base_url: str) -> dict[str, Any]:
        with self.store.write() as tx:
            record = tx.referral(referral_id)
            if record is None:
                raise NotFound(f"there is no referral with id {referral_id[:80]!r}", "id")
            current = record.content["status"]
            target = check_transition(referral_id, current, action)
            task_id = record.content["task"].split("/", 1)[1]
            task = _current(tx, "Task", task_id)
            if task is None or task.get("status") != TASK_STATUS[current]:
                shown = "deleted" if task is None else task.get("status")
                raise Conflict(
                    f"Task/{task_id} is {shown}, changed at the FHIR API since the referral became {current}; "
                    "the referral cannot change",
                    "task",
                    code="business-rule",
                )
            now = now_us()
            content = {**record.content, **changes, "status": target}
            updated = replace(
                record,
                content=content,
                version=record.version + 1,
                updated=now,
                enrollment_id=content.get("enrollment_id"),
            )
            tx.save_referral(updated)
            written = self._write_task(tx, task, content, now)
            for reference in content.get("duplicate_tasks", []):
                duplicate = _current(tx, "Task", reference.split("/", 1)[1])
                if duplicate is not None:
                    self._write_task(tx, duplicate, content, now)
            partner = (content.get("referring") or {}).get("partner")
            if partner:
                self._push(tx, partner, updated, written, base_url)
            log.info("referral %s %s", referral_id, target)
            return body(updated)

    def _push(self, tx: WriteTx, partner: str, record: StoredRecord, task: dict[str, Any], base_url: str) -> None:
        """Enqueue the updated Task for the referring partner, in the decision's transaction; the admission only
        with the patient's consent (module docstring), else blocked until one is recorded."""
        referral = record.content
        service_request = _current(tx, "ServiceRequest", referral["service_request"].split("/", 1)[1])
        patient = _current(tx, "Patient", local_id(task.get("for"), "Patient"))
        outbound = outbound_task(task, record.id, base_url, service_request, patient)
        bundle, blocked = delivery_bundle(outbound), None
        if not pushes.answers_before_admission(KIND, bundle):
            bundle, blocked = with_consent(tx, bundle, record, partner)
        outbox.enqueue(tx, partner, KIND, record.id, "bundle", outbox.bundle_payload(bundle), blocked=blocked)

    def _write_task(self, tx: WriteTx, task: dict[str, Any], referral: dict[str, Any], now: int) -> dict[str, Any]:
        changed = task_for(task, referral, instant(now))
        errors = [
            i
            for i in validation.validate(changed, expected_type="Task", expected_id=changed["id"], require_id=True)
            if i.severity in ("error", "fatal")
        ]
        if errors:
            # The referrer's Task was valid and only our elements changed: this is a gap on our side.
            raise Unprocessable(issues=errors)
        stored = self.repository.update_in(tx, "Task", changed["id"], changed).stored
        written: dict[str, Any] = orjson.loads(stored.content or b"{}")
        return written


def body(record: StoredRecord) -> dict[str, Any]:
    """A referral as /iop/referrals shows it."""
    return {
        "id": record.id,
        **record.content,
        "fhir": [r["reference"] for r in record.resources],
        "meta": {
            "kind": record.kind,
            "status": record.status,
            "version": record.version,
            "created": instant(record.created),
            "updated": instant(record.updated),
        },
    }


@contextmanager
def _within(prefix: str) -> Iterator[None]:
    """Errors about the enrollment payload point into the admission body (``enrollment.patient.name``)."""
    try:
        yield
    except FhirError as exc:
        exc.issues = [
            i
            if i.expression is None or i.expression.startswith(f"{prefix}.")
            else replace(i, expression=f"{prefix}.{i.expression}")
            for i in exc.issues
        ]
        raise
