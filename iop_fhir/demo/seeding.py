"""Seeds the synthetic program (demo/cohort.py) through the service's own HTTP API, in process: the inpatient unit's
client posts each referral to /fhir, the program's client decides on it and records the stay at /iop, so every
record passes the same validation, mapping, Part 2 consent checks and audit trail as real traffic. The aftercare
partners have no live servers: what each reports on its copy of a discharge's referral Task (accepted, first visit
scheduled and attended, declined) is written onto our Task through /fhir as following it (exchange/followup.py)
would write it.

Seeding again is a no-op: a record sent again with the same content is answered 200 and nothing is written
(records have natural keys), a referral already on file is not sent again, a decision already taken is not taken
again, and a partner's answer already on our Task is not written again. Only the audit trail grows, as it does for
every request. A run that stopped half-way resumes where it stopped.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from tqdm import tqdm

from iop_fhir.demo import cohort
from iop_fhir.exchange import followup
from iop_fhir.exchange.client import PartnerClient
from iop_fhir.iop.schemas import PLURALS
from iop_fhir.r4 import definitions, search
from iop_fhir.security.registry import ClientRegistry, KeyRing, issue_for_client
from iop_fhir.security.tokens import jwk_thumbprint, public_jwk
from iop_fhir.store.base import DELIVERY_STATUSES, AuditQuery, Store, StoredRecord

PROGRAM_CLIENT = "demo-program"
ADMIN_CLIENT = "demo-admin"
INPATIENT_CLIENT = "demo-inpatient-unit"
EHR_CLIENT = "demo-hospital-ehr"
# The clients the demo registers (as `iop-fhir client add` does): its requests are made with their tokens, and a
# newcomer can mint the same tokens with `iop-fhir token --client ...`.
CLIENTS: dict[str, dict[str, Any]] = {
    PROGRAM_CLIENT: {"scope": "system/*.cruds", "name": "Demo: the program's own systems"},
    ADMIN_CLIENT: {"scope": "system/*.rs", "admin": True, "name": "Demo: the program's privacy officer"},
    INPATIENT_CLIENT: {
        "scope": "system/Patient.crs system/Condition.crs system/ServiceRequest.crs system/Task.crus",
        "partner_id": cohort.INPATIENT_UNIT,
        "name": "Demo: the referring inpatient unit",
    },
    EHR_CLIENT: {"scope": "system/*.rs", "partner_id": cohort.HOSPITAL_EHR, "name": "Demo: the hospital EHR"},
}
# Where `iop-fhir serve` listens by default: the base of the links the service writes when IOP_FHIR_BASE_URL is unset.
DEFAULT_ROOT = "http://127.0.0.1:8080"
FHIR_JSON = "application/fhir+json"
ATTENDED = ("attended", "late", "left-early")
MOUD = ("buprenorphine", "methadone")  # positive as prescribed, not a sign of use


class DemoError(Exception):
    """A request of the demo that the service refused, naming the request and what the service answered."""


@dataclass(frozen=True)
class DemoSummary:
    """What the database holds after seeding (counted in the store, so counting adds no audit events). Two
    summaries are equal when the counts are; the audit trail, the requests made and the time taken differ from run
    to run and are left out of the comparison."""

    seed: int
    first_day: str  # of the seeded program
    last_day: str
    partners: dict[str, int]  # by kind
    referrals: dict[str, int]  # by status
    patients: int  # enrollments
    records: dict[str, int]  # by kind
    discharges: dict[str, int]  # by reason
    sessions: dict[str, int]  # by attendance
    remote_sessions: int  # telehealth (video) or telephone
    drug_screens: int
    positive_drug_screens: int  # with at least one positive result other than prescribed MOUD
    deliveries: dict[str, int]  # outbox rows by status
    resources: dict[str, int]  # current FHIR resources by type, the audit trail apart
    example: dict[str, str]  # ids of the first patient, for trying the API
    audit_events: int = field(default=0, compare=False)
    requests: int = field(default=0, compare=False)  # made by this run
    writes: int = field(default=0, compare=False)  # of those, the ones that changed something
    seconds: float = field(default=0.0, compare=False)

    def lines(self) -> list[str]:
        def listed(counts: dict[str, int]) -> str:
            return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda c: (-c[1], c[0])))

        remote = f"{self.remote_sessions} by telehealth or telephone"
        missed = sum(n for a, n in self.sessions.items() if a in ("no-show", "excused-absence"))
        attended = sum(n for a, n in self.sessions.items() if a in ATTENDED)
        top = dict(sorted(self.resources.items(), key=lambda c: (-c[1], c[0]))[:5])
        example = self.example
        return [
            f"iop-fhir demo, seed {self.seed}: {cohort.PROGRAM_NAME}, {self.first_day} to {self.last_day}",
            f"  partners      {sum(self.partners.values())} ({listed(self.partners)})",
            f"  referrals     {sum(self.referrals.values())} ({listed(self.referrals)})",
            f"  patients      {self.patients} enrolled; discharges: {listed(self.discharges)}",
            f"  records       {listed(self.records)}",
            f"  sessions      {sum(self.sessions.values())}: {attended} attended, {missed} missed, "
            f"{self.sessions.get('cancelled-by-program', 0)} cancelled by the program (holidays); {remote}",
            f"  drug screens  {self.drug_screens}, {self.positive_drug_screens} with a positive result "
            "(prescribed buprenorphine or methadone aside)",
            f"  deliveries    {sum(self.deliveries.values())} in the outbox: {listed(self.deliveries)} "
            "(`iop-fhir worker` sends what is pending; blocked ones wait for a consent)",
            f"  FHIR          {sum(self.resources.values())} resources: {listed(top)}, ...",
            f"  audit log     {self.audit_events} events (every request leaves one, a repeated one too)",
            f"  this run      {self.requests} requests, {self.writes} of them changed something, "
            f"in {self.seconds:.1f} s",
            f"  try           GET /iop/enrollments/{example.get('enrollment', '?')}",
            f"                GET /fhir/Encounter?patient={example.get('patient', '?')}",
            f"  tokens        iop-fhir token --client {PROGRAM_CLIENT} (or {ADMIN_CLIENT}, {EHR_CLIENT}, "
            f"{INPATIENT_CLIENT})",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


class _Api:
    """The demo's HTTP client: requests to the app in process, each with the access token of a registered client."""

    def __init__(self, app: Flask) -> None:
        self.client = app.test_client()
        self.registry: ClientRegistry = app.extensions["iop_fhir.clients"]
        self.keys: KeyRing = app.extensions["iop_fhir.keys"]
        configured = app.config["IOP_FHIR"].base_url
        parts = urlsplit(configured) if configured else None
        self.root = f"{parts.scheme}://{parts.netloc}" if parts else DEFAULT_ROOT
        self._tokens: dict[str, tuple[str, float]] = {}
        self.requests = 0
        self.writes = 0

    def register(self, *, partners: bool) -> None:
        """Registers the demo's clients (the partners' only once the partners are) that are not registered yet.
        Their public keys are of key pairs made here and not kept: the demo's tokens come from the service's own
        signing key, as `iop-fhir token` does."""
        for client_id, registration in CLIENTS.items():
            if ("partner_id" in registration) == partners and self.registry.get(client_id) is None:
                key = ec.generate_private_key(ec.SECP384R1())
                jwk = {**public_jwk(key), "kid": jwk_thumbprint(key), "alg": "ES384", "use": "sig"}
                self.registry.add(client_id, jwks={"keys": [jwk]}, **registration)

    def token(self, client_id: str) -> str:
        token, minted = self._tokens.get(client_id, ("", 0.0))
        # Renewed well before it expires: a large demo runs for longer than a token lives.
        if not token or time.monotonic() - minted > self.keys.issuer.lifetime_s / 3:
            token = issue_for_client(self.registry, self.keys, client_id, None)[0]
            self._tokens[client_id] = (token, time.monotonic())
        return token

    def call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        body: Any = None,
        client: str = PROGRAM_CLIENT,
        fhir: bool = False,
        writes: bool = False,
    ) -> Any:
        """The JSON answer of a request that must succeed; DemoError naming ``what`` and the path otherwise.
        ``writes``: the request changes something (a POST of a record counts as a write when it answers 201)."""
        headers = {"Authorization": f"Bearer {self.token(client)}", "Accept": FHIR_JSON if fhir else "application/json"}
        data = None if body is None else orjson.dumps(body)
        content_type = None if body is None else FHIR_JSON if fhir else "application/json"
        response = self.client.open(
            path, method=method, base_url=self.root, headers=headers, data=data, content_type=content_type
        )
        self.requests += 1
        answer = response.get_json(silent=True)
        if response.status_code not in (200, 201):
            raise DemoError(f"{method} {path} ({what}) answered {response.status_code}: {_problems(answer)}")
        if writes or response.status_code == 201:
            self.writes += 1
        return answer


