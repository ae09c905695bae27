"""The service at scale: a program network of ``--resources`` FHIR resources (default 1,000,000) on SQLite and on
PostgreSQL, and how long a fixed mix of queries takes on it, how fast transactions of 1,000 are ingested, and how
large the database is per million resources.

The network is made of what the service itself stores, copied:

1. a template (SQLite, cached under bench/results/): the demo program of ``iop_fhir.demo.seed`` (``--template``
   patients: referrals, enrollments, consents, assessments, plans, weekly sessions with drug screens, discharges and
   aftercare Tasks), plus hospital data for the same patients, sent through ``POST /fhir`` as transaction Bundles of
   PUTs (validated and stored as any client's): the Synthea patients of ../shared/fhir-examples/synthea-10-patients
   (Encounters, Conditions, MedicationRequests, Procedures, Immunizations, AllergyIntolerances; references by
   search, ``Practitioner?identifier=...``, kept as their display) each given to a demo patient, and at each of their
   Encounters the vital signs and, at every other one, labs (LOINC codes, UCUM valueQuantity);
2. copies of the template until there are ``--resources``: every id of a patient's resources and records gets a
   copy's own (same prefix, the copy's number as the last 12 hex digits), every date moves back by a whole number of
   weeks (the copy's number modulo 52) and every MRN gets the copy's number, so that each copy is a cohort of its
   own, admitted on other days. Each version of a resource is stamped (id, meta.versionId, meta.lastUpdated: now),
   indexed by ``r4/indexing.py`` and its Part 2 facts taken by ``privacy/visibility.py`` as the Repository does, and
   saved through the store's own write transaction (``SqlWriteTx.save``: the current row, the history row, the
   version's patients and the index rows, sent in batches); the IOP records and inbound referrals are copied row by
   row with the same substitutions. The partners, the program's Practitioners and the conformance resources exist
   once. Nothing goes through the write hooks: no Subscription exists, and the audit trail of the seeding is not
   copied.

The database is kept per backend, resources and seed (SQLite: bench/results/scale-N-seedS.db; PostgreSQL: the
database ``scale_N_seedS`` on ``--postgres``), ``--fresh`` makes it again. After loading: a sampled ANALYZE
(SQLite, as the store takes it), VACUUM ANALYZE (PostgreSQL, whose autovacuum is off on the development machine).

Then, through the Flask test client with tokens (the program's client ``system/*.rs``; a partner's for the
restricted search; an administrator's for the export), the audit on as in ``iop-fhir serve``: each query of the mix
``--rounds`` times (parameters drawn from the data, a different one each round) after one warm-up, p50 and p99; then
``--ingest`` transactions of 1,000 new Observations (POST entries), whose resources are removed again afterwards (and
the dead rows vacuumed on PostgreSQL) so that the cached database stays as generated.

    python bench/scale.py --resources 50000 --backend both      # quick
    python bench/scale.py                                         # 1,000,000 on both
    python bench/scale.py --backend postgresql --only read,sort-date --rounds 50
    python bench/scale.py --json bench/results/scale.json
    python bench/scale.py --backend postgresql --explain date,count   # the plan of each one's slowest SELECT

A query whose warm-up run takes longer than ``--budget`` seconds (default 20) is timed on that run alone.

Targets (PostgreSQL, 1,000,000 resources, 2 cores): every query p99 <= 100 ms but the export; ``_sort`` on any
indexed parameter <= 200 ms; ingest >= 1,500 resources/s. SQLite: every query p99 <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sqlite3
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson
from inprocess import token  # bench/inprocess.py: the scripts run with bench/ on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "fhir-examples" / "synthea-10-patients"
SYNTHEA_TYPES = ("Encounter", "Condition", "MedicationRequest", "Procedure", "Immunization", "AllergyIntolerance")
BASE = "http://bench/fhir"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
FHIR = "application/fhir+json"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
PROGRAM_CLIENT, PARTNER_CLIENT, ADMIN_CLIENT = "bench-scale", "bench-scale-partner", "bench-scale-admin"
HOSPITAL_EHR = "riverside-regional-ehr"  # the demo's hospital partner (demo/cohort.py), which its consents name
# Exist once, not per copy: partners, the program's staff, and what the service seeds itself.
SHARED_TYPES = frozenset(
    {"CodeSystem", "ConceptMap", "Measure", "StructureDefinition", "ValueSet", "Organization", "Practitioner"}
)
SHARED_RECORDS = frozenset({"partner"})
TARGET_MS = {"postgresql": 100.0, "sqlite": 1000.0}
TARGET_SORT_MS = 200.0  # PostgreSQL
TARGET_INGEST = 1500.0  # resources/s, PostgreSQL
UNTIMED = frozenset({"export"})  # not held to the query target

# Vital signs at every hospital Encounter and labs at every other: (code, display, unit, UCUM code, low, high).
VITALS = [
    ("8867-4", "Heart rate", "beats/min", "/min", 50, 110),
    ("29463-7", "Body weight", "kg", "kg", 45, 130),
    ("8310-5", "Body temperature", "Cel", "Cel", 36.0, 38.5),
]
LABS = [
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", "mg/dL", 65, 220),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "mg/dL", 0.5, 1.8),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", "g/dL", 10, 17.5),
]


def settings(database_url: str) -> Any:
    from iop_fhir.config import Settings

    return Settings.from_env(database_url=database_url, base_url=BASE, token_lifetime=3600)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the template: the demo and its patients' hospital records, stored by the service ----------------------------

_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _without_search_references(node: Any) -> Any:
    """Synthea refers to practitioners, locations and organizations by search (``Location?identifier=...``), which a
    transaction would resolve against resources the template does not have: such a reference keeps its display."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str) and "?" in node["reference"]:
            kept = {k: v for k, v in node.items() if k != "reference"}
            return kept or {"display": "unknown"}
        return {k: _without_search_references(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_search_references(v) for v in node]
    return node


def _observation(rng: random.Random, spec: tuple[Any, ...], category: str, patient: str, encounter: dict[str, Any]):
    code, display, unit, ucum, low, high = spec
    value = round(rng.uniform(low, high), 1 if high < 50 else 0)
    return {
        "resourceType": "Observation",
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": category,
                        "display": "Vital Signs" if category == "vital-signs" else "Laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{patient}"},
        "encounter": {"reference": f"Encounter/{encounter['id']}"},
        "effectiveDateTime": encounter["period"]["start"],
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
    }


