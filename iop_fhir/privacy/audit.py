"""The audit log's events: a row (store/base.py AuditRow) for each interaction with the API and each disclosure to a
partner, and its rendering as an AuditEvent (R4, https://hl7.org/fhir/R4/auditevent.html, shaped as IHE BALP): who
asked, for what purpose, which patient and resources, with what outcome. Built from codes and references only:
protected health information reaches an event only inside the base64 `entity.query` of a search."""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict

from iop_fhir.mapping import ids
from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.r4.ids import time_ordered_id
from iop_fhir.r4.instants import instant
from iop_fhir.store.base import AuditRow

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
SECURITY_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
AUDIT_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CLIENT_SYSTEM = f"{ids.CANONICAL}/sid/client"
OBSERVER = "iop-fhir"

# Interaction → AuditEvent.action (R4 audit-event-action: a search or query is E, "execute").
REST_ACTIONS = {
    "read": "R",
    "vread": "R",
    "history": "R",
    "search": "E",
    "create": "C",
    "update": "U",
    "patch": "U",
    "delete": "D",
    # A batch or transaction Bundle as a whole: "execute", its entries named as entities.
    "batch": "E",
    "transaction": "E",
    # An operation the service runs on request ($validate, an export's status or cancellation).
    "operation": "E",
}
# Records leaving the service in bulk ($export) or pushed to a partner: DICOM 110106 "Export", a code of the R4
# audit-event-type value set; DICOM PS3.15 A.5.3.6 gives Export the event action R.
EXPORT_ACTIONS = {"export": "R", "disclose": "R"}
ACTIONS = frozenset(REST_ACTIONS) | frozenset(EXPORT_ACTIONS)
# Actions whose data go to the client: the partner it acts for is their recipient (accounting of disclosures).
DISCLOSING = frozenset({"read", "vread", "history", "search", "export", "disclose"})
OUTCOMES = frozenset({"0", "4", "8", "12"})
# v3-ActReason displays (R4 v3-codesystems.json, PurposeOfUse) of the purposes TERMINOLOGY.md §6.2 lists.
PURPOSE_DISPLAY = {
    "TREAT": "treatment",
    "ETREAT": "Emergency Treatment",
    "COC": "coordination of care",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "CAREMGT": "care management",
    "PATRQT": "patient requested",
    "PUBHLTH": "public health",
    "HRESCH": "healthcare research",
}

# A literal relative reference and nothing else, so no search string (and no PHI) can ride in one.
_REFERENCE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?")
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


class Agent(TypedDict):
    """Who asked: the registered client, the partner organisation it acts for ("Organization/<id>"), and the purpose
    of use of its token (a v3-ActReason code)."""

    client_id: str
    partner: NotRequired[str]
    purpose: NotRequired[str]