def _problems(answer: Any) -> str:
    issues = answer.get("issue") if isinstance(answer, dict) else None
    if not isinstance(issues, list):
        return "no OperationOutcome"
    return "; ".join(
        f"{(i.get('expression') or ['-'])[0]}: {i.get('diagnostics') or i.get('code')}" for i in issues[:5]
    )


def seed(app: Flask, *, patients: int = 25, seed: int = 2026, progress: bool = False) -> DemoSummary:
    """Seeds ``app`` (an app of ``iop_fhir.app.create_app``) with the synthetic program of ``seed``: four partners,
    ``patients`` admitted patients (and a few referrals declined or not showing up), each with consents, assessments,
    a treatment plan, sessions and a discharge. Seeding again changes nothing (module docstring). ``progress`` shows a
    progress bar on stderr when it is a terminal."""
    started = time.monotonic()
    stories = cohort.build(patients=patients, seed=seed)
    api = _Api(app)
    api.register(partners=False)
    for partner in cohort.partners():
        api.call("POST", "/iop/partners", f"partner {partner['id']}", body=partner)
    api.register(partners=True)
    known = {mrn: referral for mrn, referral in _referrals(api)}
    # The partners' servers as following a Task sees them; nothing is sent to them (the answers hold no references
    # to resolve there).
    servers = {p["id"]: PartnerClient(p["fhir_base_url"]) for p in cohort.partners()}
    bar = tqdm(total=len(stories), disable=None if progress else True, file=sys.stderr, unit="patient", desc="demo")
    try:
        for story in stories:
            _seed_story(api, story, known.get(story.mrn), servers)
            bar.update(1)
    finally:
        bar.close()
    store: Store = app.extensions["iop_fhir.store"]
    writer = app.extensions["iop_fhir.audit"]
    if writer is not None:
        writer.flush()  # the audit rows of the last reads are counted too
    return summarize(store, stories, seed=seed, requests=api.requests, writes=api.writes, started=started)