def hospital_records(patients: list[str], seed: int) -> Iterator[dict[str, Any]]:
    """The hospital data of each demo patient: one Synthea patient's records (round robin), fresh ids, the demo
    patient as subject, and Observations at its Encounters."""
    rng = random.Random(seed)
    by_patient: dict[str, list[bytes]] = defaultdict(list)
    for res_type in SYNTHEA_TYPES:
        for line in (SYNTHEA / f"{res_type}.000.ndjson").read_bytes().splitlines():
            resource = orjson.loads(line)
            owner = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
            by_patient[owner.removeprefix("Patient/")].append(line)
    synthea = sorted(by_patient)
    for n, patient in enumerate(patients):
        source = synthea[n % len(synthea)]
        ids: dict[bytes, bytes] = {source.encode(): patient.encode()}

        def fresh(match: re.Match[bytes], ids: dict[bytes, bytes] = ids) -> bytes:
            if match[0] not in ids:
                ids[match[0]] = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
            return ids[match[0]]

        for line in by_patient[source]:
            resource = _without_search_references(orjson.loads(_UUID.sub(fresh, line)))
            resource.pop("meta", None)  # US Core claims the stripped references would no longer meet
            yield resource
            if resource["resourceType"] == "Encounter" and (resource.get("period") or {}).get("start"):
                for spec in VITALS:
                    yield _observation(rng, spec, "vital-signs", patient, resource)
                if rng.random() < 0.5:
                    for spec in LABS:
                        yield _observation(rng, spec, "laboratory", patient, resource)


def template(patients: int, seed: int, fresh: bool) -> Path:
    """The SQLite file of the template, made now unless cached."""
    from iop_fhir.app import create_app
    from iop_fhir.demo import seed as seed_demo

    path = RESULTS / f"scale-template-{patients}p-seed{seed}.db"
    if path.exists() and not fresh:
        return path
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.db")
    for stale in (partial, Path(f"{partial}-writer"), Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        stale.unlink(missing_ok=True)
    log(f"template: the demo of {patients} patients (seed {seed}) ...")
    started = time.perf_counter()
    app = create_app(settings(f"sqlite:///{partial}"))
    try:
        seed_demo(app, patients=patients, seed=seed)
        store = app.extensions["iop_fhir.store"]
        with store.reading() as conn:
            from sqlalchemy import text

            demo_patients = list(
                conn.execute(text("SELECT res_id FROM resources WHERE res_type = 'Patient' ORDER BY res_id")).scalars()
            )
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token(app, PROGRAM_CLIENT, scope='system/*.cruds')}"}
        batch: list[dict[str, Any]] = []
        sent = 0

        def send() -> None:
            entries = [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in batch
            ]
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            answer = client.post("/fhir", data=orjson.dumps(bundle), headers={**headers, "Content-Type": FHIR})
            if answer.status_code != 200:
                raise SystemExit(f"hospital data refused ({answer.status_code}): {answer.get_data()[:1500]!r}")
            batch.clear()

        for resource in hospital_records(demo_patients, seed):
            batch.append(resource)
            sent += 1
            if len(batch) == 1000:
                send()
        if batch:
            send()
        with store.writing() as conn:
            conn.exec_driver_sql("ANALYZE")
    finally:
        app.extensions["iop_fhir.store"].close()
    partial.replace(path)
    Path(f"{partial}-writer").unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    log(f"template: {sent:,} hospital resources for {len(demo_patients)} patients, {seconds:.0f} s")
    return path


# -- copies of the template ---------------------------------------------------------------------------------------


@dataclass
class Template:
    """The template's rows: every version of every resource, the IOP records and inbound referrals."""

    versions: dict[tuple[str, str], list[tuple[int, str, bytes]]]  # (type, id) -> [(version, method, content)]
    records: list[dict[str, Any]]
    referrals: list[dict[str, Any]]
    copied: frozenset[bytes]  # the ids each copy gets its own of
    shared: list[tuple[str, str]] = field(default_factory=list)  # to write once (those not stored yet)
    per_copy_keys: list[tuple[str, str]] = field(default_factory=list)

    @property
    def per_copy(self) -> int:
        return sum(1 for key in self.versions if key[0] not in SHARED_TYPES)


