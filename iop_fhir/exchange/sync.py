"""`iop-fhir sync`: pulls the Conditions, MedicationRequests and laboratory Observations of enrolled patients from
hospital EHR partners into the store, incrementally (a cursor per partner, patient and type) and resumably.

Each pulled resource is stored under an id derived from the partner and its id there, so a pull repeated after a
crash or an overlap stores nothing twice. It is stored, and the cursor moved past it, in one transaction.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import orjson

from iop_fhir.config import Settings
from iop_fhir.errors import FhirError, Invalid, Issue, Unprocessable
from iop_fhir.fhir.repository import Repository
from iop_fhir.mapping import ids
from iop_fhir.r4 import search, validation
from iop_fhir.r4.instants import now_us
from iop_fhir.store.base import Store, StoredRecord, WriteTx

if TYPE_CHECKING:
    import requests

    from iop_fhir.exchange.client import PartnerClient

log = logging.getLogger(__name__)

PARTNER_KIND = "hospital-ehr"
# What is pulled, and the search parameters that narrow it beyond the patient.
STREAMS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Condition", ()),
    ("MedicationRequest", ()),
    ("Observation", (("category", "laboratory"),)),
)
PAGE_SIZE = "100"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RELATIVE = re.compile(r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?\Z")


def sync_id(partner_id: str, res_type: str, their_id: str) -> str:
    """Our id of a partner's resource: the same partner, type and id always name the same resource here."""
    return str(uuid.uuid5(ids.NAMESPACE, "|".join(["sync", partner_id, res_type, their_id])))


@dataclass
class StreamResult:
    """One partner, patient and type: what one run stored, and where its cursor stands."""

    partner: str
    patient: str  # our Patient id
    res_type: str
    stored: int = 0
    unchanged: int = 0
    cursor: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SyncReport:
    streams: list[StreamResult] = field(default_factory=list)
    # Partners or enrollments that could not be synced at all: {"partner", "enrollment"?, "error"}.
    skipped: list[dict[str, str]] = field(default_factory=list)
    # Enrolled patients the partner does not know (by the enrollment's first identifier): {"partner", "enrollment"}.
    unmatched: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped and all(s.error is None for s in self.streams)

    def to_json(self) -> dict[str, Any]:
        return {
            "stored": sum(s.stored for s in self.streams),
            "unchanged": sum(s.unchanged for s in self.streams),
            "streams": [s.to_json() for s in self.streams],
            "skipped": self.skipped,
            "unmatched": self.unmatched,
        }


def hospital_partners(store: Store, partner_id: str | None = None) -> list[dict[str, Any]]:
    """The active hospital-ehr partners (or the one named, which must be one); Unprocessable if it is none."""
    if partner_id is not None:
        record = store.record("partner", partner_id)
        if record is None:
            raise Unprocessable(f"partner {partner_id} is not known", "partner", code="not-found")
        if not _is_active_hospital(record):
            raise Unprocessable(f"partner {partner_id} is not an active {PARTNER_KIND} partner", "partner")
        return [record.content]
    return [r.content for r in _records(store, "partner") if _is_active_hospital(r)]


def sync_all(
    store: Store,
    repository: Repository,
    settings: Settings,
    *,
    partner_id: str | None = None,
    session: requests.Session | None = None,
    progress: bool = False,
) -> SyncReport:
    """One pass over every active hospital-ehr partner (or the one named) and every actively enrolled patient;
    ``progress`` shows a bar of the patients done on stderr when it is a terminal."""
    from tqdm import tqdm

    from iop_fhir.exchange.client import DeliveryError
    from iop_fhir.exchange.partners import client_for

    report = SyncReport()
    enrollments = [r for r in _records(store, "enrollment") if r.status == "active"]
    partners = hospital_partners(store, partner_id)
    total = len(partners) * len(enrollments)
    with tqdm(total=total, disable=None if progress else True, file=sys.stderr, unit="patient", desc="sync") as bar:
        for partner in partners:
            try:
                client = client_for(partner, settings, session=session)
            except DeliveryError as error:
                report.skipped.append({"partner": partner["id"], "error": error.message})
                bar.update(len(enrollments))
                continue
            for enrollment in enrollments:
                sync_enrollment(store, repository, partner, client, enrollment, report)
                bar.update(1)
    return report


