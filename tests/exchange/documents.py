"""Golden transition-of-care documents: tests/data/document/<case>.json holds the /iop records of one patient (in the
order they are saved, "{{enrollment_id}}" standing for the enrollment's id) and the discharge; <case>.bundle.json the
document exchange/document.py builds for it (`IOP_FHIR_UPDATE_GOLDEN=1 .venv/bin/pytest tests/exchange/test_document.py`
writes it, to be read by eye before it is committed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iop_fhir.exchange import document

DATA = Path(__file__).resolve().parents[1] / "data" / "document"
CASES = sorted(p.stem for p in DATA.glob("*.json") if not p.name.endswith(".bundle.json"))
# The instant every golden document is dated.
TIMESTAMP = "2026-03-27T17:00:00-04:00"


def save_case(client: Any, name: str) -> tuple[str, str]:
    """Save a case's records and its discharge through /iop; the enrollment's and the discharge's ids."""
    case = json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))
    enrollment_id = ""
    for item in [*case["records"], {"kind": "discharges", "body": case["discharge"]}]:
        body = json.loads(json.dumps(item["body"]).replace("{{enrollment_id}}", enrollment_id))
        if item["kind"] == "organization":
            response = client.put("/iop/organization", json=body)
        else:
            response = client.post(f"/iop/{item['kind']}", json=body)
        assert response.status_code in (200, 201), (item["kind"], response.get_json())
        if item["kind"] == "enrollments":
            enrollment_id = response.get_json()["id"]
    return enrollment_id, response.get_json()["id"]


def permitting_consents(store: Any, record: Any) -> list[str]:
    """The Consents of the discharge's enrollment to its referral's partner (what a transition carries)."""
    partner = (record.content.get("referral") or {}).get("partner")
    consents, _ = store.records("consent", enrollment_id=record.enrollment_id, offset=0, count=100)
    return [
        e["reference"]
        for c in consents
        if c.content.get("recipient") == partner
        for e in c.resources
        if e["role"] == "consent"
    ]


def build(store: Any, discharge_id: str) -> dict[str, Any]:
    record = store.record("discharge", discharge_id)
    resources = document.gather(store, record, consents=permitting_consents(store, record))
    return document.transition_document({"id": record.id, "content": record.content}, resources, timestamp=TIMESTAMP)
