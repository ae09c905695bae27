"""The transition-of-care document (exchange/document.py): PACIO Transitions of Care sections from a patient's
records, narratives that escape what they show, only the patient's resources, the Part 2 labels and notice, and
golden documents for completed, against-advice, transferred and step-up discharges (tests/exchange/documents.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.exchange import document
from tests.exchange.documents import CASES, DATA, build, save_case

VALIDATOR = Path(__file__).resolve().parents[3] / "shared" / "tools" / "fhir-validate"
UPDATE = os.environ.get("IOP_FHIR_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("case", CASES)
def test_golden_document(sqlite_app: Any, sqlite_client: Any, case: str) -> None:
    _enrollment, discharge_id = save_case(sqlite_client, case)
    built = build(sqlite_app.extensions["iop_fhir.store"], discharge_id)
    expected_path = DATA / f"{case}.bundle.json"
    text = json.dumps(built, indent=2, ensure_ascii=False) + "\n"
    if UPDATE:
        expected_path.write_text(text, encoding="utf-8")
    assert built == json.loads(expected_path.read_text(encoding="utf-8"))


def test_golden_documents_pass_the_independent_validator() -> None:
    paths = [str(DATA / f"{case}.bundle.json") for case in CASES]
    result = subprocess.run([str(VALIDATOR), *paths], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the pure builder, over the resources of the completed case ------------------------------------------------------

# The TOC Composition's section codes (HL7/fhir-transitions-of-care-ig @93b0940, input/fsh/TOCComposition.fsh;
# TERMINOLOGY.md §5.6) and its category; nothing else is used.
TOC_TEMP = "http://hl7.org/fhir/us/pacio-toc/CodeSystem/toc-temp-cs"
LOINC = "http://loinc.org"
VERIFIED_SECTIONS = {
    (LOINC, "42348-3"),  # advance directives
    (LOINC, "48765-2"),  # allergies
    (TOC_TEMP, "behavioral_health_summary"),  # behavioral health (temporary code)
    (LOINC, "47420-5"),  # functional status
    (LOINC, "11369-6"),  # immunizations
    (LOINC, "69730-0"),  # discharge instructions
    (LOINC, "46264-8"),  # medical devices
    (LOINC, "10160-0"),  # medications
    (LOINC, "18776-5"),  # plan of care
    (LOINC, "11450-4"),  # problems
    (LOINC, "47519-4"),  # procedures
    (LOINC, "42349-1"),  # reason for referral
    (LOINC, "30954-2"),  # clinical results
    (LOINC, "29762-2"),  # social history
    (LOINC, "8716-3"),  # vital signs
}
TRANSFER_SUMMARY = (LOINC, "18761-7")
OTHER_PATIENT = "Patient/00000000-0000-4000-8000-00000000beef"


def completed() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The completed case's discharge record and the resources its golden document carries."""
    golden = json.loads((DATA / "completed.bundle.json").read_text(encoding="utf-8"))
    case = json.loads((DATA / "completed.json").read_text(encoding="utf-8"))
    composition = golden["entry"][0]["resource"]
    record_id = composition["identifier"]["value"].split("/")[1]
    resources = [e["resource"] for e in golden["entry"][1:]]
    return {"id": record_id, "content": case["discharge"]}, resources


def build_pure(resources: list[dict[str, Any]] | None = None, **kwargs: Any) -> dict[str, Any]:
    discharge, pool = completed()
    return document.transition_document(
        discharge, pool if resources is None else resources, timestamp="2026-03-27T17:00:00-04:00", **kwargs
    )