def sync_enrollment(
    store: Store,
    repository: Repository,
    partner: dict[str, Any],
    client: PartnerClient,
    enrollment: StoredRecord,
    report: SyncReport,
) -> None:
    """Pull every stream of one enrolled patient from one partner, adding to ``report``."""
    from iop_fhir.exchange.client import DeliveryError

    patient_id = _our_patient(enrollment)
    identifiers = (enrollment.content.get("patient") or {}).get("identifiers") or []
    if patient_id is None or not identifiers:
        report.skipped.append({"partner": partner["id"], "enrollment": enrollment.id, "error": "no patient"})
        return
    first = identifiers[0]
    token = search.token_value(first["system"], first["value"])
    try:
        found = (r for r in client.search("Patient", [("identifier", token)]) if r.get("resourceType") == "Patient")
        matches = list(islice(found, 2))
    except DeliveryError as error:
        report.skipped.append({"partner": partner["id"], "enrollment": enrollment.id, "error": error.message})
        return
    if not matches:  # not a patient of this hospital: nothing to pull, and nothing wrong
        report.unmatched.append({"partner": partner["id"], "enrollment": enrollment.id})
        return
    if len(matches) > 1 or not isinstance(matches[0].get("id"), str):
        report.skipped.append(
            {
                "partner": partner["id"],
                "enrollment": enrollment.id,
                "error": "more than one patient at the partner has the enrollment's first identifier",
            }
        )
        return
    their_patient = str(matches[0]["id"])
    for res_type, narrowing in STREAMS:
        result = sync_stream(store, repository, partner, client, patient_id, their_patient, res_type, narrowing)
        report.streams.append(result)


def sync_stream(
    store: Store,
    repository: Repository,
    partner: dict[str, Any],
    client: PartnerClient,
    patient_id: str,
    their_patient: str,
    res_type: str,
    narrowing: tuple[tuple[str, str], ...] = (),
) -> StreamResult:
    """Pull one type of one patient's resources changed since the cursor, page by page, oldest first.

    The search asks for ``_lastUpdated=ge<cursor>`` sorted by ``_lastUpdated``: ``ge`` rather than ``gt`` because
    resources sharing the cursor's instant may not all have been stored; the one read again is found unchanged.
    Each page is stored in one transaction. When the partner says (in the page's self link, which R4 has carry the
    parameters it used) that it sorted by ``_lastUpdated``, that transaction also moves the cursor to the page's
    newest resource, so an interrupted pull resumes after the last page stored. When it does not, the cursor moves
    only once the whole search is stored: in an unsorted answer, a later page may hold older resources than those
    already seen, and a cursor moved past them would skip them for good.
    """
    from iop_fhir.exchange.client import DeliveryError

    partner_id = str(partner["id"])
    base = str(partner["fhir_base_url"]).rstrip("/")
    result = StreamResult(partner_id, patient_id, res_type)
    cursor = store.sync_cursor(partner_id, patient_id, res_type)
    params = [("patient", their_patient), *narrowing, ("_sort", "_lastUpdated"), ("_count", PAGE_SIZE)]
    if cursor is not None:
        params.append(("_lastUpdated", f"ge{cursor}"))
    committed = _instant_us(cursor)
    newest: tuple[int, str] | None = None
    in_order = True
    try:
        for page in pages(client, base, res_type, params):
            resources = [r for r in _entries(page) if r.get("resourceType") == res_type]
            in_order = in_order and _sorted_by_last_updated(page)
            stored = unchanged = 0
            with store.write() as tx:
                for resource in resources:
                    updated = (resource.get("meta") or {}).get("lastUpdated")
                    moment = _instant_us(updated)
                    if moment is not None:
                        if newest is not None and moment < newest[0]:
                            in_order = False  # the partner said it sorted, and did not
                        if newest is None or moment > newest[0]:
                            newest = (moment, str(updated))
                    body = localize(
                        resource, partner_id=partner_id, base=base, their_patient=their_patient, ours=patient_id
                    )
                    if store_resource(tx, repository, body):
                        stored += 1
                    else:
                        unchanged += 1
                advance = in_order and newest is not None and (committed is None or newest[0] > committed)
                if advance and newest is not None:
                    tx.save_sync_cursor(partner_id, patient_id, res_type, newest[1], now_us())
            if advance and newest is not None:
                committed = newest[0]
            result.stored += stored
            result.unchanged += unchanged
    except DeliveryError as error:
        result.error = error.message
    except FhirError as error:
        result.error = "; ".join(f"{i.expression or res_type}: {i.diagnostics}" for i in error.issues)
    if result.error is None and newest is not None and (committed is None or newest[0] > committed):
        with store.write() as tx:
            tx.save_sync_cursor(partner_id, patient_id, res_type, newest[1], now_us())
    result.cursor = store.sync_cursor(partner_id, patient_id, res_type)
    if result.error is not None:
        log.warning("sync %s Patient/%s %s: stopped: %s", partner_id, patient_id, res_type, result.error)
    else:
        log.info(
            "sync %s Patient/%s %s: %d stored, %d unchanged",
            partner_id,
            patient_id,
            res_type,
            result.stored,
            result.unchanged,
        )
    return result


