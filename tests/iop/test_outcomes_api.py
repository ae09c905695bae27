"""The /iop outcomes end to end: a stay's and a program's figures from records posted through /iop, the discharge
summary computed from them, the CSV rendering, parameter errors, scopes, and the audit trail of what each answer
was computed from."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.store.base import AuditQuery
from tests.auth import mint
from tests.iop.test_records_api import contract, post, read

FROM_TO = "from=2026-01-01&to=2026-03-31"


def issue(response: Any) -> tuple[str, str | None]:
    found = response.get_json()["issue"][0]
    return found["code"], (found.get("expression") or [None])[0]


def session(enrollment: str, day: str, attendance: str, **more: Any) -> dict[str, Any]:
    payload = contract("session", enrollment)
    payload.pop("drug_screen")
    payload.pop("craving_score")
    payload.update({"start": f"{day}T18:00:00-05:00", "end": f"{day}T21:00:00-05:00", "attendance": attendance})
    if attendance not in ("attended", "late", "left-early"):
        payload.pop("progress_note", None)
    payload.update(more)
    return payload


@pytest.fixture
def stay(client: FlaskClient) -> dict[str, Any]:
    """An enrollment admitted 2026-01-05 (a Monday) with a plan and four sessions in its first week: two attended,
    one late, one no-show."""
    assert post(client, "partner", contract("partner")).status_code == 201
    enrolled = post(client, "enrollment", contract("enrollment"))
    assert enrolled.status_code == 201
    eid = enrolled.get_json()["id"]
    assert post(client, "treatment-plan", contract("treatment-plan", eid)).status_code == 201
    for day, attendance in (
        ("2026-01-05", "attended"),
        ("2026-01-06", "late"),
        ("2026-01-07", "no-show"),
        ("2026-01-08", "attended"),
    ):
        assert post(client, "session", session(eid, day, attendance)).status_code == 201
    return {"enrollment": eid, "patient": enrolled.get_json()["fhir"][0]}


def test_a_stays_outcomes_count_its_sessions_late_as_attended_and_no_show_as_missed(
    client: FlaskClient, stay: dict[str, Any]
) -> None:
    response = client.get(f"/iop/enrollments/{stay['enrollment']}/outcomes")
    assert response.status_code == 200
    body = response.get_json()
    seen = body["attendance"]
    assert (seen["scheduled"], seen["attended"], seen["late"], seen["missed"]) == (4, 3, 1, {"no-show": 1})
    # three attended 3-hour sessions in the week of 2026-01-05: 9 hours, the adult minimum
    first = body["hours"]["weeks"][0]
    assert (first["start"], first["delivered"], first["minimum"]) == ("2026-01-05", 9.0, 9.0)
    assert first["meets_minimum"] is True
    assert body["admission_date"] == "2026-01-05" and body["ongoing"] is True


def test_a_retracted_session_no_longer_counts(client: FlaskClient, stay: dict[str, Any]) -> None:
    sessions = client.get(f"/iop/sessions?enrollment={stay['enrollment']}").get_json()["items"]
    missed = next(s for s in sessions if s["attendance"] == "no-show")
    assert client.post(f"/iop/sessions/{missed['id']}/retract", json={"reason": "wrong patient"}).status_code == 200
    seen = client.get(f"/iop/enrollments/{stay['enrollment']}/outcomes").get_json()["attendance"]
    assert (seen["scheduled"], seen["attended"], seen["missed"]) == (3, 3, {})


def test_the_outcomes_of_an_unknown_or_retracted_enrollment_are_404(client: FlaskClient, stay: dict[str, Any]) -> None:
    response = client.get("/iop/enrollments/no-such-enrollment/outcomes")
    assert response.status_code == 404
    assert issue(response) == ("not-found", "id")
    assert client.post(f"/iop/enrollments/{stay['enrollment']}/retract", json={"reason": "test"}).status_code == 200
    assert client.get(f"/iop/enrollments/{stay['enrollment']}/outcomes").status_code == 404


def test_the_discharge_summary_is_computed_from_the_records_and_the_typed_one_kept_as_a_note(
    client: FlaskClient, stay: dict[str, Any]
) -> None:
    discharge = contract("discharge", stay["enrollment"])
    discharge["discharge_date"] = "2026-01-09"
    response = post(client, "discharge", discharge)
    assert response.status_code == 201, response.get_json()
    plan_ref = next(r for r in response.get_json()["fhir"] if r.startswith("CarePlan/"))
    careplan = read(client, plan_ref)
    assert "attended 3 of 4 scheduled sessions (75%)" in careplan["description"]
    assert "1 of 1 weeks met the ASAM 2.1 minimum of 9 hours" in careplan["description"]
    assert careplan["note"] == [{"text": discharge["summary"]}]


def test_program_outcomes_answer_json_with_numerators_and_denominators(
    client: FlaskClient, stay: dict[str, Any]
) -> None:
    response = client.get(f"/iop/outcomes?program=adult-sud&{FROM_TO}")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["stays"], body["admissions"], body["discharges"]) == (1, 1, 0)
    assert body["attendance"] == {"numerator": 3, "denominator": 4, "rate": 0.75}
    assert body["period"] == {"start": "2026-01-01", "end": "2026-03-31"}
    census = {w["week"]: w["census"] for w in body["weeks"]}
    assert census["2025-12-29"] == 0 and census["2026-01-05"] == 1
    other = client.get(f"/iop/outcomes?program=adolescent-sud&{FROM_TO}").get_json()
    assert other["stays"] == 0 and other["attendance"]["denominator"] == 0 and other["attendance"]["rate"] is None


def test_program_outcomes_as_csv_are_one_long_table(client: FlaskClient, stay: dict[str, Any]) -> None:
    response = client.get(f"/iop/outcomes?{FROM_TO}", headers={"Accept": "text/csv"})
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert rows[0] == ["metric", "week", "numerator", "denominator", "value"]
    assert ["attendance", "", "3", "4", "0.75"] in rows
    assert ["census", "2026-01-05", "", "", "1"] in rows


@pytest.mark.parametrize(
    ("query", "expression"),
    [
        ("program=no-such-program", "program"),
        ("from=2026-02-30", "from"),
        ("to=yesterday", "to"),
        ("from=2026-03-01&to=2026-02-01", "from"),
        ("since=2026-01-01", "since"),
        ("program=adult-sud&program=adult-sud", "program"),
        ("from=0727-02-06&to=2026-03-30", "from"),
    ],
)
def test_a_bad_outcomes_parameter_is_a_400_naming_it(client: FlaskClient, query: str, expression: str) -> None:
    response = client.get(f"/iop/outcomes?{query}")
    assert response.status_code == 400
    assert issue(response) == ("invalid", expression)


def test_outcomes_need_search_scopes_on_every_type_they_are_computed_from(app: Flask, client: FlaskClient) -> None:
    token = mint(app, "system/EpisodeOfCare.rs system/Encounter.rs")
    response = client.get("/iop/outcomes", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert "Observation" in response.get_json()["issue"][0]["diagnostics"]


def test_a_partners_client_may_not_read_program_outcomes(app: Flask, client: FlaskClient, stay: dict[str, Any]) -> None:
    token = mint(app, "system/*.rs", partner="passaic-valley-recovery")
    for path in ("/iop/outcomes", f"/iop/enrollments/{stay['enrollment']}/outcomes", "/iop/outcomes.html"):
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 403, path
        assert issue(response)[0] == "forbidden"


def test_an_outcomes_answer_is_audited_with_the_patient_it_was_computed_from(
    app: Flask, client: FlaskClient, stay: dict[str, Any]
) -> None:
    store = app.extensions["iop_fhir.store"]
    app.extensions["iop_fhir.audit"].flush()
    before = store.audit_rows(AuditQuery(count=0, total=True))[1]
    assert client.get(f"/iop/enrollments/{stay['enrollment']}/outcomes").status_code == 200
    app.extensions["iop_fhir.audit"].flush()
    rows, total = store.audit_rows(AuditQuery(count=1000, total=True))
    assert total == before + 1
    row = max(rows, key=lambda r: r.recorded)
    assert row.patient == stay["patient"]
    assert stay["patient"] in row.entities


def test_outcome_pages_are_html_with_their_own_content_security_policy(
    client: FlaskClient, stay: dict[str, Any]
) -> None:
    response = client.get(f"/iop/outcomes.html?{FROM_TO}")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert "script-src" not in response.headers["Content-Security-Policy"]
    page = response.get_data(as_text=True)
    assert f"/iop/enrollments/{stay['enrollment']}/outcomes.html" in page
    one = client.get(f"/iop/enrollments/{stay['enrollment']}/outcomes.html")
    assert one.status_code == 200 and "<svg" in one.get_data(as_text=True)
