"""The iop-fhir command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from iop_fhir.cli import main


def test_init_db_creates_the_schema_on_an_empty_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", url)
    assert main(["init-db"]) == 0
    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"resources", "resource_history", "idx_token", "idx_reference", "alembic_version"} <= tables


def test_unknown_command_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_validate_reports_each_invalid_resource_with_its_path_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = {"resourceType": "Patient", "gender": "female"}
    bad = {"resourceType": "CarePlan", "status": "active", "intent": "bogus", "subject": {"reference": "Patient/p"}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "lines.ndjson").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert main(["validate", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"OK {tmp_path / 'good.json'}" in lines
    assert f"OK {tmp_path / 'lines.ndjson'}:1" in lines
    failure = next(line for line in lines if line.startswith("FAIL"))
    assert failure.startswith(f"FAIL {tmp_path / 'lines.ndjson'}:2 :: CarePlan.intent: ")


def test_validate_passes_the_us_core_examples(capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import EXAMPLES

    assert main(["validate", "--quiet", str(EXAMPLES / "us-core" / "Observation-PHQ9-panel-example-44249-1.json")]) == 0
    assert capsys.readouterr().out == ""


def test_validate_reports_unreadable_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.json").write_text("{")
    assert main(["validate", str(tmp_path / "broken.json")]) == 1
    assert capsys.readouterr().out.startswith(f"FAIL {tmp_path / 'broken.json'} :: cannot read")


def test_validate_accepts_conditional_references_only_when_asked(tmp_path: Path) -> None:
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "serviceProvider": {"reference": "Organization?identifier=https://github.com/synthetichealth/synthea|abc"},
    }
    (tmp_path / "encounter.json").write_text(json.dumps(encounter))
    assert main(["validate", str(tmp_path / "encounter.json")]) == 1
    assert main(["validate", "--conditional-references", str(tmp_path / "encounter.json")]) == 0


CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "contract"


def _contract_file(tmp_path: Path, kind: str, **changes: object) -> Path:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload = json.loads(text.replace("{{enrollment_id}}", "6f1c2d9e-0000-4000-8000-000000000001"))
    payload.update(changes)
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def test_map_prints_a_transaction_bundle_of_puts_to_deterministic_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _contract_file(tmp_path, "session")
    assert main(["map", "session", str(path)]) == 0
    bundle = json.loads(capsys.readouterr().out)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types.count("Observation") == 4  # craving + three analytes
    assert "Encounter" in types and "Specimen" in types
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    assert main(["map", "session", str(path)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [e["resource"]["id"] for e in again["entry"]] == [e["resource"]["id"] for e in bundle["entry"]]


def test_map_reports_a_bad_record_as_an_operation_outcome_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _contract_file(tmp_path, "session", modality="carrier-pigeon")
    assert main(["map", "session", str(path)]) == 1
    outcome = json.loads(capsys.readouterr().err)
    assert outcome["issue"][0]["code"] == "code-invalid"
    assert outcome["issue"][0]["expression"] == ["modality"]