def sections(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    composition = bundle["entry"][0]["resource"]
    return {s["code"]["coding"][0]["code"]: s for s in composition["section"]}


def of_type(resources: list[dict[str, Any]], res_type: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["resourceType"] == res_type]


def test_every_case_uses_exactly_the_verified_section_codes_once_each() -> None:
    assert {(s, c) for s, c, _title in document.SECTIONS.values()} == VERIFIED_SECTIONS
    for case in CASES:
        golden = json.loads((DATA / f"{case}.bundle.json").read_text(encoding="utf-8"))
        codes = document.section_codes(golden)
        assert sorted(codes) == sorted(VERIFIED_SECTIONS), case
        composition = golden["entry"][0]["resource"]
        assert (
            composition["type"]["coding"][0]["system"],
            composition["type"]["coding"][0]["code"],
        ) == TRANSFER_SUMMARY
        assert composition["category"][0]["coding"][0]["code"] == TRANSFER_SUMMARY[1]


def test_document_is_a_bundle_of_type_document_led_by_a_final_composition_about_the_patient() -> None:
    bundle = build_pure()
    assert bundle["type"] == "document"
    assert bundle["identifier"]["system"] == "urn:ietf:rfc:3986"
    assert bundle["identifier"]["value"].startswith("urn:uuid:")
    assert bundle["timestamp"] == "2026-03-27T17:00:00-04:00"
    composition = bundle["entry"][0]["resource"]
    assert composition["resourceType"] == "Composition"
    assert composition["status"] == "final"
    assert composition["date"] == bundle["timestamp"]
    patient = bundle["entry"][1]["resource"]
    assert patient["resourceType"] == "Patient"
    assert composition["subject"]["reference"] == f"Patient/{patient['id']}"
    assert composition["custodian"]["reference"] == "Organization/clifton-recovery-center"
    # The discharge assessment's clinician is the author.
    author = composition["author"][0]["reference"]
    assert author.startswith("Practitioner/")
    assert author in {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}


def test_sections_have_entries_where_the_records_support_them() -> None:
    found = sections(build_pure())
    assert len(found["11450-4"]["entry"]) == 2  # F10.20 and F33.1
    assert len(found["10160-0"]["entry"]) == 1  # the buprenorphine prescription
    assert [len(s["entry"]) for s in found["10160-0"]["section"]] == [1, 1]  # reported sertraline, naloxone kit
    assert len(found["30954-2"]["entry"]) == 8  # two screens of four analytes in the last 30 days, not January's
    assert len(found["behavioral_health_summary"]["entry"]) == 8  # four instruments, intake and discharge
    assert "12 on 2026-01-05" in found["behavioral_health_summary"]["text"]["div"]
    assert "6 on 2026-03-25" in found["behavioral_health_summary"]["text"]["div"]
    assert len(found["47420-5"]["entry"]) == 2  # the ratings, and the summary recommending a level of care
    assert "from the discharge assessment" in found["47420-5"]["text"]["div"]
    assert len(found["18776-5"]["entry"]) == 2  # continuing care and the treatment plan
    assert len(found["18776-5"]["section"][0]["entry"]) == 4  # the goals, with their achievement
    assert "Improving" in found["18776-5"]["text"]["div"]
    consent = found["42348-3"]["section"][0]
    assert consent["entry"][0]["reference"].startswith("Consent/")
    for code in ("48765-2", "11369-6", "46264-8", "47519-4", "8716-3", "42348-3"):
        assert found[code]["emptyReason"]["coding"][0]["code"] == "notasked", code
        assert "entry" not in found[code]


def test_sections_without_data_say_so_with_an_empty_reason() -> None:
    _discharge, pool = completed()
    kept = [r for r in pool if r["resourceType"] not in ("MedicationRequest", "MedicationStatement", "Condition")]
    kept = [r for r in kept if r["resourceType"] != "MedicationDispense" and r["resourceType"] != "Consent"]
    found = sections(build_pure(kept))
    for code in ("11450-4", "10160-0"):
        assert "entry" not in found[code] and "section" not in found[code]
        assert found[code]["emptyReason"]["coding"][0]["code"] == "nilknown"
    assert "section" not in found["42348-3"]  # no consent given: no consent sub-section
    assert all(s["text"]["status"] == "generated" for s in found.values())


def test_drug_screens_outside_the_30_days_before_discharge_are_left_out() -> None:
    _discharge, pool = completed()
    screen = next(
        r for r in pool if r["resourceType"] == "Observation" and r["category"][0]["coding"][0]["code"] == "laboratory"
    )
    before = {**screen, "id": "11111111-1111-4111-8111-111111111111", "effectiveDateTime": "2026-02-24T18:05:00-05:00"}
    after = {**screen, "id": "22222222-2222-4222-8222-222222222222", "effectiveDateTime": "2026-03-28T18:05:00-04:00"}
    bundle = build_pure([*pool, before, after])
    refs = [e["reference"] for e in sections(bundle)["30954-2"]["entry"]]
    assert f"Observation/{before['id']}" not in refs and f"Observation/{after['id']}" not in refs
    assert len(refs) == 8


def test_narratives_escape_what_they_show_and_are_xhtml() -> None:
    import xml.etree.ElementTree as ET

    discharge, pool = completed()
    plan = next(r for r in pool if r["resourceType"] == "CarePlan" and r.get("description"))
    plan["description"] = 'Says "no" to <script>alert(1)</script> & leaves'
    bundle = document.transition_document(discharge, pool, timestamp="2026-03-27T17:00:00-04:00")
    composition = bundle["entry"][0]["resource"]
    plan_div = sections(bundle)["18776-5"]["text"]["div"]
    for div in [composition["text"]["div"], *(s["text"]["div"] for s in sections(bundle).values())]:
        root = ET.fromstring(div)
        assert root.tag == "{http://www.w3.org/1999/xhtml}div"
        assert not list(root.iter("{http://www.w3.org/1999/xhtml}script"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; leaves" in plan_div
    assert "<script>" not in composition["text"]["div"]
    # The Composition's own narrative reads on its own: the patient, every section's title, the notice.
    assert "Jordan A. Reyes" in composition["text"]["div"]
    for section in composition["section"]:
        assert section["title"] in composition["text"]["div"]
    assert document.REDISCLOSURE_NOTICE in composition["text"]["div"]


def test_no_other_patients_resource_nor_a_counseling_note_is_carried() -> None:
    _discharge, pool = completed()
    condition = of_type(pool, "Condition")[0]
    other = {**condition, "id": "33333333-3333-4333-8333-333333333333", "subject": {"reference": OTHER_PATIENT}}
    other_patient = {**of_type(pool, "Patient")[0], "id": OTHER_PATIENT.split("/")[1]}
    note = {
        **condition,
        "id": "44444444-4444-4444-8444-444444444444",
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSYTHPN"}]},
    }
    bundle = build_pure([*pool, other, other_patient, note])
    carried = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    assert f"Condition/{other['id']}" not in carried
    assert OTHER_PATIENT not in carried
    assert f"Condition/{note['id']}" not in carried
    assert OTHER_PATIENT not in json.dumps(bundle)
    assert len(of_type([e["resource"] for e in bundle["entry"]], "Patient")) == 1


def test_every_section_entry_resolves_inside_the_document() -> None:
    bundle = build_pure()
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    base = "https://iop-fhir.org/fhir"

    def references(section: dict[str, Any]) -> list[str]:
        found = [e["reference"] for e in section.get("entry", [])]
        for sub in section.get("section", []):
            found += references(sub)
        return found

    composition = bundle["entry"][0]["resource"]
    for section in composition["section"]:
        for reference in references(section):
            assert f"{base}/{reference}" in full_urls, reference
    assert f"{base}/{composition['subject']['reference']}" in full_urls
    assert len(full_urls) == len(bundle["entry"])


def test_the_bundle_and_every_resource_carry_the_part2_labels_and_the_bundle_the_notice() -> None:
    bundle = build_pure()
    codes = [s["code"] for s in bundle["meta"]["security"]]
    assert {"42CFRPart2", "R", "NORDSCLCD", "RedisclosureProhibitionMark"} <= set(codes)
    mark = next(s for s in bundle["meta"]["security"] if s["code"] == "RedisclosureProhibitionMark")
    assert mark["extension"][0]["valueString"] == document.REDISCLOSURE_NOTICE
    for entry in bundle["entry"]:
        labels = {s["code"] for s in entry["resource"]["meta"]["security"]}
        assert {"42CFRPart2", "SUD", "R"} <= labels, entry["fullUrl"]
        assert "versionId" not in entry["resource"]["meta"] and "lastUpdated" not in entry["resource"]["meta"]


def test_the_identifier_follows_the_content_not_the_time_and_a_correction_replaces() -> None:
    discharge, pool = completed()
    first = document.transition_document(discharge, pool, timestamp="2026-03-27T17:00:00-04:00")
    again = document.transition_document(discharge, pool, timestamp="2026-03-28T09:00:00-04:00")
    assert document.identifier_of(first) == document.identifier_of(again)
    corrected_content = {**discharge["content"], "summary": "Completed 12 weeks (corrected)."}
    plan = next(r for r in pool if r["resourceType"] == "CarePlan" and r.get("description"))
    plan["description"] = corrected_content["summary"]
    corrected = document.transition_document(
        {**discharge, "content": corrected_content},
        pool,
        timestamp="2026-03-28T09:00:00-04:00",
        replaces=document.identifier_of(first),
    )
    assert document.identifier_of(corrected) != document.identifier_of(first)
    composition = corrected["entry"][0]["resource"]
    assert composition["relatesTo"] == [
        {
            "code": "replaces",
            "targetIdentifier": {"system": "urn:ietf:rfc:3986", "value": document.identifier_of(first)},
        }
    ]
    # The Composition's identifier names the discharge's document whatever its version.
    assert composition["identifier"] == first["entry"][0]["resource"]["identifier"]


class Row:
    def __init__(self, status: str, *documents: dict[str, Any]) -> None:
        self.status = status
        self.payload = {
            "body": {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [document.transaction_entry(d) for d in documents],
            }
        }


def test_settle_sends_the_same_document_again_and_a_changed_one_replacing_the_last() -> None:
    discharge, pool = completed()
    first = build_pure()
    later = document.transition_document(discharge, pool, timestamp="2026-04-01T09:00:00-04:00")
    # Unchanged records: the document queued before, byte for byte (its date too).
    assert document.settle(later, [Row("delivered", first)]) == first
    corrected = build_pure([r for r in pool if r["resourceType"] != "MedicationDispense"])
    settled = document.settle(corrected, [Row("delivered", first)])
    assert settled["entry"][0]["resource"]["relatesTo"][0]["targetIdentifier"]["value"] == document.identifier_of(first)
    # A superseded row, or one blocked for want of consent, never went: nothing to replace.
    for status in ("superseded", "blocked"):
        assert "relatesTo" not in document.settle(build_pure(), [Row(status, corrected)])["entry"][0]["resource"]


def test_the_transaction_entry_updates_the_document_by_its_identifier() -> None:
    bundle = build_pure()
    entry = document.transaction_entry(bundle)
    assert entry["request"] == {
        "method": "PUT",
        "url": f"Bundle?identifier=urn:ietf:rfc:3986|{document.identifier_of(bundle)}",
    }
    assert entry["fullUrl"].startswith("urn:uuid:") and entry["fullUrl"] != document.identifier_of(bundle)
    assert entry["resource"] == bundle


# -- with every transition ------------------------------------------------------------------------------------------


def queued_documents(store: Any, discharge_id: str) -> list[tuple[str, dict[str, Any]]]:
    rows, _ = store.deliveries(record_kind="discharge", record_id=discharge_id)
    found = []
    for row in rows:
        documents = document.documents_in(row.payload["body"])
        assert len(documents) == 1  # exactly one document per transition
        found.append((row.status, documents[0]))
    return found


def test_each_transition_carries_one_document_the_same_again_when_replayed_and_a_replacing_one_when_corrected(
    sqlite_app: Any, sqlite_client: Any
) -> None:
    store = sqlite_app.extensions["iop_fhir.store"]
    _enrollment, discharge_id = save_case(sqlite_client, "completed")
    [(_status, first)] = queued_documents(store, discharge_id)
    assert first["entry"][0]["resource"]["status"] == "final"
    assert "relatesTo" not in first["entry"][0]["resource"]
    # The document is the golden one but for its date.
    golden = json.loads((DATA / "completed.bundle.json").read_text(encoding="utf-8"))
    assert document.identifier_of(first) == document.identifier_of(golden)

    saved = sqlite_client.get(f"/iop/discharges/{discharge_id}").get_json()
    body = {k: v for k, v in saved.items() if k not in ("id", "fhir", "transition", "status", "version", "warnings")}
    assert sqlite_client.put(f"/iop/discharges/{discharge_id}", json=body).status_code == 200
    queued = queued_documents(store, discharge_id)
    assert all(d == first for _status, d in queued)  # a replay sends the same document, byte for byte

    corrected = {**body, "summary": "Completed 12 weeks; attended 35 of 36 group sessions."}
    assert sqlite_client.put(f"/iop/discharges/{discharge_id}", json=corrected).status_code == 200
    _status, newest = queued_documents(store, discharge_id)[-1]
    assert document.identifier_of(newest) != document.identifier_of(first)
    assert newest["entry"][0]["resource"]["relatesTo"] == [
        {"code": "replaces", "targetIdentifier": first["identifier"]}
    ]

    assert sqlite_client.post(f"/iop/discharges/{discharge_id}/retract", json={}).status_code == 200
    _status, withdrawn = queued_documents(store, discharge_id)[-1]
    composition = withdrawn["entry"][0]["resource"]
    assert composition["status"] == "entered-in-error"
    assert composition["relatesTo"][0]["targetIdentifier"] == newest["identifier"]