def load_template(path: Path) -> Template:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    versions: dict[tuple[str, str], list[tuple[int, str, bytes]]] = defaultdict(list)
    rows = db.execute(
        "SELECT res_type, res_id, version_id, method, content FROM resource_history"
        " ORDER BY res_type, res_id, version_id"
    )
    for row in rows:
        if row["method"] == "DELETE":
            raise SystemExit("the template holds a deletion, which copying does not carry over")
        versions[(row["res_type"], row["res_id"])].append((row["version_id"], row["method"], bytes(row["content"])))
    records = [dict(r) for r in db.execute("SELECT * FROM iop_records ORDER BY kind, id")]
    referrals = [dict(r) for r in db.execute("SELECT * FROM inbound_referrals ORDER BY id")]
    db.close()
    copied = {res_id.encode() for (res_type, res_id) in versions if res_type not in SHARED_TYPES}
    copied |= {r["id"].encode() for r in records if r["kind"] not in SHARED_RECORDS}
    copied |= {r["id"].encode() for r in referrals}
    if len({i[:24] for i in copied}) != len(copied) or not all(_UUID.fullmatch(i) for i in copied):
        raise SystemExit("the template's ids are not distinct uuids: copies could not take ids of their own")
    return Template(dict(versions), records, referrals, frozenset(copied))


_COPIED = re.compile(
    rb"(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    rb"|(?<![\d-])(?P<date>\d{4}-\d{2}-\d{2})(?!\d)"
    rb"|(?P<mrn>DEMO\d{4}-)(?P<n>\d{4})\b"
)


class Copy:
    """The substitutions of copy ``number``: its own ids, dates ``weeks`` weeks earlier, its own MRNs."""

    def __init__(self, number: int, ids: frozenset[bytes]) -> None:
        self.suffix = f"{number:012x}".encode()
        self.mrn = f"{number:04d}-".encode()
        self.ids = ids
        self.shift = timedelta(weeks=-(number % 52))
        self._dates: dict[bytes, bytes] = {}

    def _sub(self, match: re.Match[bytes]) -> bytes:
        if match["id"] is not None:
            found = match["id"]
            return found[:24] + self.suffix if found in self.ids else found
        if match["date"] is not None:
            day = match["date"]
            if day not in self._dates:
                try:
                    self._dates[day] = (date.fromisoformat(day.decode()) + self.shift).isoformat().encode()
                except ValueError:
                    self._dates[day] = day
            return self._dates[day]
        return match["mrn"] + self.mrn + match["n"]

    def bytes(self, content: bytes) -> bytes:
        return _COPIED.sub(self._sub, content)

    def text(self, value: str | None) -> str | None:
        return None if value is None else self.bytes(value.encode()).decode()


def _clock() -> Callable[[], int]:
    """now_us, strictly increasing: every version stored gets a lastUpdated of its own, as one by one writes would."""
    from iop_fhir.r4.instants import now_us

    last = [0]

    def tick() -> int:
        last[0] = max(now_us(), last[0] + 1)
        return last[0]

    return tick


_TEMPLATE: list[Template] = []  # the template of the generation under way, for the processes that prepare copies


def _prepare(task: tuple[int | None, int, int]) -> list[tuple[str, str, list[tuple[Any, Any, Any]]]]:
    """The versions of template resources ``start:stop`` (shared ones if ``number`` is None, else of that copy) as
    the Repository would save them: stamped, indexed, with their Part 2 facts."""
    from iop_fhir.fhir.repository import _stamp
    from iop_fhir.privacy import visibility
    from iop_fhir.r4 import indexing
    from iop_fhir.store.base import StoredResource

    number, start, stop = task
    tmpl = _TEMPLATE[0]
    tick = _clock()
    copy = None if number is None else Copy(number, tmpl.copied)
    keys = tmpl.shared if copy is None else tmpl.per_copy_keys
    prepared = []
    for res_type, res_id in keys[start:stop]:
        new_id = res_id if copy is None else copy.bytes(res_id.encode()).decode()
        saved = []
        for version_id, method, content in tmpl.versions[(res_type, res_id)]:
            body = orjson.loads(content if copy is None else copy.bytes(content))
            last_updated = tick()
            resource = _stamp(body, new_id, version_id, last_updated)
            stored = StoredResource(res_type, new_id, version_id, last_updated, False, orjson.dumps(resource), method)
            index = indexing.extract(resource)
            saved.append((stored, index, visibility.facts_of(resource, index)))
        prepared.append((res_type, new_id, saved))
    return prepared


def _copy_pending(tx: Any) -> None:
    """PostgreSQL: send the rows ``tx.save`` queued with COPY instead of INSERTs (SqlWriteTx.flush's tables and row
    shapes, each distinct set of columns in a COPY of its own)."""
    from iop_fhir.store import schema

    cursor = tx.conn.connection.driver_connection.cursor()
    for name in ("resources", "resource_history", "version_patients", *(t.name for t in schema.INDEX_TABLES.values())):
        rows = tx._pending.pop(name, None) or []
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = defaultdict(list)
        for row in rows:
            if name == "resource_history":
                row = {k: v for k, v in row.items() if k != "deleted"}
            columns = tuple(row)
            groups[columns].append(tuple(row[c] for c in columns))
        for columns, values in groups.items():
            with cursor.copy(f"COPY {name} ({', '.join(columns)}) FROM STDIN") as copy:
                for value in values:
                    copy.write_row(value)
    cursor.close()


