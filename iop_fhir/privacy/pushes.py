"""What a delivery to a partner discloses, whether the patient's consent permits it at this moment, and the
audit log's row that accounts for it once it is out (42 CFR §2.31, §2.32, §2.24 accounting of disclosures).

One rule for pushes and reads: `security.consent.decide()` over the patient's stored FHIR Consents (whatever wrote
them: /iop/consents or /fhir/Consent), recipient `Organization/<partner id>`, purpose COC (care coordination, which
a consent for treatment, TREAT, covers), on the day the records leave, for the labels of every resource carried.

Which deliveries need a consent is decided by what they carry: a Bundle holding a resource labelled 42CFRPart2
(every resource mapped from an IOP record is, and so is every package built from them) needs one, except a
referral's answers before admission (exchange/referrals.py says why). A labelled Bundle whose patient cannot be
told is refused like one without consent. Blocked reasons name Consents and codes only (no PHI).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol

import orjson

from iop_fhir.privacy import audit, consent
from iop_fhir.r4 import search
from iop_fhir.r4.instants import now_us
from iop_fhir.store.base import REFERRAL, AuditLog, AuditRow, Delivery, SearchResult, StoredRecord, WriteTx

# The purpose a push is decided for, and the purpose of use its AuditEvent records (COC is subsumed by TREAT).
PURPOSE = "COC"
AUDIT_PURPOSE = "TREAT"
CLIENT_ID = "iop-fhir-worker"
NO_CONSENT = "blocked: no consent"
PART2 = (consent.ACT_CODE, "42CFRPart2")
SUBSCRIPTION_PREFIX = "subscription:"
# The record_kind of a referral's push-backs (exchange/referrals.py: KIND).
REFERRAL_KIND = REFERRAL
MAX_CONSENTS = 1000
# What audit_event accepts as an entity: a relative literal reference.
_REFERENCE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}")


class Reader(Protocol):
    """What deciding needs to read: the Store outside a transaction, TxReader inside one."""

    def record(self, kind: str, id: str) -> StoredRecord | None: ...

    def referral(self, id: str) -> StoredRecord | None: ...

    def search(self, request: Any) -> SearchResult: ...


class TxReader:
    """A write transaction read as a Reader: records are read without taking their write locks."""

    def __init__(self, tx: WriteTx) -> None:
        self.tx = tx

    def record(self, kind: str, id: str) -> StoredRecord | None:
        return self.tx.record(kind, id, lock=False)

    def referral(self, id: str) -> StoredRecord | None:
        return self.tx.referral(id, lock=False)

    def search(self, request: Any) -> SearchResult:
        return self.tx.search(request)


def source_of(reader: Reader, row: Delivery) -> StoredRecord | None:
    """The record an outbox row was made from: an inbound referral (kept apart from the IOP records) or an IOP
    record, by the row's record_kind; None for a row made from none (a subscription notification)."""
    if not row.record_id:
        return None
    if row.record_kind == REFERRAL_KIND:
        return reader.referral(row.record_id)
    return reader.record(row.record_kind, row.record_id)


@dataclass(frozen=True)
class Disclosure:
    """A Bundle for a partner: who receives it, whose records it holds, the resources in it, and whether a consent
    must permit it."""

    recipient: str  # Organization/<partner id>
    patient: str | None  # Patient/<id>
    entities: tuple[str, ...]  # Type/id of every entry
    needs_consent: bool


def today() -> date:
    """The day a disclosure is decided for (UTC): the day the records would leave, not the day of the record."""
    return datetime.fromtimestamp(now_us() / 1_000_000, UTC).date()


def of(row: Delivery, reader: Reader) -> Disclosure | None:
    """The disclosure a row makes, or None for a row that is not a Bundle to a partner (subscription
    notifications)."""
    body = row.payload.get("body")
    if row.kind != "bundle" or row.partner_id.startswith(SUBSCRIPTION_PREFIX) or not isinstance(body, dict):
        return None
    source = source_of(reader, row)
    patient = patient_of(reader, source) if source is not None else None
    return Disclosure(
        recipient=f"Organization/{row.partner_id}",
        patient=patient or _bundle_patient(body),
        entities=tuple(references(body)),
        needs_consent=labelled(body) and not answers_before_admission(row.record_kind, body),
    )


def patient_of(reader: Reader, record: StoredRecord) -> str | None:
    """The Patient whose records a record's deliveries hold: its enrollment's, else its own (a referral)."""
    if record.enrollment_id is not None:
        enrollment = reader.record("enrollment", record.enrollment_id)
        found = _role(enrollment, "patient") if enrollment is not None else None
        if found is not None:
            return found
    return _role(record, "patient")


def labelled(bundle: Mapping[str, Any]) -> bool:
    """Whether the Bundle, or a resource in it, carries the 42CFRPart2 label."""
    return any(PART2 in _labels(item) for item in [bundle, *_resources(bundle)])


def answers_before_admission(record_kind: str, bundle: Mapping[str, Any]) -> bool:
    """A referral's answer to the unit that asked (accepted, declined, no-show): none of its Tasks is completed."""
    tasks = [r for r in _resources(bundle) if r.get("resourceType") == "Task"]
    return record_kind == REFERRAL_KIND and bool(tasks) and all(t.get("status") != "completed" for t in tasks)


