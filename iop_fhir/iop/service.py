"""The life of an IOP record: check, map, validate and store it with its FHIR resources in one transaction;
replay, update, retract, and read it back. The functions at the bottom are what the /iop views call."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

import orjson
from flask import current_app

from iop_fhir.errors import Conflict, Invalid, Issue, NotFound, Unprocessable
from iop_fhir.fhir.repository import Repository
from iop_fhir.iop import persons
from iop_fhir.mapping import ids
from iop_fhir.mapping.engine import PART2_LABELS, Engine, Overlay, Produced, merge
from iop_fhir.mapping.spec import DuringSpec
from iop_fhir.outcomes import patient, stays
from iop_fhir.outcomes.load import Reader as OutcomeReader
from iop_fhir.r4 import validation
from iop_fhir.r4.instants import instant, now_us
from iop_fhir.store.base import RecordTx, StoredRecord, WriteTx

log = logging.getLogger("iop_fhir.records")
ACTIVE, RETRACTED = "active", "entered-in-error"
PLURALS = {
    "enrollment": "enrollments",
    "assessment": "assessments",
    "treatment-plan": "treatment-plans",
    "session": "sessions",
    "group-session": "group-sessions",
    "consent": "consents",
    "discharge": "discharges",
    "medication": "medications",
    "partner": "partners",
}
# Fields that, once set, a PUT may neither change nor drop: a revoked consent stays revoked (42 CFR §2.31(a)(4)); the
# patient signs a new consent instead.
SET_ONCE = {"consent": ("revoked_on",)}
# Kinds whose mappings give work to the enrollment's care team (an assessment's suicide-risk review Task): their
# context names the treatment plan whose CareTeam that is ($context.care_team_plan).
CARE_TEAM_KINDS = ("assessment",)


@dataclass
class _Write:
    """Everything one request writes: the resources (by reference) and the records."""

    resources: dict[str, Produced] = field(default_factory=dict)
    roles: list[dict[str, str]] = field(default_factory=list)
    # The references the mappings give an enrollment's patient → the person's Patient (iop/persons.py).
    moved: dict[str, str] = field(default_factory=dict)

    def add(self, produced: Produced, role: str) -> None:
        if self.moved:
            produced = persons.rehome(produced, self.moved)
        self.resources[produced.reference] = produced
        entry = {"role": role, "reference": produced.reference}
        if entry not in self.roles:
            self.roles.append(entry)

    def keep_identifiers(self, tx: WriteTx) -> None:
        """A person's Patient keeps the identifiers it had (iop/persons.py)."""
        for reference in set(self.moved.values()) & set(self.resources):
            produced = self.resources[reference]
            current = tx.current("Patient", reference.split("/", 1)[1])
            resource = persons.keep_identifiers(produced.resource, current)
            self.resources[reference] = Produced(produced.role, resource, produced.shared)


# Called inside the write transaction after a record is saved or retracted (the exchange enqueues deliveries).
RecordHook = Callable[[WriteTx, StoredRecord, Any], None]
# Adds members to a record as the API returns it (a discharge's transition status).
RecordExtra = Callable[[StoredRecord, Any], dict[str, Any] | None]


