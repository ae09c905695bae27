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


# -- the authorization server's clients and tokens


@pytest.fixture
def auth_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", url)
    monkeypatch.setenv("IOP_FHIR_BASE_URL", "http://testserver/fhir")
    return url


def test_client_add_generate_key_list_disable_and_token_end_to_end(
    auth_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from iop_fhir.app import create_app
    from iop_fhir.config import Settings

    key_file = tmp_path / "ehr-north.pem"
    scope = "system/*.rs system/Task.cu"
    assert main(["client", "add", "ehr-north", "--generate-key", str(key_file), "--scope", scope, "--admin"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert (added["client_id"], added["scope"], added["admin"], added["active"]) == ("ehr-north", scope, True, True)
    assert key_file.stat().st_mode & 0o777 == 0o600
    private_key = load_pem_private_key(key_file.read_bytes(), password=None)

    assert main(["client", "list"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed == added

    assert main(["token", "--client", "ehr-north", "--scope", "system/Patient.rs"]) == 0
    minted = capsys.readouterr().out.strip()

    # The app on the same database verifies the CLI's token and accepts the generated key's assertions.
    app = create_app(Settings.from_env(seed_conformance=False))
    try:
        claims = app.extensions["iop_fhir.keys"].verifier.verify(minted)
        assert (claims.client_id, str(claims.scopes), claims.admin) == ("ehr-north", "system/Patient.rs", True)
        signed = jwt.encode(
            {
                "iss": "ehr-north",
                "sub": "ehr-north",
                "aud": "http://testserver/auth/token",
                "jti": "j1",
                "exp": int(time.time()) + 60,
            },
            private_key,  # type: ignore[arg-type]
            algorithm="ES384",
            headers={"kid": added["kids"][0]},
        )
        form = {
            "grant_type": "client_credentials",
            "scope": "system/Task.u",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": signed,
        }
        assert app.test_client().post("/auth/token", data=form).status_code == 200

        assert main(["client", "disable", "ehr-north"]) == 0
        assert main(["token", "--client", "ehr-north"]) == 2
        assert "invalid_client" in capsys.readouterr().err
        form["client_assertion"] = signed.replace("j1", "j2")
        assert app.test_client().post("/auth/token", data=form).status_code == 401
    finally:
        app.extensions["iop_fhir.store"].close()


def test_client_add_with_a_jwks_file_and_a_partner_that_does_not_exist_exits_2_naming_the_field(
    auth_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from iop_fhir.security.tokens import public_jwk

    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public_jwk(ec.generate_private_key(ec.SECP384R1())), "kid": "k"}]}))
    args = ["client", "add", "pvr", "--jwks", str(jwks), "--scope", "system/Task.rs", "--partner", "nobody"]

    assert main(args) == 2

    err = capsys.readouterr().err
    assert err.startswith("iop-fhir client add: partner: no partner 'nobody'")
    assert "Traceback" not in err
    assert main(["client", "list"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["client", "add", "x", "--jwks", "/nonexistent/jwks.json", "--scope", "system/*.rs"], "--jwks"),
        (
            ["client", "add", "x", "--generate-key", "/nonexistent/dir/k.pem", "--scope", "system/*.rs"],
            "--generate-key",
        ),
        (["client", "add", "x", "--generate-key", "{tmp}/k.pem", "--scope", "system/Unicorn.rs"], "scope:"),
        (["client", "disable", "nobody"], "client_id: no client 'nobody'"),
        (["token", "--client", "nobody"], "invalid_client"),
    ],
)
def test_client_and_token_errors_print_one_line_and_exit_2(
    auth_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "k.pem").exists()  # no key is left behind for a client that was not registered


def test_token_with_an_unreadable_signing_key_file_exits_2(
    auth_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["client", "add", "ehr", "--generate-key", str(tmp_path / "k.pem"), "--scope", "system/*.rs"]) == 0
    monkeypatch.setenv("IOP_FHIR_SIGNING_KEY_FILE", str(tmp_path / "missing.pem"))
    capsys.readouterr()
    assert main(["token", "--client", "ehr"]) == 2
    assert "IOP_FHIR_SIGNING_KEY_FILE" in capsys.readouterr().err


def test_generate_key_never_overwrites_a_file(auth_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "k.pem"
    existing.write_text("keep me")
    assert main(["client", "add", "ehr", "--generate-key", str(existing), "--scope", "system/*.rs"]) == 2
    assert existing.read_text() == "keep me"
    assert "--generate-key" in capsys.readouterr().err