def references(bundle: Mapping[str, Any]) -> list[str]:
    """Type/id of every entry: from a urn:uuid or relative fullUrl (a conditional update drops the resource id)."""
    found: list[str] = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not resource.get("resourceType"):
            continue
        full_url = str(entry.get("fullUrl") or "")
        res_id = full_url.removeprefix("urn:uuid:") if full_url.startswith("urn:uuid:") else None
        if res_id is None:
            res_id = full_url.split("/", 1)[1] if full_url.startswith(f"{resource['resourceType']}/") else None
        res_id = res_id or resource.get("id")
        reference = f"{resource['resourceType']}/{res_id}"
        if res_id and _REFERENCE.fullmatch(reference) and reference not in found:
            found.append(reference)
    return found


def consents(reader: Reader, patient: str | None) -> list[dict[str, Any]]:
    """The patient's stored FHIR Consents, whatever their status (decide() reads it)."""
    if patient is None:
        return []
    count = str(MAX_CONSENTS)
    request = search.parse(
        "Consent", [("patient", patient), ("_count", count)], default_count=MAX_CONSENTS, max_count=MAX_CONSENTS
    )
    found: list[dict[str, Any]] = []
    for match in reader.search(request).matches:
        if not match.deleted and match.content is not None:
            found.append(orjson.loads(match.content))
    return found


def decision(
    patient_consents: Sequence[Mapping[str, Any]],
    partner_id: str,
    resources: Iterable[Mapping[str, Any]],
    on: date,
    *,
    bundle_labels: Iterable[Mapping[str, Any]] = (),
) -> consent.Decision:
    """Whether every resource may go to the partner: the first decision that does not permit, else the permit (the
    newest Consent permitting the first resource)."""
    shared = list(bundle_labels)
    recipient = f"Organization/{partner_id}"
    permitted: consent.Decision | None = None
    seen: set[frozenset[tuple[Any, Any]]] = set()
    for resource in resources:
        labels = [*_labels(resource, raw=True), *shared]
        key = frozenset((label.get("system"), label.get("code")) for label in labels)  # what decide() reads
        if key in seen:
            continue
        seen.add(key)
        decided = consent.decide(patient_consents, recipient, PURPOSE, labels, on)
        if not decided.permit:
            return decided
        permitted = permitted or decided
    if permitted is None:  # nothing labelled to decide on: decide on the Bundle's own labels
        permitted = consent.decide(patient_consents, recipient, PURPOSE, shared, on)
    return permitted


def refusal(disclosure: Disclosure, bundle: Mapping[str, Any], reader: Reader, on: date) -> str | None:
    """Why the Bundle may not go now (a blocked row's last error), or None when it may."""
    if not disclosure.needs_consent:
        return None
    partner_id = disclosure.recipient.split("/", 1)[1]
    if disclosure.patient is None:
        return f"{NO_CONSENT}: the patient whose records the delivery holds is not known"
    decided = decision(
        consents(reader, disclosure.patient),
        partner_id,
        _resources(bundle),
        on,
        bundle_labels=_labels(bundle, raw=True),
    )
    return None if decided.permit else blocked_reason(partner_id, decided)


def blocked_reason(partner_id: str, decided: consent.Decision) -> str:
    return f"{NO_CONSENT} from the patient to disclose to '{partner_id}' now: {decided.reason}"


def is_blocked_for_consent(row: Delivery) -> bool:
    message = (row.last_error or {}).get("message")
    return row.status == "blocked" and isinstance(message, str) and message.startswith(NO_CONSENT)


def audit_row(disclosure: Disclosure, when_us: int) -> AuditRow:
    """The audit log's row of a delivered disclosure (rendered as a DICOM Export AuditEvent, outcome success, the
    partner as IRCP agent)."""
    agent: audit.Agent = {"client_id": CLIENT_ID, "partner": disclosure.recipient, "purpose": AUDIT_PURPOSE}
    return audit.new_row("disclose", "0", agent, disclosure.patient, list(disclosure.entities), recorded=when_us)


def audit_event(disclosure: Disclosure, when_us: int) -> dict[str, Any]:
    """The AuditEvent of a delivered disclosure, as /fhir/AuditEvent renders its row."""
    return audit.render(audit_row(disclosure, when_us))


def record_audit(log: AuditLog, disclosure: Disclosure, when_us: int) -> str:
    """Commit the disclosure's row to the audit log at once (searchable at /fhir/AuditEvent); returns the reference
    of the AuditEvent it renders as."""
    row = audit_row(disclosure, when_us)
    log.append_audit([row])
    return f"AuditEvent/{row.id}"


def _role(record: StoredRecord | None, role: str) -> str | None:
    if record is None:
        return None
    return next((str(e["reference"]) for e in record.resources if e.get("role") == role), None)


def _bundle_patient(bundle: Mapping[str, Any]) -> str | None:
    return next((r for r in references(bundle) if r.startswith("Patient/")), None)


def _resources(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        e["resource"] for e in bundle.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]


def _labels(item: Mapping[str, Any], *, raw: bool = False) -> list[Any]:
    meta = item.get("meta")
    security = meta.get("security") if isinstance(meta, Mapping) else None
    codings = [c for c in security or [] if isinstance(c, Mapping)]
    if raw:
        return codings
    return [(c.get("system"), c.get("code")) for c in codings]