def outcome_for_status(status: int) -> str:
    """AuditEvent.outcome for an HTTP status: success, a failure the client caused (minor), the server's (serious)."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


MAX_ENTITIES = 2000  # references kept in one row: a search page of 1,000 matches and as many included


def new_row(
    action: str,
    outcome: str,
    agent: Agent,
    patient: str | None,
    entities: Sequence[str],
    *,
    recorded: int,
    query: str | None = None,
) -> AuditRow:
    """A row of the audit log, with a new id, checked as `audit_event` checks its arguments (so that every row
    renders); `entities` are kept once each, in order, at most MAX_ENTITIES."""
    references = tuple(dict.fromkeys(entities))[:MAX_ENTITIES]
    _check(action, outcome, agent, patient, references)
    return AuditRow(
        id=time_ordered_id(recorded),
        recorded=recorded,
        action=action,
        outcome=outcome,
        client_id=agent["client_id"],
        on_behalf_of=agent.get("partner"),
        purpose=agent.get("purpose"),
        patient=patient,
        entities=references,
        query=query,
    )


def agent_of(row: AuditRow) -> Agent:
    agent: Agent = {"client_id": row.client_id}
    if row.on_behalf_of:
        agent["partner"] = row.on_behalf_of
    if row.purpose:
        agent["purpose"] = row.purpose
    return agent


def render(row: AuditRow) -> dict[str, Any]:
    """The AuditEvent of one row of the audit log: its id is the row's, meta.lastUpdated its recorded instant, and its
    one version is 1 (a row is never changed)."""
    when = instant(row.recorded)
    event = audit_event(row.action, row.outcome, agent_of(row), row.patient, row.entities, when=when, query=row.query)
    rendered: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": row.id,
        "meta": {"versionId": "1", "lastUpdated": when, **event["meta"]},
    }
    rendered.update((key, value) for key, value in event.items() if key not in rendered)
    return rendered


def audit_event(
    action: str,
    outcome: str,
    agent: Agent,
    patient: str | None,
    entities: Sequence[str],
    *,
    when: str,
    query: str | None = None,
) -> dict[str, Any]:
    """An AuditEvent, without id, for one `action` (an interaction name of `ACTIONS`) recorded at instant `when`.

    `entities` are the references of the resources read, written or disclosed; `query` is the search as received
    (type and parameters), stored base64 in `entity.query` as R4 prescribes. The event carries the Part 2 labels:
    that a patient appears in it is itself Part 2 information.
    """
    _check(action, outcome, agent, patient, entities)
    if not _INSTANT.fullmatch(when):
        raise ValueError("when must be a FHIR instant (date, time to the second, time zone)")

    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "meta": {"security": copy.deepcopy(PART2_LABELS)},
    }
    if action in REST_ACTIONS:
        event["type"] = {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}
        event["subtype"] = [{"system": RESTFUL_INTERACTION, "code": action, "display": action}]
        event["action"] = REST_ACTIONS[action]
    else:
        event["type"] = {"system": DICOM, "code": "110106", "display": "Export"}
        if action == "export":
            event["subtype"] = [{"system": RESTFUL_INTERACTION, "code": "operation", "display": "operation"}]
        event["action"] = EXPORT_ACTIONS[action]
    event["recorded"] = when
    event["outcome"] = outcome
    event["agent"] = _agents(action, agent)
    event["source"] = {
        "observer": {"display": OBSERVER},
        "type": [{"system": SECURITY_SOURCE_TYPE, "code": "4", "display": "Application Server"}],
    }
    entity = _entities(patient, entities, query)
    if entity:
        event["entity"] = entity
    return event


def _check(action: str, outcome: str, agent: Agent, patient: str | None, entities: Sequence[str]) -> None:
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}; expected one of {sorted(ACTIONS)}")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown audit outcome {outcome!r}; expected one of {sorted(OUTCOMES)}")
    for reference in entities:
        _check_reference(reference, None)
    if patient is not None:
        _check_reference(patient, "Patient")
    if "partner" in agent:
        _check_reference(agent["partner"], "Organization")


def _check_reference(reference: str, resource_type: str | None) -> None:
    if not _REFERENCE.fullmatch(reference):
        raise ValueError(f"not a relative reference: {reference!r}")
    if resource_type is not None and reference.split("/", 1)[0] != resource_type:
        raise ValueError(f"expected a {resource_type} reference, got {reference!r}")


def _agents(action: str, agent: Agent) -> list[dict[str, Any]]:
    client: dict[str, Any] = {
        "type": {"coding": [{"system": DICOM, "code": "110150", "display": "Application"}]},
        "who": {"identifier": {"system": CLIENT_SYSTEM, "value": agent["client_id"]}},
        "requestor": True,
    }
    purpose = agent.get("purpose")
    if purpose:
        coding = {"system": ACT_REASON, "code": purpose}
        if purpose in PURPOSE_DISPLAY:
            coding["display"] = PURPOSE_DISPLAY[purpose]
        client["purposeOfUse"] = [{"coding": [coding]}]
    agents = [client]
    partner = agent.get("partner")
    if partner:
        organisation: dict[str, Any] = {"who": {"reference": partner}, "requestor": False}
        if action in DISCLOSING:
            organisation["type"] = {
                "coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP", "display": "information recipient"}]
            }
        agents.append(organisation)
    return agents


def _entities(patient: str | None, references: Sequence[str], query: str | None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if patient is not None:
        found.append(_entity(patient, ("1", "Person"), ("1", "Patient")))
    for reference in dict.fromkeys(references):
        if reference != patient:
            found.append(_entity(reference, ("2", "System Object"), ("4", "Domain Resource")))
    if query is not None:
        entity = _entity(None, ("2", "System Object"), ("24", "Query"))
        entity["query"] = base64.b64encode(query.encode("utf-8")).decode("ascii")
        found.append(entity)
    return found


def _entity(reference: str | None, kind: tuple[str, str], role: tuple[str, str]) -> dict[str, Any]:
    entity: dict[str, Any] = {}
    if reference is not None:
        entity["what"] = {"reference": reference}
    entity["type"] = {"system": AUDIT_ENTITY_TYPE, "code": kind[0], "display": kind[1]}
    entity["role"] = {"system": OBJECT_ROLE, "code": role[0], "display": role[1]}
    return entity