def _stay_days(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The record rows with the days the store keeps on them as save_record would (each one's record_day; an
    enrollment's stay_end, from its latest active discharge among ``rows``), and the rows of group_attendees."""
    from iop_fhir.store.base import attendees, record_day

    contents = [orjson.loads(r["content"]) for r in rows]
    pairs = list(zip(rows, contents, strict=True))
    dated = [{**r, "record_day": record_day(r["kind"], c), "stay_end": None} for r, c in pairs]
    latest: dict[str, dict[str, Any]] = {}
    for row in sorted(dated, key=lambda r: (-r["updated"], r["created"], r["id"])):
        if row["kind"] == "discharge" and row["status"] == "active" and row["enrollment_id"] is not None:
            latest.setdefault(row["enrollment_id"], row)
    for row in dated:
        if row["kind"] == "enrollment" and row["id"] in latest:
            row["stay_end"] = latest[row["id"]]["record_day"]
    members = [{"group_id": r["id"], "enrollment_id": e} for r, c in pairs for e in attendees(r["kind"], c)]
    return dated, members


def generate(app: Any, tmpl: Template, copies: int, *, chunk: int = 2000) -> dict[str, Any]:
    """Writes ``copies`` copies of the template (the shared resources and records once) into the app's store: the
    versions are prepared by one process per CPU, and saved by this one in write transactions of ``chunk``."""
    import multiprocessing

    from sqlalchemy import insert, select

    from iop_fhir.store import schema

    store = app.extensions["iop_fhir.store"]
    with store.reading() as conn:
        present = {(t, i) for t, i in conn.execute(select(schema.resources.c.res_type, schema.resources.c.res_id))}
        present_records = {(k, i) for k, i in conn.execute(select(schema.iop_records.c.kind, schema.iop_records.c.id))}
    tmpl.shared = [key for key in tmpl.versions if key[0] in SHARED_TYPES and key not in present]
    tmpl.per_copy_keys = [key for key in tmpl.versions if key[0] not in SHARED_TYPES]
    _TEMPLATE[:] = [tmpl]
    tasks: list[tuple[int | None, int, int]] = [(None, 0, len(tmpl.shared))]
    for number in range(copies):
        tasks += [(number, s, s + chunk) for s in range(0, len(tmpl.per_copy_keys), chunk)]
    written = 0
    started = last_report = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        # A few tasks ahead of the writes at most: prepared versions waiting to be written are held in memory.
        ahead = 2 * (os.cpu_count() or 1)
        windows = (tasks[w : w + ahead] for w in range(0, len(tasks), ahead))
        done = (
            (task, prepared)
            for window in windows
            for task, prepared in zip(window, pool.imap(_prepare, window), strict=True)
        )
        for task, prepared in done:
            number, start, _ = task
            with store.write() as tx:
                for res_type, res_id, saved in prepared:
                    tx.reserve(res_type, res_id)
                    for stored, index, facts in saved:
                        tx.save(stored, index, facts)
                written += len(prepared)
                if store.postgres:
                    _copy_pending(tx)
                tx.flush()
                if number is None:
                    rows = [
                        r
                        for r in tmpl.records
                        if r["kind"] in SHARED_RECORDS and (r["kind"], r["id"]) not in present_records
                    ]
                elif start + chunk >= len(tmpl.per_copy_keys):  # the copy's last chunk: its records too
                    copy = Copy(number, tmpl.copied)
                    rows = [
                        {**r, "id": copy.text(r["id"]), "enrollment_id": copy.text(r["enrollment_id"]),
                         "content": copy.bytes(r["content"]), "resources": copy.bytes(r["resources"])}
                        for r in tmpl.records
                        if r["kind"] not in SHARED_RECORDS
                    ]  # fmt: skip
                    referrals = [
                        {**r, "id": copy.text(r["id"]), "enrollment_id": copy.text(r["enrollment_id"]),
                         "content": copy.bytes(r["content"]), "resources": copy.bytes(r["resources"])}
                        for r in tmpl.referrals
                    ]  # fmt: skip
                    if referrals:
                        tx.conn.execute(insert(schema.inbound_referrals), referrals)
                else:
                    rows = []
                if rows:
                    rows, attendees = _stay_days(rows)
                    tx.conn.execute(insert(schema.iop_records), rows)
                    if attendees:
                        tx.conn.execute(insert(schema.group_attendees), attendees)
            if time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                rate = written / (last_report - started)
                log(f"  {written:,} resources written, {rate:,.0f}/s (copy {(number or 0) + 1} of {copies})")
    seconds = time.perf_counter() - started
    return {"resources_written": written, "seconds": seconds, "rate": written / seconds, "copies": copies}


def _database(backend: str, resources: int, seed: int) -> tuple[str, Path | str]:
    """The URL of the cached database, and its file (SQLite) or name (PostgreSQL)."""
    if backend == "sqlite":
        path = RESULTS / f"scale-{resources}-seed{seed}.db"
        return f"sqlite:///{path}", path
    name = f"scale_{resources}_seed{seed}"
    return f"{POSTGRES}/{name}", name


def _postgres_admin(statement: str) -> Any:
    import psycopg

    with psycopg.connect(POSTGRES.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else None


def prepared(backend: str, resources: int, seed: int, template_patients: int, fresh: bool) -> tuple[str, dict]:
    """The database of ``resources`` on ``backend``, generated now unless cached; what generating it took."""
    from iop_fhir.app import create_app

    url, where = _database(backend, resources, seed)
    if backend == "sqlite":
        assert isinstance(where, Path)
        if where.exists() and not fresh:
            return url, {}
        partial = where.with_suffix(".partial.db")
        for stale in (
            where,
            partial,
            *(Path(f"{p}{s}") for p in (where, partial) for s in ("-wal", "-shm", "-writer")),
        ):
            stale.unlink(missing_ok=True)
        partial_url = f"sqlite:///{partial}"
    else:
        exists = _postgres_admin(f"SELECT 1 FROM pg_database WHERE datname = '{where}'")
        if exists and not fresh:
            return url, {}
        _postgres_admin(f'DROP DATABASE IF EXISTS "{where}_partial"')
        _postgres_admin(f'DROP DATABASE IF EXISTS "{where}"')
        _postgres_admin(f'CREATE DATABASE "{where}_partial"')
        partial_url = f"{POSTGRES}/{where}_partial"
    tmpl = load_template(template(template_patients, seed, fresh=False))
    copies = max(1, math.ceil(resources / tmpl.per_copy))
    log(f"{backend}: {copies} copies of the template ({tmpl.per_copy:,} resources each) ...")
    app = create_app(settings(partial_url))
    try:
        figures = generate(app, tmpl, copies)
        figures["analyze_s"] = analyzed(app, backend)
    finally:
        app.extensions["iop_fhir.store"].close()
    if backend == "sqlite":
        partial.replace(where)
        Path(f"{partial}-writer").unlink(missing_ok=True)
    else:
        _postgres_admin(f'ALTER DATABASE "{where}_partial" RENAME TO "{where}"')
    log(
        f"{backend}: generated {figures['resources_written']:,} resources in {figures['seconds']:.0f} s "
        f"({figures['rate']:,.0f}/s), then {'ANALYZE' if backend == 'sqlite' else 'VACUUM ANALYZE'} "
        f"{figures['analyze_s']:.0f} s"
    )
    return url, figures


# -- the query mix ----------------------------------------------------------------------------------------------


@dataclass
class Data:
    """Values drawn from the database for the queries' parameters."""

    patients: list[str]
    families: list[str]
    observations: list[str]
    codes: list[tuple[str, str]]
    consented: list[str]  # patients whose consents let the hospital partner see them
    counts: dict[str, int]
    period: tuple[str, str]
    valuesets: list[str] = field(default_factory=list)
    history_deep: str = ""  # the _cursor of the next link that leads half way into the Observations' history


def draw(app: Any) -> Data:
    from sqlalchemy import text

    store = app.extensions["iop_fhir.store"]
    with store.reading() as conn:

        def column(sql: str, **params: Any) -> list[Any]:
            return list(conn.execute(text(sql), params).scalars())

        patients = column("SELECT res_id FROM resources WHERE res_type = 'Patient' ORDER BY res_id")
        families = column(
            "SELECT DISTINCT exact FROM idx_string WHERE res_type = 'Patient' AND param = 'family' ORDER BY exact"
        )
        observations = column("SELECT res_id FROM resources WHERE res_type = 'Observation' ORDER BY res_id LIMIT 2000")
        codes = [
            (r.system, r.code)
            for r in conn.execute(
                text(
                    "SELECT system, code FROM idx_token WHERE res_type = 'Observation' AND param = 'code'"
                    " AND res_id IN (SELECT res_id FROM resources WHERE res_type = 'Observation'"
                    " ORDER BY res_id LIMIT 5000) GROUP BY system, code HAVING count(*) >= 20 ORDER BY code"
                )
            )
        ]
        consented = column(
            "SELECT DISTINCT target_id FROM idx_reference WHERE res_type = 'Consent' AND param = 'patient'"
            " ORDER BY target_id"
        )
        counts = {
            t: int(n) for t, n in conn.execute(text("SELECT res_type, count(*) FROM resources GROUP BY res_type")).all()
        }
        valuesets = column(
            "SELECT value FROM idx_uri WHERE res_type = 'ValueSet' AND param = 'url' ORDER BY value LIMIT 50"
        )
        low, high = conn.execute(
            text("SELECT min(low), max(low) FROM idx_date WHERE res_type = 'EpisodeOfCare' AND param = 'date'")
        ).one()
        deep = max(1, counts.get("Observation", 0) // 2)
        half_way = conn.execute(
            text(
                "SELECT last_updated, version_id, res_type, res_id FROM resource_history"
                " WHERE res_type = 'Observation' ORDER BY last_updated DESC, version_id DESC, res_type, res_id"
                " LIMIT 1 OFFSET :deep"
            ),
            {"deep": deep - 1},
        ).one()
    from iop_fhir.fhir.history import encode_cursor
    from iop_fhir.r4.instants import instant, now_us
    from iop_fhir.store.base import HistoryCursor

    history_deep = encode_cursor(HistoryCursor(now_us(), deep, *half_way))

    begin = date.fromisoformat(instant(int(low))[:10])
    end = date.fromisoformat(instant(int(high))[:10])
    middle = begin + (end - begin) / 2
    period = (middle.isoformat(), (middle + timedelta(days=91)).isoformat())  # a quarter
    return Data(patients, families, observations, codes, consented, counts, period, valuesets, history_deep)


@dataclass
class Query:
    name: str
    path: Callable[[random.Random], str]
    who: str = "program"  # program | partner | admin
    kind: str = "search"  # search | sort | export


def mix(data: Data) -> list[Query]:
    def code(rng: random.Random) -> str:
        system, value = rng.choice(data.codes)
        return f"{system}%7C{value}"

    def patient(rng: random.Random) -> str:
        return rng.choice(data.patients)

    def family(rng: random.Random) -> str:
        return rng.choice(data.families)

    def window(rng: random.Random) -> tuple[str, str]:
        """A range a client asks for: from a day, one to thirteen weeks."""
        start = date.fromisoformat(day(rng))
        return start.isoformat(), (start + timedelta(weeks=rng.randrange(1, 14))).isoformat()

    def day(rng: random.Random) -> str:
        start = date.fromisoformat(data.period[0])
        return (start + timedelta(days=rng.randrange(-365, 90))).isoformat()

    queries = [
        Query("read", lambda r: f"/fhir/Patient/{patient(r)}"),
        Query("read-observation", lambda r: f"/fhir/Observation/{r.choice(data.observations)}"),
        Query("token", lambda r: f"/fhir/Observation?code={code(r)}"),
        Query("token+patient", lambda r: f"/fhir/Observation?code={code(r)}&patient=Patient/{patient(r)}"),
        Query("string", lambda r: f"/fhir/Patient?family={family(r)}"),
        Query("date", lambda r: f"/fhir/Observation?date=ge{day(r)}"),
        Query("date-range", lambda r: "/fhir/Encounter?date=ge{}&date=lt{}".format(*window(r))),
        Query("reference", lambda r: f"/fhir/Observation?subject=Patient/{patient(r)}"),
        Query("quantity", lambda r: f"/fhir/Observation?value-quantity=gt{r.randrange(100, 200)}"),
        Query(
            "uri", lambda r: f"/fhir/ValueSet?url={r.choice(data.valuesets)}" if data.valuesets else "/fhir/ValueSet"
        ),
        Query("sort-token", lambda r: "/fhir/Observation?_sort=code&_count=10", kind="sort"),
        Query("sort-string", lambda r: "/fhir/Patient?_sort=family", kind="sort"),
        Query("sort-date", lambda r: "/fhir/Observation?_sort=-date", kind="sort"),
        Query("sort-reference", lambda r: "/fhir/Observation?_sort=subject", kind="sort"),
        Query("sort-quantity", lambda r: "/fhir/Observation?_sort=value-quantity", kind="sort"),
        Query("include", lambda r: f"/fhir/Observation?code={code(r)}&_include=Observation:subject"),
        Query("revinclude", lambda r: f"/fhir/Patient?_id={patient(r)}&_revinclude=Observation:subject"),
        Query("chain", lambda r: f"/fhir/Observation?patient.family={family(r)}"),
        Query("count", lambda r: "/fhir/Observation?_summary=count"),
        Query("history-type", lambda r: "/fhir/Observation/_history?_count=50"),
        # half way into the history, by the next link a client paging there follows (a _cursor, not an _offset)
        Query("history-type-deep", lambda r: f"/fhir/Observation/_history?_count=50&_cursor={data.history_deep}"),
        Query("history-system", lambda r: "/fhir/_history?_count=50"),
        Query("search-deep", lambda r: "/fhir/Encounter?_count=50&_offset=1000"),
        Query("outcomes", lambda r: f"/iop/outcomes?from={data.period[0]}&to={data.period[1]}"),
        Query(
            "partner",
            lambda r: f"/fhir/Observation?patient=Patient/{r.choice(data.consented or data.patients)}",
            who="partner",
        ),
        Query("partner-type", lambda r: "/fhir/Encounter?_count=20", who="partner"),
        Query("export", lambda r: "/fhir/$export?_type=Condition", who="admin", kind="export"),
    ]
    return queries


def _percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _export(client: Any, path: str, headers: dict[str, str]) -> Any:
    """Kick-off to manifest; the job is deleted afterwards."""
    kicked = client.get(path, headers={**headers, "Prefer": "respond-async", "Accept": FHIR})
    if kicked.status_code != 202:
        return kicked
    status = kicked.headers["Content-Location"].removeprefix(BASE.removesuffix("/fhir"))
    while (answer := client.get(status, headers=headers)).status_code == 202:
        time.sleep(0.02)
    client.delete(status, headers=headers)
    return answer


def measure(app: Any, queries: list[Query], rounds: int, seed: int, budget: float) -> dict[str, dict[str, Any]]:
    client = app.test_client()
    tokens = {
        "program": token(app, PROGRAM_CLIENT, scope="system/*.rs"),
        "partner": token(app, PARTNER_CLIENT, scope="system/*.rs", partner_id=HOSPITAL_EHR),
        "admin": token(app, ADMIN_CLIENT, scope="system/*.rs", admin=True),
    }
    figures: dict[str, dict[str, Any]] = {}
    for query in queries:
        rng = random.Random(f"{seed}-{query.name}")
        headers = {"Authorization": f"Bearer {tokens[query.who]}", "Accept": "application/json"}
        times: list[float] = []
        matches: list[int] = []
        status = 0
        for n in range(rounds + 1 if query.kind != "export" else min(rounds, 3) + 1):
            path = query.path(rng)
            began = time.perf_counter()
            answer = _export(client, path, headers) if query.kind == "export" else client.get(path, headers=headers)
            elapsed = time.perf_counter() - began
            status = answer.status_code
            if status != 200:
                raise SystemExit(f"{query.name}: GET {path} answered {status}: {answer.get_data()[:500]!r}")
            if n == 0:
                if elapsed > budget:  # one run is all there is time for
                    times.append(elapsed * 1000)
                    matches.append(-1)
                    break
                continue  # the warm-up
            times.append(elapsed * 1000)
            body = answer.get_json(silent=True) or {}
            found = body.get("total")
            if found is None and isinstance(body.get("entry"), list):
                found = len(body["entry"])
            if found is None and isinstance(body.get("output"), list):
                found = sum(int(o.get("count", 0)) for o in body["output"])
            matches.append(int(found) if isinstance(found, int) else -1)
        figures[query.name] = {
            "p50_ms": statistics.median(times),
            "p99_ms": _percentile(times, 0.99),
            "rounds": len(times),
            "kind": query.kind,
            "who": query.who,
            "example": query.path(random.Random(f"{seed}-{query.name}")),
            "matches_median": statistics.median(matches) if matches else None,
        }
        f = figures[query.name]
        found = "" if f["matches_median"] in (None, -1) else f", {f['matches_median']:.0f} found"
        log(f"  {query.name:<20} p50 {f['p50_ms']:9.1f} ms  p99 {f['p99_ms']:9.1f} ms  ({f['rounds']} runs{found})")
    writer = app.extensions["iop_fhir.audit"]
    if writer is not None:
        writer.flush()
    return figures


def explain(app: Any, queries: list[Query], seed: int) -> dict[str, str]:
    """The plan (EXPLAIN ANALYZE, BUFFERS) of the slowest SELECT each query sends to the database, run again with the
    same parameters after the request: what to look at for a slow query."""
    from sqlalchemy import event

    engine = app.extensions["iop_fhir.store"].engine
    client = app.test_client()
    tokens = {
        "program": token(app, PROGRAM_CLIENT, scope="system/*.rs"),
        "partner": token(app, PARTNER_CLIENT, scope="system/*.rs", partner_id=HOSPITAL_EHR),
        "admin": token(app, ADMIN_CLIENT, scope="system/*.rs", admin=True),
    }
    plans: dict[str, str] = {}
    for query in queries:
        sent: list[tuple[str, Any]] = []

        def note(
            _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool, sent: list = sent
        ) -> None:
            if not many and statement.lstrip().upper().startswith(("SELECT", "WITH")):
                sent.append((statement, parameters))

        path = query.path(random.Random(f"{seed}-{query.name}"))
        event.listen(engine, "before_cursor_execute", note)
        try:
            client.get(path, headers={"Authorization": f"Bearer {tokens[query.who]}", "Accept": "application/json"})
        finally:
            event.remove(engine, "before_cursor_execute", note)
        slowest = (-1.0, "")
        with engine.connect() as conn:
            for statement, parameters in sent:
                prefix = "EXPLAIN (ANALYZE, BUFFERS) " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
                began = time.perf_counter()
                rows = conn.exec_driver_sql(prefix + statement, parameters).all()
                elapsed = time.perf_counter() - began
                if elapsed > slowest[0]:
                    plan = "\n".join(" | ".join(str(c) for c in row) for row in rows)
                    slowest = (elapsed, f"-- {path}\n-- {elapsed * 1000:.1f} ms\n{statement}\n{parameters}\n{plan}")
        plans[query.name] = slowest[1]
        print(f"\n== {query.name}\n{slowest[1]}")
    return plans


def ingest(app: Any, data: Data, bundles: int, seed: int) -> dict[str, Any]:
    """``bundles`` transactions of 1,000 new Observations through POST /fhir; removed again afterwards."""
    from sqlalchemy import delete

    from iop_fhir.store import schema

    client = app.test_client()
    headers = {
        "Authorization": f"Bearer {token(app, PROGRAM_CLIENT + '-writer', scope='system/*.cruds')}",
        "Content-Type": FHIR,
    }
    rng = random.Random(f"{seed}-ingest")
    seconds: list[float] = []
    created: list[str] = []
    try:
        for _ in range(bundles):
            entries = []
            for _ in range(1000):
                spec = rng.choice(VITALS + LABS)
                observation = _observation(
                    rng,
                    spec,
                    "vital-signs" if spec in VITALS else "laboratory",
                    rng.choice(data.patients),
                    {"id": rng.choice(data.observations), "period": {"start": data.period[0]}},
                )
                del observation["id"], observation["encounter"]
                entries.append({"resource": observation, "request": {"method": "POST", "url": "Observation"}})
            bundle = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
            began = time.perf_counter()
            answer = client.post("/fhir", data=bundle, headers=headers)
            seconds.append(time.perf_counter() - began)
            if answer.status_code != 200:
                raise SystemExit(f"ingest: POST /fhir answered {answer.status_code}: {answer.get_data()[:500]!r}")
            for entry in answer.get_json()["entry"]:
                created.append(entry["response"]["location"].split("/")[1])
            log(f"  transaction of 1,000: {seconds[-1]:.2f} s")
    finally:
        store = app.extensions["iop_fhir.store"]
        tables = [schema.resources, schema.history, schema.version_patients, *schema.INDEX_TABLES.values()]
        with store.writing() as conn:
            for start in range(0, len(created), 500):
                chunk = created[start : start + 500]
                for table in tables:
                    conn.execute(delete(table).where(table.c.res_type == "Observation", table.c.res_id.in_(chunk)))
        if store.engine.dialect.name == "postgresql":
            # What autovacuum would do (off on the development machine): else the next run's index scans visit the
            # removed rows' dead entries and their heap pages.
            analyzed(app, "postgresql")
    median = statistics.median(seconds)
    return {"bundles": bundles, "seconds": seconds, "median_s": median, "rate": 1000 / median}


def size_of(backend: str, url: str, app: Any) -> int:
    if backend == "sqlite":
        path = Path(url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    with app.extensions["iop_fhir.store"].reading() as conn:
        return int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one())


def upgraded(create_app: Callable[..., Any], url: str, backend: str) -> Any:
    """The app on a cached database; when opening it migrated the schema (the app upgrades on start), how long that
    took is logged and the tables are analyzed again (vacuumed too on PostgreSQL, whose autovacuum is off here), as
    production's autovacuum would after a migration that rewrites rows."""
    from sqlalchemy import create_engine, text

    def revision() -> str | None:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        finally:
            engine.dispose()

    from iop_fhir.serving import settled

    before = revision()
    began = time.perf_counter()
    app = settled(create_app(settings(url)))  # as `iop-fhir serve` runs each worker
    if revision() != before:
        log(f"{backend}: migrated {before} -> {revision()} on open in {time.perf_counter() - began:.0f} s")
        took = analyzed(app, backend)
        log(f"{backend}: {'ANALYZE' if backend == 'sqlite' else 'VACUUM ANALYZE'} {took:.0f} s")
    return app


def analyzed(app: Any, backend: str) -> float:
    """The planner's statistics taken again (SQLite: sampled, as the store takes them; PostgreSQL: with dead rows
    vacuumed); the seconds it took."""
    began = time.perf_counter()
    store = app.extensions["iop_fhir.store"]
    if backend == "sqlite":
        store.refresh_statistics()  # sampled, as the store takes them itself
    else:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    return time.perf_counter() - began


def run(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    from iop_fhir.app import create_app

    url, generated = prepared(backend, args.resources, args.seed, args.template, args.fresh)
    app = upgraded(create_app, url, backend)
    try:
        data = draw(app)
        total = sum(data.counts.values())
        wanted = set(args.only.split(",")) if args.only else None
        queries = [q for q in mix(data) if wanted is None or q.name in wanted]
        log(f"{backend}: {total:,} resources ({len(data.patients):,} patients); {args.rounds} rounds per query")
        if args.explain:
            explained = {q.name for q in mix(data) if q.name in args.explain.split(",")}
            explain(app, [q for q in mix(data) if q.name in explained], args.seed)
            return {}
        figures = measure(app, queries, args.rounds, args.seed, args.budget)
        ingested = (
            ingest(app, data, args.ingest, args.seed) if args.ingest and (not wanted or "ingest" in wanted) else None
        )
        size = size_of(backend, url, app)
    finally:
        app.extensions["iop_fhir.store"].close()
    return {
        "backend": backend,
        "resources": total,
        "by_type": dict(sorted(data.counts.items(), key=lambda c: -c[1])),
        "patients": len(data.patients),
        "generated": generated,
        "queries": figures,
        "ingest": ingested,
        "database_bytes": size,
        "bytes_per_million": size / total * 1e6,
    }


def report(result: dict[str, Any]) -> bool:
    backend = result["backend"]
    limit = TARGET_MS[backend]
    print(f"\nbench/scale.py on {backend}: {result['resources']:,} resources, {result['patients']:,} patients")
    top = ", ".join(f"{t} {n:,}" for t, n in list(result["by_type"].items())[:8])
    print(f"  {top}, ...")
    generated = result["generated"]
    if generated:
        print(
            f"  generated {generated['resources_written']:,} resources in {generated['seconds']:.0f} s "
            f"({generated['rate']:,.0f}/s); analyze {generated['analyze_s']:.0f} s"
        )
    print(f"{'query':<20}{'p50 ms':>10}{'p99 ms':>10}{'found':>10}  target")
    met = True
    for name, f in result["queries"].items():
        if name in UNTIMED:
            verdict = ""
        else:
            target = TARGET_SORT_MS if f["kind"] == "sort" and backend == "postgresql" else limit
            ok = f["p99_ms"] <= target
            met &= ok
            verdict = f"p99 <= {target:.0f} ms {'PASS' if ok else 'FAIL'}"
        found = "" if f["matches_median"] in (None, -1) else f"{f['matches_median']:.0f}"
        print(f"{name:<20}{f['p50_ms']:>10.1f}{f['p99_ms']:>10.1f}{found:>10}  {verdict}")
    if result["ingest"]:
        rate = result["ingest"]["rate"]
        verdict = ""
        if backend == "postgresql":
            ok = rate >= TARGET_INGEST
            met &= ok
            verdict = f"  >= {TARGET_INGEST:,.0f}/s {'PASS' if ok else 'FAIL'}"
        print(
            f"ingest: {rate:,.0f} resources/s (transactions of 1,000, median "
            f"{result['ingest']['median_s']:.2f} s of {result['ingest']['bundles']}){verdict}"
        )
    print(
        f"database: {result['database_bytes'] / 1e9:.2f} GB, {result['bytes_per_million'] / 1e9:.2f} GB per million "
        "resources"
    )
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--resources", type=int, default=1_000_000, help="at least this many (whole copies)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--rounds", type=int, default=20, help="timed runs of each query, after one warm-up")
    parser.add_argument("--only", help="comma-separated query names, and ingest to time it (else no ingest)")
    parser.add_argument("--fresh", action="store_true", help="generate the database again even if cached")
    parser.add_argument("--template", type=int, default=25, help="demo patients in the template (default 25)")
    parser.add_argument("--ingest", type=int, default=5, help="transactions of 1,000 to time (0: none)")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="a query whose warm-up takes longer is timed on that run alone"
    )
    parser.add_argument("--explain", help="comma-separated query names: print the plan of each one's slowest SELECT")
    parser.add_argument("--json", type=Path, help="write the figures there")
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = [run(backend, args) for backend in backends]
    if args.explain:
        return 0
    met = [report(result) for result in results]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{os.cpu_count()} CPUs; every target met: {'yes' if all(met) else 'no'}")
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