class RecordService:
    def __init__(
        self,
        engine: Engine,
        repository: Repository,
        hooks: Iterable[RecordHook] = (),
        extras: Iterable[RecordExtra] = (),
        outcomes: OutcomeReader | None = None,
    ) -> None:
        self.engine = engine
        self.outcomes = outcomes
        self.repository = repository
        self.store = repository.store
        self.hooks = list(hooks)
        self.extras = list(extras)

    # -- public operations -----------------------------------------------------------------------------------

    def create(self, kind: str, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        with self.store.write() as tx:
            context = self._context(tx, kind, payload)
            derived = self.engine.prepare(kind, payload, context)
            rid = self.engine.natural_key(kind, derived.record)
            existing = tx.record(kind, rid)
            if existing is not None and existing.status == ACTIVE:
                if existing.content == derived.record:
                    return self._body(existing, derived.warnings), False
                text = (
                    f"this {kind} is already recorded as {rid} with different content; "
                    f"send PUT /iop/{PLURALS[kind]}/{rid} to change it"
                )
                # One issue per field of the key that names the record: those are what collide.
                raise Conflict(issues=[Issue("duplicate", text, path) for path in self._key_paths(kind)])
            stored = self._save(tx, kind, rid, derived.record, existing, context)
        # After the commit: what the body adds (a transition's delivery) is read back through the store.
        return self._body(stored, derived.warnings), True

    def update(self, kind: str, rid: str, payload: dict[str, Any]) -> dict[str, Any]:
        with self.store.write() as tx:
            existing = self._existing(tx, kind, rid)
            for name in SET_ONCE.get(kind, ()):
                if existing.content.get(name) is not None and payload.get(name) != existing.content[name]:
                    raise Conflict(
                        f"{name} of {kind} {rid} is {existing.content[name]} and cannot be changed or removed",
                        name,
                        code="business-rule",
                    )
            context = self._context(tx, kind, payload)
            derived = self.engine.prepare(kind, payload, context)
            spec = self.engine.spec(kind)
            if spec.id is not None and self.engine.natural_key(kind, derived.record) != rid:
                raise Invalid([Issue("value", f"must be '{rid}', the id in the URL", spec.id.lstrip("$"))])
            if spec.enrollment and derived.record.get("enrollment_id") != existing.enrollment_id:
                raise Invalid(
                    [Issue("value", "a record cannot move to another enrollment; retract it instead", "enrollment_id")]
                )
            stored = self._save(tx, kind, rid, derived.record, existing, context)
        return self._body(stored, derived.warnings)

    def revoke(self, rid: str, revoked_on: str) -> dict[str, Any]:
        """The patient withdraws a consent from ``revoked_on`` (42 CFR §2.31(a)(4)): the record keeps the day and
        its Consent becomes inactive (mappings/consent.yaml), so no disclosure rests on it any more. Unlike a
        retraction (an entry made in error), the consent stays on record as having been given. Revoking again on the
        same day changes nothing; another day is a conflict."""
        existing = self.store.record("consent", rid)
        if existing is None:
            raise NotFound(f"consent {rid} is not known", "id")
        if existing.status == RETRACTED:
            raise Conflict(f"consent {rid} was entered in error; nothing to revoke", "id", code="business-rule")
        if existing.content.get("revoked_on") == revoked_on:
            return self._body(existing, [])
        if revoked_on < str(existing.content.get("signed_on", "")):
            raise Invalid(
                [Issue("invariant", f"must not be before signed_on ({existing.content['signed_on']})", "revoked_on")]
            )
        return self.update("consent", rid, {**existing.content, "revoked_on": revoked_on})

    def retract(self, kind: str, rid: str, reason: str | None) -> dict[str, Any]:
        with self.store.write() as tx:
            existing = self._existing(tx, kind, rid)
            if existing.status == RETRACTED:
                return self._body(existing, [])
            write = _Write()
            for entry in existing.resources:
                role = entry["role"]
                if ":" in role:  # a change to another record's resource: undone by re-mapping that record below
                    continue
                res_type, res_id = entry["reference"].split("/", 1)
                current = tx.current(res_type, res_id)
                if current is None or current.deleted:
                    continue
                spec_role = _role(self.engine, kind, role) if role != "provenance" else None
                if spec_role is None or spec_role.shared is not None:
                    continue
                if (
                    kind == "enrollment"
                    and role == "patient"
                    and persons.shared_with_another(tx, rid, entry["reference"])
                ):
                    continue  # the person's Patient stays active for their other enrollment
                resource = _json(current.content)
                write.add(Produced(role, self.engine.retracted(kind, role, resource)), role)
            stored = replace(
                existing,
                status=RETRACTED,
                version=existing.version + 1,
                updated=now_us(),
                content={**existing.content, **({"retraction_reason": reason} if reason else {})},
            )
            tx.save_record(stored)
            self._rematerialize_targets(tx, kind, existing)
            self._write_resources(tx, write)
            self._provenance(tx, stored, write, "NULLIFY")
            for hook in self.hooks:
                hook(tx, stored, self.store)
        return self._body(stored, [])

    def get(self, kind: str, rid: str) -> dict[str, Any]:
        record = self.store.record(kind, rid)
        if record is None:
            raise NotFound(f"{kind} {rid} is not known", "id")
        return self._body(record, [])

    def put_singleton(self, kind: str, payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Creates or replaces the one record of ``kind`` (the program's organization): 201 the first time, 200
        after, and 200 with nothing written when the content is the same. Its id is chosen once: a record with
        another id is a conflict (one program organization per service)."""
        with self.store.write() as tx:
            tx.lock(f"record:{kind}")  # two first PUTs with different ids may not both create one
            current = self._singleton(kind)
            rid = str(payload.get("id"))
            if current is not None and current.id != rid:
                raise Conflict(
                    f"the {kind} is recorded as {current.id!r}; the service has one, and its id cannot change",
                    "id",
                    code="business-rule",
                )
            existing = tx.record(kind, rid) if current is not None else None
            derived = self.engine.prepare(kind, payload, {})
            if existing is not None and existing.content == derived.record:
                return self._body(existing, derived.warnings), 200
            stored = self._save(tx, kind, rid, derived.record, existing, {})
        return self._body(stored, derived.warnings), 200 if existing is not None else 201

    def get_singleton(self, kind: str) -> dict[str, Any]:
        record = self._singleton(kind)
        if record is None:
            raise NotFound(f"no {kind} is recorded yet; send PUT /iop/{kind}")
        return self._body(record, [])

    def _singleton(self, kind: str) -> StoredRecord | None:
        records, _ = self.store.records(kind, offset=0, count=1)
        return records[0] if records else None

    def _organization_context(self) -> dict[str, Any]:
        """The program's organization record as $context.organization (templates reference its Organization once it
        is recorded; resources mapped before that are not rewritten)."""
        organization = self._singleton("organization")
        return {"organization": {"id": organization.id, **organization.content}} if organization is not None else {}

    def list_records(self, kind: str, *, enrollment_id: str | None, offset: int, count: int) -> dict[str, Any]:
        records, total = self.store.records(kind, enrollment_id=enrollment_id, offset=offset, count=count)
        return {
            "total": total,
            "offset": offset,
            "count": count,
            "items": [self._body(r, []) for r in records],
        }

    def reverse(self, record: StoredRecord) -> dict[str, Any]:
        """The record rebuilt from its stored FHIR resources (the reverse mapping)."""
        produced = []
        for entry in record.resources:
            if entry["role"] == "provenance":
                continue
            res_type, res_id = entry["reference"].split("/", 1)
            current = self.store.read(res_type, res_id)
            if current is not None and not current.deleted:
                produced.append((entry["role"], _json(current.content)))

        def resolve(reference: str) -> dict[str, Any] | None:
            res_type, _, res_id = reference.partition("/")
            current = self.store.read(res_type, res_id)
            return _json(current.content) if current is not None and not current.deleted else None

        return self.engine.reverse(record.kind, produced, resolve)

    # -- steps -----------------------------------------------------------------------------------------------

    def _key_paths(self, kind: str) -> list[str]:
        """The JSON paths of the fields whose values name a record of ``kind`` ($a.b.0.c as a.b[0].c)."""
        spec = self.engine.spec(kind)
        paths = []
        for part in [spec.id] if spec.id is not None else spec.key:
            if not isinstance(part, str) or not part.startswith("$"):
                continue
            steps = part[1:].split(".")
            paths.append("".join(f"[{s}]" if s.isdigit() else f".{s}" for s in steps).lstrip("."))
        return paths

    def _existing(self, tx: RecordTx, kind: str, rid: str) -> StoredRecord:
        existing = tx.record(kind, rid)
        if existing is None:
            raise NotFound(f"{kind} {rid} is not known", "id")
        return existing

    def _context(self, tx: RecordTx, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Checks the records the payload names (enrollment, partners) and gathers what the rules need."""
        spec = self.engine.spec(kind)
        if spec.expand is not None:
            return self._members_context(tx, kind, payload)
        issues: list[Issue] = []
        context: dict[str, Any] = self._organization_context()
        for path, target_kind in spec.references.items():
            value = _get(payload, path)
            if value is None:
                continue
            target = tx.record(target_kind, str(value), lock=False)
            if target is None or target.status != ACTIVE:
                state = "is not known" if target is None else "was entered in error"
                issues.append(Issue("not-found", f"{target_kind} '{value}' {state}", path))
            elif target_kind == "enrollment":
                context["enrollment"] = target
                program = self.engine.terminology.concept("program", target.content.get("program", ""))
                context["age_group"] = ((program or {}).get("properties") or {}).get("age-group", "adult")
                # The patient's administrative gender: AUDIT-C's positive cut-off depends on it (assessment.yaml).
                context["gender"] = (target.content.get("patient") or {}).get("gender")
                # The codes of the enrollment's diagnoses: the Conditions a plan addresses (treatment-plan.yaml).
                context["diagnoses"] = [dx.get("code") for dx in target.content.get("diagnoses") or ()]
                if kind in CARE_TEAM_KINDS:
                    context.update(self._care_team(tx, target.id))
                if "expected-positives" in spec.derive:
                    context["medications"] = self._medications(target.id)
                if kind == "discharge":
                    # What a step-up's ServiceRequest names as supportingInfo (discharge.yaml).
                    context["transition_support"] = self._transition_support(target.id, payload)
                    context["outcome_summary"] = self._outcome_summary(target.id, payload)
        if spec.during is not None and "enrollment" in context:
            issues.extend(self._outside_enrollment(tx, spec.during, payload, context["enrollment"]))
        if issues:
            raise Unprocessable(issues=issues)
        return context

    def _outside_enrollment(
        self, tx: RecordTx, during: DuringSpec, payload: dict[str, Any], enrollment: StoredRecord
    ) -> list[Issue]:
        """A record dated outside its enrollment, from admission to discharge (a span: not overlapping it). Dates
        are compared as the days written (an instant's local date). A retracted discharge reopens the enrollment."""
        admitted = str(enrollment.content.get("admission_date") or "")
        discharge = tx.record("discharge", ids.record_id("discharge", [enrollment.id]), lock=False)
        discharged = (
            str(discharge.content.get("discharge_date") or "")
            if discharge is not None and discharge.status == ACTIVE
            else ""
        )
        start = _get(payload, during.start)
        end = _get(payload, during.end) if during.end is not None else None
        first = str(start)[:10] if isinstance(start, str) else None
        last = str(end)[:10] if isinstance(end, str) else None
        issues: list[Issue] = []
        if discharged and first is not None and first > discharged:
            issues.append(
                Issue(
                    "business-rule",
                    f"{first} is after the enrollment's discharge on {discharged}; retract the discharge to reopen "
                    "the enrollment",
                    during.start,
                )
            )
        if during.end is None and admitted and first is not None and first < admitted:
            issues.append(
                Issue("business-rule", f"{first} is before the enrollment's admission on {admitted}", during.start)
            )
        if during.end is not None and admitted and last is not None and last < admitted:
            text = f"it ended on {last}, before the enrollment's admission on {admitted}"
            issues.append(Issue("business-rule", text, during.end))
        return issues

    def _care_team(self, tx: RecordTx, enrollment_id: str) -> dict[str, Any]:
        """The enrollment's current treatment plan as {"care_team_plan": id}, when that plan has a care team."""
        plan_id = self._current_plan(enrollment_id, tx)
        plan = tx.record("treatment-plan", plan_id, lock=False) if plan_id is not None else None
        return {"care_team_plan": plan_id} if plan is not None and plan.content.get("care_team") else {}

    def _medications(self, enrollment_id: str) -> list[dict[str, Any]]:
        """The enrollment's medication records (not retracted), each with the analytes it explains (the property
        explains of CodeSystem iop-medication): what rule expected-positives reads."""
        records, _ = self.store.records("medication", enrollment_id=enrollment_id, offset=0, count=1000)
        return [
            {
                "id": record.id,
                **{k: record.content.get(k) for k in ("medication", "status", "start", "end", "source")},
                "explains": self.engine.terminology.property_values(
                    "medication", str(record.content.get("medication")), "explains"
                ),
            }
            for record in records
            if record.status == ACTIVE
        ]

    def _outcome_summary(self, enrollment_id: str, discharge: dict[str, Any]) -> str | None:
        """The discharge summary computed from the stay's records as of the discharge day (iop_fhir/outcomes)."""
        day = stays.day_of(discharge.get("discharge_date"))
        if self.outcomes is None or day is None:
            return None
        found = self.outcomes.stays(enrollment_id=enrollment_id).stays
        if not found:
            return None
        goals = {str(g.get("goal")): str(g.get("status")) for g in discharge.get("goal_outcomes") or []}
        stay = replace(found[0], discharge=day, reason=discharge.get("reason"), goal_outcomes=goals)
        return patient.summary(patient.outcomes(stay, self.outcomes.rules, day))

    def _transition_support(self, enrollment_id: str, discharge: dict[str, Any]) -> list[dict[str, str]]:
        """The enrollment's resources a receiving unit needs, as {reference, display}: the substance-use
        Observations of its latest assessment that recorded substance use, the drug screens of the 30 days before
        the discharge, and its medications (their request, else statement, else dispense)."""
        day = str(discharge.get("discharge_date") or "")[:10]
        since = _days_before(day, 30)

        def active(kind: str) -> list[StoredRecord]:
            records, _ = self.store.records(kind, enrollment_id=enrollment_id, offset=0, count=10_000)
            return [r for r in records if r.status == ACTIVE]

        def own(record: StoredRecord, role: str) -> list[str]:
            return [e["reference"] for e in record.resources if e["role"] == role]

        support: list[dict[str, str]] = []
        assessments = [
            a
            for a in active("assessment")
            if own(a, "substance-use") and (not day or str(a.content.get("performed_at"))[:10] <= day)
        ]
        if assessments:
            latest = max(assessments, key=lambda a: str(a.content.get("performed_at")))
            when = str(latest.content.get("performed_at"))[:10]
            support += [
                {"reference": ref, "display": f"Substance use (assessment of {when})"}
                for ref in own(latest, "substance-use")
            ]
        for session in sorted(active("session"), key=lambda r: str(r.content.get("start"))):
            screen = session.content.get("drug_screen")
            when = str((screen or {}).get("collected_at") or session.content.get("start"))[:10]
            if isinstance(screen, dict) and since <= when and (not day or when <= day):
                support += [
                    {"reference": ref, "display": f"Drug screen of {when}"} for ref in own(session, "drug-screen")
                ]
        for medication in active("medication"):
            refs = own(medication, "request") or own(medication, "statement") or own(medication, "dispense")
            name = medication.content.get("medication")
            support += [{"reference": ref, "display": f"Medication: {name}"} for ref in refs[:1]]
        return support

    def _members_context(self, tx: RecordTx, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A group session's context: each attendee's session checked and gathered as a session record of its own
        would be (its enrollment known and active, and whatever else a session's context holds), under "members"
        in list order; an attendee named twice is refused. Issues name the attendee's field."""
        expand = self.engine.spec(kind).expand
        assert expand is not None
        issues: list[Issue] = []
        contexts: list[dict[str, Any]] = []
        first: dict[str, str] = {}
        for member in self.engine.members(kind, payload):
            if member.key in first:
                text = f"{member.key} is already an attendee at {first[member.key]}; each attendee appears once"
                issues.append(Issue("duplicate", text, member.key_path))
            first.setdefault(member.key, member.path)
            try:
                contexts.append(self._context(tx, expand.kind, member.record))
            except Unprocessable as error:
                for found in map(member.issue, error.issues):
                    if found.expression is not None and not found.expression.startswith(member.path):
                        # a field the attendees share (the group's start): say whose enrollment it fails for
                        found = replace(found, diagnostics=f"for {member.path}: {found.diagnostics}")
                    issues.append(found)
                contexts.append({})
        if issues:
            raise Unprocessable(issues=issues)
        return {"members": contexts}

    def _save(
        self,
        tx: WriteTx,
        kind: str,
        rid: str,
        record: dict[str, Any],
        existing: StoredRecord | None,
        context: dict[str, Any],
    ) -> StoredRecord:
        now = now_us()
        spec = self.engine.spec(kind)
        enrollment_id = record.get("enrollment_id") if spec.enrollment else (rid if kind == "enrollment" else None)
        write = _Write(moved=self._moved(tx, kind, rid, record, existing, context))
        for produced in self._own_resources(tx, kind, rid, record, enrollment_id, context):
            write.add(produced, produced.role)
        # Resources of the previous version that this one no longer produces are retracted, never left behind.
        if existing is not None:
            for entry in existing.resources:
                if entry["reference"] in write.resources or entry["role"] == "provenance" or ":" in entry["role"]:
                    continue
                res_type, res_id = entry["reference"].split("/", 1)
                current = tx.current(res_type, res_id)
                role_spec = _role(self.engine, kind, entry["role"])
                if current is None or current.deleted or role_spec is None or role_spec.shared is not None:
                    continue
                write.add(
                    Produced(entry["role"], self.engine.retracted(kind, entry["role"], _json(current.content))),
                    entry["role"],
                )
        stored = StoredRecord(
            kind=kind,
            id=rid,
            enrollment_id=enrollment_id,
            status=ACTIVE,
            version=(existing.version + 1) if existing else 1,
            content=record,
            resources=[],
            created=existing.created if existing else now,
            updated=now,
        )
        if spec.updates:
            for produced, role, applied in self._overlay_targets(tx, kind, rid, record, enrollment_id, active=True):
                if applied:
                    write.add(produced, role)
                else:  # re-mapped without this record's change (an outcome a PUT removed)
                    moved = persons.rehome(produced, write.moved) if write.moved else produced
                    write.resources[moved.reference] = moved
        self._write_resources(tx, write)
        provenance = self._provenance(tx, stored, write, "UPDATE" if existing else "CREATE")
        stored = replace(stored, resources=[*write.roles, {"role": "provenance", "reference": provenance}])
        tx.save_record(stored)
        for hook in self.hooks:
            hook(tx, stored, self.store)
        return stored

    def _own_resources(
        self,
        tx: RecordTx,
        kind: str,
        rid: str,
        record: dict[str, Any],
        enrollment_id: str | None,
        context: dict[str, Any] | None = None,
    ) -> list[Produced]:
        """The record's resources with the changes other records make to them (a discharge closes the episode)."""
        produced = self.engine.map(kind, record, rid, context)
        overlays = self._overlays_on(tx, kind, rid, enrollment_id)
        return [self._apply(p, kind, overlays) for p in produced]

    def _overlays_on(self, tx: RecordTx, kind: str, rid: str, enrollment_id: str | None) -> list[Overlay]:
        if enrollment_id is None:
            return []
        found: list[Overlay] = []
        for source_kind, source_spec in self.engine.specs.items():
            if not any(u.record == kind for u in source_spec.updates):
                continue
            source = tx.record(source_kind, ids.record_id(source_kind, [enrollment_id]), lock=False)
            if source is None or source.status != ACTIVE:
                continue
            if kind == "treatment-plan" and self._current_plan(enrollment_id, tx) != rid:
                continue
            found.extend(
                o for o in self.engine.overlays(source_kind, source.content, source.id) if o.record_kind == kind
            )
        return found

    def _apply(self, produced: Produced, kind: str, overlays: Iterable[Overlay]) -> Produced:
        resource = produced.resource
        for overlay in overlays:
            if overlay.role != produced.role:
                continue
            if overlay.key is not None and resource["id"] != ids.resource_id(
                kind, _record_of(resource, kind), overlay.role, overlay.key
            ):
                continue
            resource = merge(resource, overlay.merge)
        return Produced(produced.role, resource, produced.shared)

    def _overlay_targets(
        self, tx: RecordTx, kind: str, rid: str, record: dict[str, Any], enrollment_id: str | None, *, active: bool
    ) -> list[tuple[Produced, str, bool]]:
        """The resources of other records this record changes (a discharge: the episode, the plan and its goals),
        re-mapped from their own records with this record's changes, or without them once it is retracted.
        Each comes with its role and whether this record changed it."""
        if enrollment_id is None:
            return []
        overlays = self.engine.overlays(kind, record, rid) if active else []
        out: list[tuple[Produced, str, bool]] = []
        issues: list[Issue] = []
        for target_kind in dict.fromkeys(u.record for u in self.engine.spec(kind).updates):
            target_id = enrollment_id if target_kind == "enrollment" else self._current_plan(enrollment_id, tx)
            target = tx.record(target_kind, target_id, lock=True) if target_id else None
            mine = [o for o in overlays if o.record_kind == target_kind]
            if target is None or target.status != ACTIVE:
                issues.extend(
                    Issue("not-found", f"the enrollment has no {target_kind} for this", o.key_path)
                    for o in mine
                    if o.key is not None
                )
                continue
            produced = self.engine.map(target_kind, target.content, target.id, self._target_context(tx, target))
            by_id = {p.resource["id"]: p for p in produced}
            for overlay in mine:
                if overlay.key is None:
                    continue
                if ids.resource_id(target_kind, target.id, overlay.role, overlay.key) not in by_id:
                    known = [
                        str(p.resource["id"]) for p in produced if p.role == overlay.role
                    ]  # ids say nothing to a user: list the keys the target record itself uses
                    keys = self._keys(target_kind, target.content, overlay.role) or known
                    issues.append(
                        Issue(
                            "not-found",
                            f"unknown {overlay.role} key '{overlay.key}'; the {target_kind} has: {', '.join(keys)}",
                            overlay.key_path,
                        )
                    )
            roles = {u.role for u in self.engine.spec(kind).updates if u.record == target_kind}
            for item in produced:
                if item.role not in roles:
                    continue
                applied = [
                    o
                    for o in mine
                    if o.role == item.role
                    and (o.key is None or ids.resource_id(target_kind, target.id, o.role, o.key) == item.resource["id"])
                ]
                out.append((self._apply(item, target_kind, applied), f"{target_kind}:{item.role}", bool(applied)))
        if issues:
            raise Unprocessable(issues=issues)
        return out

    def _target_context(self, tx: RecordTx, target: StoredRecord) -> dict[str, Any]:
        """The context a record another one changes is re-mapped with: what it was mapped with itself (a plan's
        diagnoses, the organization), or the organization alone where a record it names is gone since."""
        try:
            return self._context(tx, target.kind, target.content)
        except Unprocessable:
            return self._organization_context()

    def _keys(self, kind: str, record: dict[str, Any], role: str) -> list[str]:
        """The keys a record's resources of one role are named by (a plan's goal keys)."""
        res_spec = self.engine.spec(kind).resource(role)
        if res_spec.each is None or not isinstance(res_spec.key, str):
            return []
        items = record.get(res_spec.each[1:].split(".")[0]) or []
        field = res_spec.key.split(".", 1)[1] if "." in res_spec.key else None
        return [str(i.get(field)) for i in items if isinstance(i, dict) and field]

    def _rematerialize_targets(self, tx: WriteTx, kind: str, existing: StoredRecord) -> None:
        if not self.engine.spec(kind).updates:
            return
        write = _Write(moved=self._moved(tx, kind, existing.id, existing.content, existing, {}))
        for produced, role, _applied in self._overlay_targets(
            tx, kind, existing.id, existing.content, existing.enrollment_id, active=False
        ):
            write.add(produced, role)
        self._write_resources(tx, write)

    def _current_plan(self, enrollment_id: str, tx: RecordTx) -> str | None:
        """The enrollment's current treatment plan: the active one that starts last."""
        plans, _ = self.store.records("treatment-plan", enrollment_id=enrollment_id, offset=0, count=1000)
        active = [p for p in plans if p.status == ACTIVE]
        if not active:
            return None
        return max(active, key=lambda p: (p.content.get("period", {}).get("start", ""), p.created)).id

    def _moved(
        self,
        tx: WriteTx,
        kind: str,
        rid: str,
        record: dict[str, Any],
        existing: StoredRecord | None,
        context: dict[str, Any],
    ) -> dict[str, str]:
        """Where the patients of the enrollments this record maps for are (iop/persons.py): an enrollment's own
        (chosen now for a new one), the enrollment it belongs to, or each attendee's."""
        pairs: list[tuple[str, str]] = []
        if kind == "enrollment":
            pairs.append((rid, persons.person_for(tx, rid, record, existing)))
        enrollment = context.get("enrollment")
        if enrollment is None and kind != "enrollment" and isinstance(record.get("enrollment_id"), str):
            enrollment = tx.record("enrollment", record["enrollment_id"], lock=False)
        if isinstance(enrollment, StoredRecord):
            pairs.append((enrollment.id, persons.of(enrollment)))
        for member in context.get("members") or ():
            if isinstance(member.get("enrollment"), StoredRecord):
                pairs.append((member["enrollment"].id, persons.of(member["enrollment"])))
        return persons.aliases(pairs)

    def _write_resources(self, tx: WriteTx, write: _Write) -> None:
        write.keep_identifiers(tx)
        issues: list[Issue] = []
        for produced in write.resources.values():
            resource = produced.resource
            reference = produced.reference
            for issue in validation.validate(resource, expected_type=resource["resourceType"], model_check=False):
                if issue.severity in ("error", "fatal"):
                    issues.append(_produced_issue(reference, produced.role, issue))
            issues.extend(
                _produced_issue(reference, produced.role, i) for i in self.repository.profile_issues(resource)
            )
        if issues:
            # The record passed its own checks, so this is a gap in a mapping or profile: say where it is.
            log.error("mapped resources fail validation: %s", "; ".join(sorted({i.code for i in issues})))
            raise Unprocessable(issues=issues)
        for produced in write.resources.values():
            resource = produced.resource
            res_type, res_id = resource["resourceType"], resource["id"]
            current = tx.current(res_type, res_id)
            if current is not None and not current.deleted and _same(_json(current.content), resource):
                continue
            self.repository.update_in(tx, res_type, res_id, resource)

    def _provenance(self, tx: WriteTx, record: StoredRecord, write: _Write, activity: str) -> str:
        targets = []
        for reference in write.resources:
            res_type, res_id = reference.split("/", 1)
            current = tx.current(res_type, res_id)
            version = f"/_history/{current.version_id}" if current is not None else ""
            targets.append({"reference": reference + version})
        prov_id = ids.resource_id(record.kind, record.id, "provenance")
        provenance: dict[str, Any] = {
            "resourceType": "Provenance",
            "id": prov_id,
            "meta": {
                "profile": [
                    f"{ids.CANONICAL}/StructureDefinition/iop-record-provenance",
                    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-provenance",
                ],
                "security": copy.deepcopy(PART2_LABELS),
            },
            "target": targets or [{"reference": f"Provenance/{prov_id}"}],
            "recorded": instant(record.updated),
            "activity": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                        "code": activity,
                        "display": {"CREATE": "create", "UPDATE": "revise", "NULLIFY": "nullify"}[activity],
                    }
                ]
            },
            "agent": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                "code": "assembler",
                                "display": "Assembler",
                            }
                        ]
                    },
                    "who": {"display": "iop-fhir"},
                }
            ],
            "entity": [
                {
                    "role": "source",
                    "what": {
                        "identifier": {"system": ids.RECORD_SYSTEM, "value": f"{record.kind}/{record.id}"},
                        "display": f"IOP {record.kind} record, version {record.version}",
                    },
                }
            ],
        }
        self.repository.update_in(tx, "Provenance", prov_id, provenance)
        return f"Provenance/{prov_id}"

        return [dict(label) for label in PART2_LABELS]

    def _body(self, record: StoredRecord, warnings: list[Issue]) -> dict[str, Any]:
        body = {"id": record.id, **record.content}
        body["fhir"] = [r["reference"] for r in record.resources]
        body["meta"] = {
            "kind": record.kind,
            "status": record.status,
            "version": record.version,
            "created": instant(record.created),
            "updated": instant(record.updated),
        }
        if warnings:
            body["warnings"] = [w.to_fhir() for w in warnings]
        for extra in self.extras:
            body.update(extra(record, self.store) or {})
        return body