def _referrals(api: _Api) -> Iterator[tuple[str, dict[str, Any]]]:
    """The referrals on file, by the MRN of their patient."""
    offset = 0
    while True:
        page = api.call("GET", f"/iop/referrals?offset={offset}&count=500", "the referrals on file")
        for referral in page["items"]:
            identifiers = (referral.get("patient") or {}).get("identifiers") or []
            if identifiers:
                yield str(identifiers[0]["value"]), referral
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return


def _seed_story(
    api: _Api, story: cohort.Story, referral: dict[str, Any] | None, servers: dict[str, PartnerClient]
) -> None:
    if referral is None:
        answer = api.call(
            "POST", "/fhir", f"referral of {story.name}", body=story.bundle, client=INPATIENT_CLIENT, fhir=True
        )
        locations = [str((e.get("response") or {}).get("location", "")) for e in answer.get("entry", [])]
        task = next((loc for loc in locations if loc.startswith("Task/")), None)
        if task is None:
            raise DemoError(f"POST /fhir (referral of {story.name}) created no Task")
        referral = api.call("GET", f"/iop/referrals/{task.split('/')[1]}", f"referral of {story.name}")
    elif referral.get("requested_start") != story.requested_start.isoformat():
        # The same seed with another --patients draws other dates: its records would mix with these.
        raise DemoError(
            f"the referral of {story.name} on file is not the one this demo sends: the database holds a demo of "
            "the same seed with another number of patients; seed a fresh database or use the same --patients"
        )
    rid, status = referral["id"], referral["status"]
    decisions = f"/iop/referrals/{rid}"
    planned = {"planned_admission": story.planned_admission.isoformat()}
    if story.decision == "decline" and status == "requested":
        reason = {"reason": story.decline_reason}
        referral = api.call("POST", f"{decisions}/decline", f"decline {story.name}", body=reason, writes=True)
    elif story.decision != "decline" and status == "requested":
        referral = api.call("POST", f"{decisions}/accept", f"accept {story.name}", body=planned, writes=True)
    status = referral["status"]
    if story.decision == "no-show" and status == "accepted":
        referral = api.call("POST", f"{decisions}/no-show", f"no-show of {story.name}", writes=True)
    elif story.decision == "admit" and status == "accepted":
        admission = {"enrollment": story.enrollment}
        referral = api.call("POST", f"{decisions}/admit", f"admission of {story.name}", body=admission, writes=True)
    expected = {"admit": "admitted", "decline": "declined", "no-show": "no-show"}[story.decision]
    if referral["status"] != expected:
        raise DemoError(f"referral {rid} of {story.name} is {referral['status']}; the demo expected {expected}")
    enrollment_id = referral.get("enrollment_id")
    referral_task: str | None = None  # of the discharge, to the partner it refers the patient to
    for record in story.records:
        body = {"enrollment_id": enrollment_id, **record.payload}
        answer = api.call("POST", f"/iop/{PLURALS[record.kind]}", f"{record.what} of {story.name}", body=body)
        if record.kind == "discharge":
            referral_task = next((str(r) for r in answer.get("fhir", []) if str(r).startswith("Task/")), None)
    if story.aftercare_answers:
        if referral_task is None:
            raise DemoError(f"the discharge of {story.name} made no referral Task for the partner's answers")
        _follow(api, story, referral_task, servers)


