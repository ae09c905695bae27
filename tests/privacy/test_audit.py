"""AuditEvent shape: the R4 codes for each action, who asked and why, which patient and resources, nothing else."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.privacy import audit
from iop_fhir.privacy.audit import Agent, audit_event, outcome_for_status

VALIDATOR = Path(__file__).resolve().parents[3] / "shared" / "tools" / "fhir-validate"
WHEN = "2026-05-01T14:03:22.123456Z"
PATIENT = "Patient/9f4cb7d0-0db2-5ddc-9703-29499c0e8028"
PLAN = "CarePlan/1b9a4c2e-8d7f-5e6a-9b0c-2d3e4f5a6b7c"
PARTNER = "Organization/test-peer-recovery-center"
CLIENT: Agent = {"client_id": "peer-recovery-backend", "partner": PARTNER, "purpose": "TREAT"}
# Synthetic identifying values a search may carry; they must appear only inside the base64 query.
QUERY = "Patient?family=Testperson&birthdate=1980-02-29&identifier=MRN-000123"

EXPECTED = [
    ("read", "rest", "read", "R"),
    ("vread", "rest", "vread", "R"),
    ("history", "rest", "history", "R"),
    ("search", "rest", "search", "E"),
    ("create", "rest", "create", "C"),
    ("update", "rest", "update", "U"),
    ("patch", "rest", "patch", "U"),
    ("delete", "rest", "delete", "D"),
    ("export", "110106", "operation", "R"),
    ("disclose", "110106", None, "R"),
]


def event(action: str, **changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"outcome": "0", "agent": CLIENT, "patient": PATIENT, "entities": [PLAN], "when": WHEN}
    args.update(changes)
    return audit_event(action, **args)


@pytest.mark.parametrize(("action", "type_code", "subtype", "code"), EXPECTED)
def test_each_action_gets_its_r4_type_subtype_and_action_code(
    action: str, type_code: str, subtype: str | None, code: str
) -> None:
    built = event(action)

    assert built["type"]["code"] == type_code
    assert [s["code"] for s in built.get("subtype", [])] == ([subtype] if subtype else [])
    assert built["action"] == code


def test_read_event_names_client_partner_purpose_patient_and_resource() -> None:
    built = event("read")

    assert built["resourceType"] == "AuditEvent"
    assert "id" not in built
    assert built["type"] == {"system": audit.AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}
    assert built["subtype"] == [{"system": audit.RESTFUL_INTERACTION, "code": "read", "display": "read"}]
    assert (built["recorded"], built["outcome"]) == (WHEN, "0")
    client, partner = built["agent"]
    assert client["requestor"] is True
    assert client["who"] == {"identifier": {"system": audit.CLIENT_SYSTEM, "value": "peer-recovery-backend"}}
    treatment = {"system": audit.ACT_REASON, "code": "TREAT", "display": "treatment"}
    assert client["purposeOfUse"] == [{"coding": [treatment]}]
    assert partner["requestor"] is False
    assert partner["who"] == {"reference": PARTNER}
    assert partner["type"]["coding"][0]["code"] == "IRCP"
    assert built["source"]["observer"] == {"display": "iop-fhir"}
    assert [(e["what"]["reference"], e["role"]["code"]) for e in built["entity"]] == [(PATIENT, "1"), (PLAN, "4")]
    assert built["meta"]["security"] == PART2_LABELS


def test_a_partner_that_writes_is_not_recorded_as_a_recipient() -> None:
    partner = event("update")["agent"][1]

    assert partner == {"who": {"reference": PARTNER}, "requestor": False}


def test_a_client_without_partner_or_purpose_is_the_only_agent() -> None:
    admin: Agent = {"client_id": "admin-console"}
    built = event("search", agent=admin, patient=None, entities=[], query="AuditEvent?_count=10")

    assert built["agent"] == [
        {
            "type": {"coding": [{"system": audit.DICOM, "code": "110150", "display": "Application"}]},
            "who": {"identifier": {"system": audit.CLIENT_SYSTEM, "value": "admin-console"}},
            "requestor": True,
        }
    ]


def test_search_query_is_kept_base64_in_its_own_entity_and_nowhere_else() -> None:
    built = event("search", entities=[PLAN, PLAN, PATIENT], query=QUERY)

    *resources, query = built["entity"]
    assert [e["what"]["reference"] for e in resources] == [PATIENT, PLAN]
    assert base64.b64decode(query["query"]).decode("utf-8") == QUERY
    assert set(query) == {"type", "role", "query"}
    assert query["role"]["code"] == "24"
    text = json.dumps(built)
    for value in ("Testperson", "1980-02-29", "MRN-000123", "family="):
        assert value not in text


def test_entities_carry_only_references_and_codes() -> None:
    built = event("search", query=QUERY)

    for entity in built["entity"]:
        assert set(entity) <= {"what", "type", "role", "query"}
        assert set(entity.get("what", {})) <= {"reference"}
    for agent in built["agent"]:
        assert set(agent) <= {"type", "who", "requestor", "purposeOfUse"}
    assert set(built) == {
        "resourceType", "meta", "type", "subtype", "action", "recorded", "outcome", "agent", "source", "entity"
    }  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        {"entities": ["Patient?name=Testperson"]},
        {"entities": ["Testperson"]},
        {"patient": "Group/g1"},
        {"agent": {"client_id": "c", "partner": "Patient/p1"}},
        {"when": "2026-05-01"},
        {"outcome": "2"},
    ],
    ids=["search-as-entity", "bare-name", "patient-not-patient", "partner-not-organization", "date", "outcome"],
)
def test_anything_but_references_codes_and_an_instant_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        event("read", **changes)


def test_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown audit action"):
        event("browse")


@pytest.mark.parametrize(("status", "outcome"), [(200, "0"), (304, "0"), (403, "4"), (404, "4"), (503, "8")])
def test_outcome_follows_the_http_status(status: int, outcome: str) -> None:
    assert outcome_for_status(status) == outcome


@pytest.mark.peers
def test_every_kind_of_event_passes_the_independent_validator(tmp_path: Path) -> None:
    for action, *_ in EXPECTED:
        built = event(action, outcome="4", query=QUERY if action == "search" else None)
        (tmp_path / f"{action}.json").write_text(json.dumps(built), encoding="utf-8")
    minimal = event("create", agent={"client_id": "c"}, patient=None, entities=[])
    (tmp_path / "minimal.json").write_text(json.dumps(minimal), encoding="utf-8")

    result = subprocess.run([str(VALIDATOR), str(tmp_path)], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert sum(line.startswith("OK ") for line in result.stdout.splitlines()) == len(EXPECTED) + 1, result.stdout
