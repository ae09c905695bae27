"""The authorization server's state in the database (iop_fhir.security.registry): clients, signing keys, used jtis,
and what ``issue_for_client`` grants. Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from iop_fhir.config import Settings, issuer
from iop_fhir.security.registry import (
    ClientError,
    ClientRegistry,
    GrantError,
    KeyRing,
    KeyRingError,
    issue_for_client,
)
from iop_fhir.security.tokens import TokenError, jwk_thumbprint, public_jwk
from iop_fhir.store.base import StoredRecord
from iop_fhir.store.sql import SqlStore

PARTNER = "passaic-valley-recovery"


def client_jwks(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, kid: str = "k1") -> dict[str, Any]:
    return {"keys": [{**public_jwk(key), "kid": kid, "use": "sig"}]}


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


@pytest.fixture(scope="module")
def client_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    store = SqlStore(db_url)
    yield store
    store.close()


@pytest.fixture
def registry(store: SqlStore) -> ClientRegistry:
    return ClientRegistry(store)


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, base_url="https://iop.example.org/fhir", seed_conformance=False)


def add_partner(store: SqlStore, partner_id: str = PARTNER, status: str = "active") -> None:
    now = int(time.time() * 1_000_000)
    record = StoredRecord("partner", partner_id, None, status, 1, {"id": partner_id}, [], now, now)
    with store.write() as tx:
        tx.save_record(record)


def fields_of(error: pytest.ExceptionInfo[ClientError]) -> list[str]:
    return [field for field, _ in error.value.issues]


# -- clients


def test_a_registered_client_reads_back_with_its_normalised_scope(
    registry: ClientRegistry, client_key: ec.EllipticCurvePrivateKey
) -> None:
    registry.add("ehr-north", jwks=client_jwks(client_key), scope="system/Patient.read system/Patient.read")

    client = registry.get("ehr-north")

    assert client is not None
    assert client.scope == "system/Patient.read"
    assert client.active and not client.admin and client.partner_id is None and client.purpose_of_use is None
    assert client.jwks == client_jwks(client_key)
    assert [c.client_id for c in registry.list()] == ["ehr-north"]


def test_a_partner_client_defaults_to_purpose_treat(
    registry: ClientRegistry, store: SqlStore, client_key: ec.EllipticCurvePrivateKey
) -> None:
    add_partner(store)

    client = registry.add("pvr", jwks=client_jwks(client_key), scope="system/Task.rs", partner_id=PARTNER)

    assert (client.partner_id, client.purpose_of_use) == (PARTNER, "TREAT")
    assert registry.get("pvr") == client


def test_registration_names_every_wrong_field_and_stores_nothing(registry: ClientRegistry) -> None:
    with pytest.raises(ClientError) as raised:
        registry.add(
            "not an id!", jwks={"keys": []}, scope="system/Nothing.rs", partner_id="nobody", purpose_of_use="SPY"
        )

    assert fields_of(raised) == ["client_id", "jwks", "scope", "partner", "purpose_of_use"]
    assert registry.list() == []


@pytest.mark.parametrize("client_id", ["", "a" * 65, "has/slash", "naïve", "under_score"])
def test_a_client_id_must_be_a_fhir_id(
    registry: ClientRegistry, client_key: ec.EllipticCurvePrivateKey, client_id: str
) -> None:
    with pytest.raises(ClientError) as raised:
        registry.add(client_id, jwks=client_jwks(client_key), scope="system/*.rs")
    assert fields_of(raised) == ["client_id"]


def test_a_client_id_is_registered_once(registry: ClientRegistry, client_key: ec.EllipticCurvePrivateKey) -> None:
    registry.add("ehr-north", jwks=client_jwks(client_key), scope="system/*.rs")
    with pytest.raises(ClientError) as raised:
        registry.add("ehr-north", jwks=client_jwks(client_key), scope="system/*.cruds")
    assert fields_of(raised) == ["client_id"]
    assert registry.get("ehr-north").scope == "system/*.rs"  # type: ignore[union-attr]


def _jwks_cases() -> list[Any]:
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    return [
        pytest.param([public_jwk(p384)], id="not-a-key-set"),
        pytest.param({"keys": []}, id="empty"),
        pytest.param({"keys": [public_jwk(p256)]}, id="ec-p256"),
        pytest.param({"keys": [{**public_jwk(small_rsa), "alg": "RS384"}]}, id="rsa-1024"),
        pytest.param({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, id="symmetric"),
        pytest.param({"keys": [{**public_jwk(p384), "use": "enc"}]}, id="encryption-key"),
        pytest.param({"keys": [{**public_jwk(p384), "alg": "RS384"}]}, id="alg-of-another-kind"),
        pytest.param({"keys": [{**public_jwk(p384), "d": "private"}]}, id="private-key"),
    ]


@pytest.mark.parametrize("jwks", _jwks_cases())
def test_a_jwks_without_a_usable_public_rs384_or_es384_key_is_refused(registry: ClientRegistry, jwks: Any) -> None:
    with pytest.raises(ClientError) as raised:
        registry.add("ehr-north", jwks=jwks, scope="system/*.rs")
    assert fields_of(raised) == ["jwks"]


def test_an_rsa_2048_key_is_usable(registry: ClientRegistry) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert registry.add("ehr-rsa", jwks=client_jwks(key), scope="system/*.rs").active


@pytest.mark.parametrize("scope", ["", "system/Patient", "system/Unicorn.rs", "system/Patient.sr", 'a"b'])
def test_a_scope_that_is_not_smart_is_refused(
    registry: ClientRegistry, client_key: ec.EllipticCurvePrivateKey, scope: str
) -> None:
    with pytest.raises(ClientError) as raised:
        registry.add("ehr-north", jwks=client_jwks(client_key), scope=scope)
    assert fields_of(raised) == ["scope"]


def test_a_retracted_partner_is_unknown(
    registry: ClientRegistry, store: SqlStore, client_key: ec.EllipticCurvePrivateKey
) -> None:
    add_partner(store, status="entered-in-error")
    with pytest.raises(ClientError) as raised:
        registry.add("pvr", jwks=client_jwks(client_key), scope="system/*.rs", partner_id=PARTNER)
    assert fields_of(raised) == ["partner"]


def test_disabling_an_unknown_client_names_the_client_id(registry: ClientRegistry) -> None:
    with pytest.raises(ClientError) as raised:
        registry.disable("nobody")
    assert fields_of(raised) == ["client_id"]


# -- jtis


def test_a_jti_is_accepted_once_per_client_across_registries(store: SqlStore, db_url: str) -> None:
    other_process = SqlStore(db_url)
    try:
        first, second = ClientRegistry(store), ClientRegistry(other_process)
        jti = uuid.uuid4().hex
        seen = first.seen_jtis("ehr-north")
        assert jti not in seen
        seen.add(jti)

        assert jti in second.seen_jtis("ehr-north")
        with pytest.raises(TokenError) as raised:
            second.seen_jtis("ehr-north").add(jti)
        assert raised.value.reason == "replayed"
        second.seen_jtis("ehr-south").add(jti)  # the same jti from another client is another assertion
    finally:
        other_process.close()


def test_an_overlong_jti_is_malformed_not_a_database_error(registry: ClientRegistry) -> None:
    with pytest.raises(TokenError) as raised:
        registry.seen_jtis("ehr-north").add("j" * 256)
    assert raised.value.reason == "malformed"


def test_expired_jtis_are_deleted_and_live_ones_kept(store: SqlStore) -> None:
    now = [1_000_000.0]
    registry = ClientRegistry(store, clock=lambda: now[0])
    registry.seen_jtis("ehr-north").add("old")
    now[0] += 3600
    fresh = registry.seen_jtis("ehr-north")  # purges
    fresh.add("new")

    assert "old" not in fresh
    assert "new" in fresh


# -- keys


def test_the_first_keyring_generates_an_es384_key_that_later_ones_share(settings: Settings, store: SqlStore) -> None:
    first = KeyRing.load(settings, store.engine)
    second = KeyRing.load(settings, store.engine)

    assert first.issuer.algorithm == "ES384"
    assert first.issuer.key_id == second.issuer.key_id
    token = first.issuer.issue("ehr-north", "system/*.rs")
    assert second.verifier.verify(token).client_id == "ehr-north"
    assert first.jwks() == second.jwks()
    assert [k["kid"] for k in first.jwks()["keys"]] == [first.issuer.key_id]
    assert "d" not in first.jwks()["keys"][0]


def test_keyrings_loading_at_once_on_an_empty_database_agree_on_one_key(settings: Settings, db_url: str) -> None:
    stores = [SqlStore(db_url) for _ in range(4)]
    rings: list[KeyRing] = []
    barrier = threading.Barrier(len(stores))

    def load(store: SqlStore) -> None:
        barrier.wait()
        rings.append(KeyRing.load(settings, store.engine))

    threads = [threading.Thread(target=load, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()

    assert len(rings) == len(stores)
    assert len({ring.issuer.key_id for ring in rings}) == 1
    assert len({ring.jwks()["keys"][0]["x"] for ring in rings}) == 1


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_the_keyring_signs_with_the_signing_key_file_and_still_verifies_stored_keys(
    settings: Settings, store: SqlStore, tmp_path: Path, kind: str
) -> None:
    stored = KeyRing.load(settings, store.engine)
    old_token = stored.issuer.issue("ehr-north", "system/*.rs")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" else client_key_p384()
    (tmp_path / "signing.pem").write_bytes(pem(key))

    ring = KeyRing.load(replace(settings, secrets_dir=tmp_path, signing_key_file=Path("signing.pem")), store.engine)

    assert ring.issuer.key_id == jwk_thumbprint(key)
    assert ring.issuer.algorithm == ("RS384" if kind == "rsa" else "ES384")
    assert ring.verifier.verify(ring.issuer.issue("ehr-north", "system/*.rs")).client_id == "ehr-north"
    assert ring.verifier.verify(old_token).client_id == "ehr-north"
    assert [k["kid"] for k in ring.jwks()["keys"]] == [jwk_thumbprint(key), stored.issuer.key_id]


def client_key_p384() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.mark.parametrize("content", [None, b"not a key", "p256"])
def test_an_unusable_signing_key_file_is_named_without_its_content(
    settings: Settings, store: SqlStore, tmp_path: Path, content: bytes | str | None
) -> None:
    path = tmp_path / "signing.pem"
    if content == "p256":
        path.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(KeyRingError) as raised:
        KeyRing.load(replace(settings, signing_key_file=path), store.engine)
    assert str(path) in str(raised.value) and "IOP_FHIR_SIGNING_KEY_FILE" in str(raised.value)
    assert "BEGIN" not in str(raised.value)


def test_issuer_is_the_auth_issuer_then_the_base_url_then_a_urn() -> None:
    assert issuer(Settings(auth_issuer="https://auth.example.org", base_url="https://x/fhir")) == (
        "https://auth.example.org"
    )
    assert issuer(Settings(base_url="https://iop.example.org/fhir/")) == "https://iop.example.org/fhir"
    assert issuer(Settings()) == "urn:iop-fhir"


def test_settings_read_the_signing_key_file_and_treat_empty_as_unset() -> None:
    assert Settings.from_env({"IOP_FHIR_SIGNING_KEY_FILE": "keys/s.pem"}).signing_key_file == Path("keys/s.pem")
    assert Settings.from_env({"IOP_FHIR_SIGNING_KEY_FILE": ""}).signing_key_file is None
    assert Settings.from_env({"IOP_FHIR_TOKEN_LIFETIME": "60"}).token_lifetime == 60


# -- issue_for_client


@pytest.fixture
def keyring(settings: Settings, store: SqlStore) -> KeyRing:
    return KeyRing.load(settings, store.engine)


def test_a_token_carries_partner_purpose_and_admin_from_the_registration(
    registry: ClientRegistry, store: SqlStore, keyring: KeyRing, client_key: ec.EllipticCurvePrivateKey
) -> None:
    add_partner(store)
    registry.add(
        "pvr", jwks=client_jwks(client_key), scope="system/*.rs", partner_id=PARTNER, purpose_of_use="COC", admin=True
    )

    token, scope, expires_in = issue_for_client(registry, keyring, "pvr", "system/Task.rs")

    claims = keyring.verifier.verify(token)
    assert (claims.client_id, claims.partner, claims.purpose_of_use, claims.admin) == ("pvr", PARTNER, "COC", True)
    assert str(claims.scopes) == scope == "system/Task.rs"
    assert expires_in == 300 == claims.expires_at - claims.issued_at


def test_no_requested_scope_grants_the_whole_registration(
    registry: ClientRegistry, keyring: KeyRing, client_key: ec.EllipticCurvePrivateKey
) -> None:
    registry.add("ehr-north", jwks=client_jwks(client_key), scope="system/Patient.rs system/Observation.r")
    token, scope, _ = issue_for_client(registry, keyring, "ehr-north", None)
    assert scope == "system/Patient.rs system/Observation.r"
    claims = keyring.verifier.verify(token)
    assert not claims.admin and claims.partner is None


@pytest.mark.parametrize(
    ("registered", "requested", "granted"),
    [
        ("system/*.cruds", "system/Patient.rs system/Task.u", "system/Patient.rs system/Task.u"),
        ("system/*.read", "system/Patient.rs", "system/Patient.rs"),
        ("system/Patient.r system/Patient.s", "system/Patient.rs", "system/Patient.rs"),
        ("system/Patient.rs", "system/Patient.rs system/Task.rs", "system/Patient.rs"),
        ("system/Patient.rs", "system/Patient.cruds system/Patient.r", "system/Patient.r"),
        (
            "system/Observation.rs?category=laboratory",
            "system/Observation.rs system/Observation.rs?category=laboratory&code=1",
            "system/Observation.rs?category=laboratory&code=1",
        ),
        ("system/*.rs", "patient/Patient.rs system/Patient.r", "system/Patient.r"),
    ],
)
def test_the_granted_scopes_are_the_requested_ones_the_registration_covers(
    registry: ClientRegistry,
    keyring: KeyRing,
    client_key: ec.EllipticCurvePrivateKey,
    registered: str,
    requested: str,
    granted: str,
) -> None:
    registry.add("ehr-north", jwks=client_jwks(client_key), scope=registered)
    _, scope, _ = issue_for_client(registry, keyring, "ehr-north", requested)
    assert scope == granted


@pytest.mark.parametrize("requested", ["system/Patient.c", "system/Task.rs", "openid", "not a scope", "user/*.rs"])
def test_requesting_nothing_the_registration_covers_is_invalid_scope(
    registry: ClientRegistry, keyring: KeyRing, client_key: ec.EllipticCurvePrivateKey, requested: str
) -> None:
    registry.add("ehr-north", jwks=client_jwks(client_key), scope="system/Patient.rs")
    with pytest.raises(GrantError) as raised:
        issue_for_client(registry, keyring, "ehr-north", requested)
    assert raised.value.error == "invalid_scope"


def test_a_disabled_or_unknown_client_gets_no_token(
    registry: ClientRegistry, keyring: KeyRing, client_key: ec.EllipticCurvePrivateKey
) -> None:
    registry.add("ehr-north", jwks=client_jwks(client_key), scope="system/*.rs")
    registry.disable("ehr-north")
    for client_id in ("ehr-north", "nobody"):
        with pytest.raises(GrantError) as raised:
            issue_for_client(registry, keyring, client_id, "system/*.rs")
        assert raised.value.error == "invalid_client"
    assert registry.get("ehr-north").active is False  # type: ignore[union-attr]


# -- the program's consent management


def test_only_a_program_client_may_be_registered_to_write_consents(
    store: SqlStore, registry: ClientRegistry, client_key: ec.EllipticCurvePrivateKey
) -> None:
    add_partner(store)
    with pytest.raises(ClientError) as raised:
        registry.add("pvr", jwks=client_jwks(client_key), scope="system/*.cruds", partner_id=PARTNER, consents=True)
    assert fields_of(raised) == ["consents"]
    assert registry.get("pvr") is None
    desk = registry.add("consent-desk", jwks=client_jwks(client_key), scope="system/Consent.cruds", consents=True)
    assert registry.get("consent-desk") == desk and desk.consents and desk.summary()["consents"] is True


def test_the_consent_permission_rides_in_the_token_of_that_client_only(
    settings: Settings, store: SqlStore, registry: ClientRegistry, client_key: ec.EllipticCurvePrivateKey
) -> None:
    keyring = KeyRing.load(settings, store.engine)
    registry.add("consent-desk", jwks=client_jwks(client_key), scope="system/Consent.cruds", consents=True)
    registry.add("program", jwks=client_jwks(client_key), scope="system/*.cruds")
    desk = keyring.verifier.verify(issue_for_client(registry, keyring, "consent-desk", None)[0])
    program = keyring.verifier.verify(issue_for_client(registry, keyring, "program", None)[0])
    assert (desk.consents, program.consents) == (True, False)
