"""The closed loop of a transition end to end against an independent FHIR server playing the aftercare provider
(../shared/tools/ehr-server): the worker delivers the referral, the provider accepts it, schedules the first visit
(an Appointment on its server) and reports it attended, each on its copy of the Task; following the Task brings each
step back onto ours, and the discharge view shows them in order."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
from pypdf import PdfReader

from iop_fhir.exchange import followup
from iop_fhir.exchange.partners import client_for
from iop_fhir.mapping import ids
from iop_fhir.runtime import run_worker
from tests.integration.test_transition_e2e import at_partner, discharge_with_referral

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
VALIDATOR = Path(__file__).resolve().parents[3] / "shared" / "tools" / "fhir-validate"
BSER = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"

pytestmark = pytest.mark.peers


@pytest.fixture
def aftercare(ehr_server: str) -> str:
    root = ehr_server.split("/fhir")[0]
    requests.post(f"{root}/_reset", timeout=10)
    return ehr_server


def report(base: str, task: dict[str, Any], status: str, code: str, display: str, **more: Any) -> dict[str, Any]:
    """The provider changes its copy of the Task."""
    task = {
        **task,
        "status": status,
        "businessStatus": {"coding": [{"system": BSER, "code": code, "display": display}]},
    }
    task.update(more)
    response = requests.put(f"{base}/Task/{task['id']}", json=task, timeout=10)
    assert response.status_code == 200, response.text
    stored: dict[str, Any] = response.json()
    return stored


def test_the_partner_accepts_schedules_and_reports_the_first_visit_and_our_discharge_shows_each_step(
    app: Any, client: Any, aftercare: str, tmp_path: Path
) -> None:
    store = app.extensions["iop_fhir.store"]
    settings = app.config["IOP_FHIR"]
    repository = app.extensions["iop_fhir.repository"]
    organization = json.loads((CONTRACT / "organization.json").read_text(encoding="utf-8"))
    assert client.put("/iop/organization", json=organization).status_code in (200, 201)
    discharge = discharge_with_referral(client, aftercare)
    assert run_worker(settings, once=True, store=store) == 0
    identifier = f"{ids.RECORD_SYSTEM}|{ids.identifier_value('discharge', discharge['id'], 'referral-task')}"
    [task] = at_partner(aftercare, "Task", identifier)
    # who asks and who is to do it are Organizations the provider now has: the program and itself
    requester = requests.get(f"{aftercare}/{task['requester']['reference']}", timeout=10).json()
    owner = requests.get(f"{aftercare}/{task['owner']['reference']}", timeout=10).json()
    assert (requester["resourceType"], requester["name"]) == ("Organization", organization["name"])
    assert (owner["resourceType"], owner["name"]) == ("Organization", "Passaic Valley Recovery Services")

    def follow() -> int:
        return followup.follow(repository, settings, client_for)

    def shown() -> dict[str, Any]:
        transition: dict[str, Any] = client.get(f"/iop/discharges/{discharge['id']}").get_json()["transition"]
        return transition

    assert [s["event"] for s in shown()["timeline"]] == ["created", "sent"]
    assert follow() == 0

    task = report(aftercare, task, "accepted", "3.0", "Service Request Accepted")
    assert follow() == 1
    assert shown()["task"]["status"] == "accepted"

    appointment = requests.post(
        f"{aftercare}/Appointment",
        json={
            "resourceType": "Appointment",
            "status": "booked",
            "start": "2026-04-02T10:00:00-04:00",
            "end": "2026-04-02T11:00:00-04:00",
            "participant": [{"actor": {"reference": task["for"]["reference"]}, "status": "accepted"}],
        },
        timeout=10,
    ).json()
    scheduled = {
        "type": {"text": "appointment scheduled"},
        "valueReference": {"reference": f"Appointment/{appointment['id']}"},
    }
    task = report(aftercare, task, "in-progress", "5.1.1", "Service Request Event Scheduled", output=[scheduled])
    assert follow() == 1
    assert follow() == 0, "nothing changed at the partner: no new version"

    attended = {"type": {"text": "first visit attended"}, "valueDateTime": "2026-04-02T10:04:00-04:00"}
    task = report(
        aftercare, task, "in-progress", "5.1.4", "Service Request Event Completed", output=[scheduled, attended]
    )
    assert follow() == 1

    transition = shown()
    steps = transition["timeline"]
    assert [s["event"] for s in steps] == ["created", "sent", "accepted", "scheduled", "first-visit-attended"]
    assert [(s["business_status"] or {}).get("code") for s in steps] == ["2.0", None, "3.0", "5.1.1", "5.1.4"]
    assert steps[3]["scheduled_for"] == "2026-04-02T10:00:00-04:00"
    assert steps[3]["detail"] == "first visit scheduled for 2026-04-02T10:00:00-04:00"
    assert transition["overdue"] is False

    # our Task carries the partner's outputs, pointing at the partner's server, and is valid FHIR
    ours = client.get(f"/fhir/{transition['task']['reference']}").get_json()
    assert ours["meta"]["versionId"] == "4"
    assert ours["output"][0]["valueReference"]["reference"] == f"{aftercare}/Appointment/{appointment['id']}"
    assert ours["output"][1] == attended
    path = tmp_path / "task.json"
    path.write_text(json.dumps(ours), encoding="utf-8")
    result = subprocess.run([str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    # the readable summary for staff shows where the referral stands and the next appointment
    summary = f"/iop/discharges/{discharge['id']}/summary"
    html = client.get(f"{summary}.html").get_data(as_text=True)
    pdf = client.get(f"{summary}.pdf").data
    text = " ".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(pdf)).pages)
    for shown_in in (html, " ".join(text.split())):
        assert "Next appointment" in shown_in and "2026-04-02 10:00" in shown_in
        assert "Reyes" in shown_in and organization["name"] in shown_in