def _json(content: bytes | None) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(content or b"{}")
    return body


def _days_before(day: str, days: int) -> str:
    """The ISO date ``days`` days before ``day`` ("" when ``day`` is not a date)."""
    try:
        return (date.fromisoformat(day) - timedelta(days=days)).isoformat()
    except ValueError:
        return ""


def _get(payload: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(payload, dict):
            return None
        payload = payload.get(part)
    return payload


def _role(engine: Engine, kind: str, role: str) -> Any:
    try:
        return engine.resource_spec(kind, role)
    except KeyError:
        return None


def _record_of(resource: dict[str, Any], kind: str) -> str:
    for identifier in resource.get("identifier", []):
        if identifier.get("system") == ids.RECORD_SYSTEM:
            parsed = ids.parse_identifier_value(identifier.get("value", ""))
            if parsed and parsed[0] == kind:
                return parsed[1]
    return ""


def _same(stored: dict[str, Any], resource: dict[str, Any]) -> bool:
    def strip(body: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in (body.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
        return {**{k: v for k, v in body.items() if k != "meta"}, "meta": meta}

    return strip(stored) == strip(resource)


def _produced_issue(reference: str, role: str, issue: Issue) -> Issue:
    return Issue(
        issue.code,
        f"the record maps to a resource that is not valid ({reference}, role {role}, at {issue.expression}): "
        f"{issue.diagnostics}",
        None,
        issue.severity,
    )


# -- what the /iop views call ------------------------------------------------------------------------------------


def _service() -> RecordService:
    service: RecordService = current_app.extensions["iop_fhir.records"]
    return service


def create(kind: str, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    return _service().create(kind, payload)


def get(kind: str, record_id: str) -> dict[str, Any]:
    return _service().get(kind, record_id)


def list_records(kind: str, *, enrollment_id: str | None, offset: int, count: int) -> dict[str, Any]:
    return _service().list_records(kind, enrollment_id=enrollment_id, offset=offset, count=count)


def update(kind: str, record_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    return _service().update(kind, record_id, payload)


def retract(kind: str, record_id: str, reason: str | None) -> dict[str, Any]:
    return _service().retract(kind, record_id, reason)


def revoke_consent(record_id: str, revoked_on: str) -> dict[str, Any]:
    return _service().revoke(record_id, revoked_on)


def put_singleton(kind: str, payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
    return _service().put_singleton(kind, payload)


def get_singleton(kind: str) -> dict[str, Any]:
    return _service().get_singleton(kind)