def _follow(api: _Api, story: cohort.Story, task: str, servers: dict[str, PartnerClient]) -> None:
    """Writes the partner's answers onto our referral Task, one version each, as followup.follow() would copy them
    (followup.reflect). Those already on the Task are not written again: the Task is taken to be at the last answer
    that would change nothing on it."""
    what = f"referral Task of {story.name}"
    ours: dict[str, Any] = api.call("GET", f"/fhir/{task}", what, fhir=True)
    partner = servers[str(ours["owner"]["reference"]).split("/", 1)[1]]
    answers = story.aftercare_answers
    done = next((n for n in range(len(answers), 0, -1) if followup.reflect(ours, answers[n - 1], partner) is None), 0)
    for theirs in answers[done:]:
        reflected = followup.reflect(ours, theirs, partner)
        if reflected is not None:
            answer = f"the partner's answer on the {what}"
            ours = api.call("PUT", f"/fhir/{task}", answer, body=reflected, fhir=True, writes=True)


# -- the summary ---------------------------------------------------------------------------------------------------


def _all(store: Store, kind: str) -> Iterator[StoredRecord]:
    return _every(lambda offset: store.records(kind, offset=offset, count=500))


def _every(page_at: Callable[[int], tuple[list[StoredRecord], int]]) -> Iterator[StoredRecord]:
    """Every item of a paged listing (``page_at(offset)`` gives a page and the total), in its order."""
    offset = 0
    while True:
        page, total = page_at(offset)
        yield from page
        offset += len(page)
        if not page or offset >= total:
            return


def summarize(
    store: Store,
    stories: list[cohort.Story],
    *,
    seed: int,
    requests: int = 0,
    writes: int = 0,
    started: float | None = None,
) -> DemoSummary:
    """The summary of what ``store`` holds now (every record in it, not only the demo's)."""
    records = {kind: store.records(kind, count=0)[1] for kind in PLURALS}
    on_moud = {
        plan.enrollment_id
        for plan in _all(store, "treatment-plan")
        if any(i["service"] == "medication-management" for i in plan.content.get("interventions", []))
    }
    sessions: Counter[str] = Counter()
    remote = screens = positive = 0
    for session in _all(store, "session"):
        content = session.content
        sessions[content["attendance"]] += 1
        remote += content["modality"] != "in-person"
        screen = content.get("drug_screen")
        if screen is not None:
            screens += 1
            prescribed = MOUD if session.enrollment_id in on_moud else ()
            positive += any(r["result"] == "positive" and r["analyte"] not in prescribed for r in screen["results"])
    resources: dict[str, int] = {}
    for res_type in sorted(definitions.resource_types()):
        total = store.search(search.parse(res_type, [("_summary", "count")])).total or 0
        if total:
            resources[res_type] = total
    audit_events = store.audit_rows(AuditQuery(count=0, total=True))[1] or 0
    first = next((s for s in stories if s.decision == "admit"), None)
    example: dict[str, str] = {}
    if first is not None:
        enrollment = next(
            (
                r
                for r in _all(store, "enrollment")
                if r.content["patient"]["identifiers"][0]["value"] == first.mrn and r.status == "active"
            ),
            None,
        )
        if enrollment is not None:
            example["enrollment"] = enrollment.id
            example.update(
                (entry["role"], entry["reference"].split("/", 1)[1])
                for entry in enrollment.resources
                if entry["role"] in ("patient", "episode")
            )
    days = [s.referred_on for s in stories] + [
        _last_day(r.payload) for s in stories for r in s.records if r.kind == "discharge"
    ]
    return DemoSummary(
        seed=seed,
        first_day=min(days).isoformat(),
        last_day=max(days).isoformat(),
        partners=dict(Counter(str(r.content["kind"]) for r in _all(store, "partner"))),
        referrals=dict(
            Counter(str(r.content["status"]) for r in _every(lambda at: store.referrals(offset=at, count=500)))
        ),
        patients=records["enrollment"],
        records={kind: n for kind, n in records.items() if n},
        discharges=dict(Counter(str(r.content["reason"]) for r in _all(store, "discharge"))),
        sessions=dict(sessions),
        remote_sessions=remote,
        drug_screens=screens,
        positive_drug_screens=positive,
        deliveries={s: n for s in DELIVERY_STATUSES if (n := store.deliveries(status=s, count=0)[1])},
        resources=resources,
        example=example,
        audit_events=audit_events,
        requests=requests,
        writes=writes,
        seconds=round(time.monotonic() - started, 1) if started is not None else 0.0,
    )


def _last_day(payload: dict[str, Any]) -> date:
    return date.fromisoformat(payload["discharge_date"])