def pages(client: PartnerClient, base: str, res_type: str, params: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """The searchset Bundles of a search at the partner, following ``next`` links (which must stay under its base:
    they would carry our credentials elsewhere)."""
    from iop_fhir.exchange.client import DeliveryError, where

    url = f"{base}/{res_type}?{urlencode(params)}"
    seen = {url}
    while True:
        page = client.read(url[len(base) + 1 :])
        yield page
        link = _link(page, "next")
        if link is None:
            return
        url = urljoin(url, link)
        if not url.startswith(base + "/"):
            raise DeliveryError(
                f"{where('GET', base + '/' + res_type)}: the next link of the search leaves the partner's base",
                retryable=False,
            )
        if url in seen:
            raise DeliveryError(f"{where('GET', url)}: the next links of the search loop", retryable=False)
        seen.add(url)


def localize(resource: dict[str, Any], *, partner_id: str, base: str, their_patient: str, ours: str) -> dict[str, Any]:
    """A partner's resource as we store it: our deterministic id, ``meta.source`` naming it at the partner, its
    patient references pointing at our Patient, and its other relative references made absolute at the partner
    (they name the partner's resources, not ours). Its own security labels and tags are kept; none are added.

    Unprocessable if it is not about the patient it was searched for.
    """
    res_type = str(resource.get("resourceType"))
    their_id = resource.get("id")
    if not isinstance(their_id, str) or not their_id:
        raise Unprocessable(f"a {res_type} from the partner has no id", f"{res_type}.id")
    patient_refs = {f"Patient/{their_patient}", f"{base}/Patient/{their_patient}"}
    subject = resource.get("subject")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    if _unversioned(reference) not in patient_refs:
        raise Unprocessable(
            f"{res_type}/{their_id} at the partner is not about the patient it was searched for", f"{res_type}.subject"
        )

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: _reference(v, base, patient_refs, ours) if k == "reference" and isinstance(v, str) else rewrite(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    body: dict[str, Any] = rewrite({k: v for k, v in resource.items() if k not in ("id", "meta")})
    their_meta = resource.get("meta")
    their_meta = their_meta if isinstance(their_meta, dict) else {}
    meta = {k: their_meta[k] for k in ("profile", "security", "tag") if k in their_meta}
    meta["source"] = f"{base}/{res_type}/{their_id}"
    return {"resourceType": res_type, "id": sync_id(partner_id, res_type, their_id), "meta": meta, **body}


def store_resource(tx: WriteTx, repository: Repository, body: dict[str, Any]) -> bool:
    """Store a localized resource in ``tx``; False (nothing written) when the stored version already says the same.
    Invalid if it is not valid R4."""
    res_type, res_id = str(body["resourceType"]), str(body["id"])
    current = tx.current(res_type, res_id)
    if current is not None and not current.deleted and current.content is not None:
        stored = orjson.loads(current.content)
        meta = {k: v for k, v in (stored.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
        if {**stored, "meta": meta} == body:
            return False
    issues = validation.validate(body, expected_type=res_type, expected_id=res_id, require_id=True)
    errors = [i for i in issues if i.severity in ("error", "fatal")]
    if errors:
        source = body["meta"]["source"].rsplit("/", 2)
        # The validator's messages may quote values (PHI): where and what kind of problem only.
        raise Invalid(
            [
                Issue(i.code, f"{source[-2]}/{source[-1]} at the partner is not valid R4 ({i.code})", i.expression)
                for i in errors
            ]
        )
    repository.update_in(tx, res_type, res_id, body)
    return True


def run(
    store: Store,
    repository: Repository,
    settings: Settings,
    *,
    partner_id: str | None = None,
    once: bool = False,
    interval: float = 300.0,
    session: requests.Session | None = None,
) -> int:
    """Sync now (``once``), or every ``interval`` seconds until stopped; stopping at any moment is safe (each
    resource and its cursor commit together). What is stored goes through ``repository``, the app's kind (its write
    hooks: subscriptions). Prints each pass's report as JSON. Returns the exit status: 0, 1 if the last pass had
    errors, 2 if the partner named is not an active hospital-ehr partner."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    while True:
        try:
            # Log lines go above the progress bar instead of through it.
            with logging_redirect_tqdm():
                report = sync_all(store, repository, settings, partner_id=partner_id, session=session, progress=True)
        except Unprocessable as error:
            print(f"iop-fhir sync: {error}", flush=True)
            return 2
        print(orjson.dumps(report.to_json()).decode(), flush=True)
        if once:
            return 0 if report.ok else 1
        time.sleep(interval)


# -- helpers -------------------------------------------------------------------------------------------------------


def _records(store: Store, kind: str) -> Iterator[StoredRecord]:
    offset = 0
    while True:
        page, total = store.records(kind, offset=offset, count=200)
        yield from page
        offset += len(page)
        if not page or offset >= total:
            return


def _entries(page: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for entry in page.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and (entry.get("search") or {}).get("mode") != "outcome":
            yield resource


def _link(page: dict[str, Any], relation: str) -> str | None:
    for link in page.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == relation and isinstance(link.get("url"), str):
            return str(link["url"])
    return None


def _sorted_by_last_updated(page: dict[str, Any]) -> bool:
    """Whether the partner says it sorted this page by _lastUpdated, oldest first: its self link's _sort."""
    self_link = _link(page, "self")
    if self_link is None:
        return False
    sort = dict(parse_qsl(urlsplit(self_link).query)).get("_sort", "")
    return sort.split(",", 1)[0].strip() == "_lastUpdated"


def _is_active_hospital(record: StoredRecord) -> bool:
    content = record.content
    return record.status == "active" and content.get("kind") == PARTNER_KIND and content.get("active") is not False


def _our_patient(enrollment: StoredRecord) -> str | None:
    for entry in enrollment.resources:
        if entry.get("role") == "patient" and entry.get("reference", "").startswith("Patient/"):
            return entry["reference"].split("/", 1)[1]
    return None


def _unversioned(reference: Any) -> Any:
    return reference.split("/_history/", 1)[0] if isinstance(reference, str) else reference


def _reference(value: str, base: str, patient_refs: set[str], ours: str) -> str:
    if _unversioned(value) in patient_refs:
        return f"Patient/{ours}"
    if _RELATIVE.match(value):
        return f"{base}/{value}"
    return value  # contained (#id), absolute, urn:uuid: kept as written


def _instant_us(text: Any) -> int | None:
    """A FHIR instant in µs since the epoch (integer arithmetic: exact); None if it is none."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
