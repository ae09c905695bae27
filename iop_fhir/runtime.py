"""The one place that builds the service's parts from Settings: the store (opened and migrated), the repository with
its profiles and its write hooks (registered here, by name), the record service with its record hooks, the client
registry and signing keys, the partner client, the exporter, the audit log's writer; and the long-running commands
(worker, sync) assembled from them. The app factory and the CLI get everything here; nothing below them imports this
module.

Every write hook is given what it needs when it is made (the configured or request base URL, the repository): none
reads Flask's globals or the environment inside a transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.exc import SQLAlchemyError

from iop_fhir import conformance
from iop_fhir.config import Settings
from iop_fhir.exchange import followup, partners, referrals, sync, transitions, worker
from iop_fhir.exchange.client import PartnerClient
from iop_fhir.exchange.subscriptions import Subscriptions
from iop_fhir.fhir.export import Exporter
from iop_fhir.fhir.repository import Repository
from iop_fhir.iop import summaries
from iop_fhir.iop.service import RecordService
from iop_fhir.mapping import load_engine
from iop_fhir.mapping.terminology import load as load_terminology
from iop_fhir.outcomes.load import Reader as OutcomeReader
from iop_fhir.privacy import trail
from iop_fhir.privacy.auditlog import AuditWriter
from iop_fhir.security.registry import ClientRegistry, KeyRing
from iop_fhir.store import leases, migrate
from iop_fhir.store.sql import SqlStore

log = logging.getLogger(__name__)

# The public base of the FHIR API of the request being served (set by the app around each request), for what a
# write hook writes when IOP_FHIR_BASE_URL is not configured. Outside a request it is None.
# How to tell the public base of the request being served (the app sets it per request; worked out only when a
# hook asks, which most requests never do).
REQUEST_BASE: ContextVar[Callable[[], str] | None] = ContextVar("iop_fhir_request_base", default=None)

# The write hooks every repository runs, in this order, in the write's transaction after each stored version.
WRITE_HOOKS = ("referral-intake", "subscriptions", "audit-trail")


class StoreUnavailable(Exception):
    """The database of IOP_FHIR_DATABASE_URL cannot be opened or migrated (the message never quotes the URL)."""


def open_store(settings: Settings) -> SqlStore:
    """The store of ``settings.database_url``, migrated to the newest schema revision when behind."""
    store = SqlStore(settings.database_url, echo=settings.sql_echo)
    try:
        if migrate.is_current(store.engine):
            store.refresh_statistics(if_missing=True)
        else:
            migrate.upgrade(store.engine)
            # SQLite's statistics know nothing of the indexes a migration added: without them its planner takes any
            # new index for a selective one (a sorted page of a million rows then reads them all).
            store.refresh_statistics()
    except SQLAlchemyError as error:
        store.close()
        # The URL may hold a password: name the failure only.
        raise StoreUnavailable(f"cannot open the database of IOP_FHIR_DATABASE_URL ({type(error).__name__})") from error
    return store


def public_base(settings: Settings) -> Callable[[], str | None]:
    """The public base of the FHIR API for references written by hooks: the configured base URL, else that of the
    request being served, else None (references stay relative)."""
    configured = settings.base_url.rstrip("/")

    def base() -> str | None:
        if configured:
            return configured
        of_request = REQUEST_BASE.get()
        return of_request() if of_request is not None else None

    return base


def repository_for(settings: Settings, store: SqlStore, *, seed: bool = False) -> Repository:
    """The repository every writer uses (the app, the worker, sync, export): profiles checked on writes, and the
    write hooks that must see every stored version wherever it was written."""
    profiles, conformance_resources = conformance.load(settings.profiles_dir, settings.terminology_dir)
    repository = Repository(
        store, default_count=settings.default_page_size, max_count=settings.max_page_size, profiles=profiles
    )
    if seed:
        conformance.seed(repository, conformance_resources)
    hooks = {
        "referral-intake": partial(
            referrals.on_resource_stored, engine=load_engine(Path(settings.mappings_dir).resolve())
        ),
        "subscriptions": Subscriptions(repository, base=public_base(settings)).on_write,
        "audit-trail": trail.write_hook(repository),
    }
    for name in WRITE_HOOKS:
        repository.add_write_hook(name, hooks[name])
    return repository


@dataclass
class Runtime:
    """The parts of one process, built from its settings on one store."""

    settings: Settings
    store: SqlStore
    repository: Repository
    _exporters: dict[str, Exporter] = field(default_factory=dict)

    @cached_property
    def records(self) -> RecordService:
        """The /iop record service: mappings loaded once, transitions queued and the PDF summary stored when a
        discharge is saved."""
        return RecordService(
            load_engine(Path(self.settings.mappings_dir).resolve()),
            self.repository,
            hooks=[transitions.on_record_saved, partial(summaries.on_record_saved, repository=self.repository)],
            extras=[partial(transitions.summary, overdue_days=self.settings.transition_overdue_days)],
            outcomes=self.outcomes,
        )

    @cached_property
    def outcomes(self) -> OutcomeReader:
        """The program's outcomes: the rules of mappings/outcomes and the stays of the records, each discharge's
        aftercare linkage from its transition's steps."""
        mappings = Path(self.settings.mappings_dir).resolve()
        terminology = load_terminology(mappings / "terminology")
        return OutcomeReader(
            self.store,
            mappings / "outcomes",
            partial(followup.timelines, store=self.store),
            partial(terminology.property_values, "medication", prop="explains"),
        )

    @cached_property
    def audit(self) -> AuditWriter:
        """The audit log's writer of this process: rows of reads are group-committed every IOP_FHIR_AUDIT_FLUSH_MS
        or IOP_FHIR_AUDIT_FLUSH_ROWS rows (privacy/auditlog.py)."""
        writer = AuditWriter(
            self.store, interval=self.settings.audit_flush_ms / 1000, batch=self.settings.audit_flush_rows
        )
        self.store.when_closing(writer.close)
        return writer

    @cached_property
    def clients(self) -> ClientRegistry:
        return ClientRegistry(self.store)

    @cached_property
    def keys(self) -> KeyRing:
        """The key that signs the service's access tokens (generated and stored on first use)."""
        return KeyRing.load(self.settings, self.store.engine)

    def exporter(self, *, background: bool = True, worker_id: str | None = None) -> Exporter:
        """The Bulk Data exporter: in the serving process a background thread runs the jobs it accepts; in the
        worker and `iop-fhir export` jobs run in the caller's thread."""
        return Exporter(self.store, self.settings, repository=self.repository, background=background, worker=worker_id)

    def partner_client(self, partner: dict[str, Any], *, session: requests.Session | None = None) -> PartnerClient:
        """The FHIR client for a partner record, with its auth and the configured timeout."""
        return partners.client_for(partner, self.settings, session=session)

    def close(self) -> None:
        self.store.close()  # the audit log's writer first commits what it holds


def build(settings: Settings, *, store: SqlStore | None = None, seed: bool = False) -> Runtime:
    """The runtime on ``store``, or on the store of the settings (opened and migrated)."""
    store = store if store is not None else open_store(settings)
    return Runtime(settings, store, repository_for(settings, store, seed=seed))


@contextmanager
def opened(settings: Settings, *, store: SqlStore | None = None, seed: bool = False) -> Iterator[Runtime]:
    """A runtime for one command; the store is closed at the end unless it was given."""
    runtime = build(settings, store=store, seed=seed)
    try:
        yield runtime
    finally:
        if store is None:
            runtime.close()


def run_worker(
    settings: Settings,
    *,
    store: SqlStore | None = None,
    once: bool = False,
    poll: float = 1.0,
    batch: int = 20,
    lease: float | None = None,
    deliver: worker.Deliver | None = None,
    worker_id: str | None = None,
    follow_every: float = 0.0,
    sync_every: float = 0.0,
) -> int:
    """`iop-fhir worker`: the outbox, export jobs, and optionally following transitions and pulling from hospital
    EHRs, on one runtime (see exchange/worker.py). Returns the exit status (0)."""
    with opened(settings, store=store) as runtime:
        name = worker_id or leases.holder_name()
        follow = None
        if follow_every > 0:

            def follow() -> int:
                return followup.follow(runtime.repository, settings, partners.client_for)

        pull = None
        if sync_every > 0:

            def pull() -> int:
                report = sync.sync_all(runtime.store, runtime.repository, settings)
                return sum(stream.stored for stream in report.streams)

        return worker.run(
            worker.Worker(
                runtime.store,
                settings,
                deliver=deliver if deliver is not None else worker.PartnerDeliverer(settings),
                lease=settings.worker_lease_seconds if lease is None else lease,
                worker_id=name,
                repository=runtime.repository,
            ),
            exports=runtime.exporter(background=False, worker_id=name),
            once=once,
            poll=poll,
            batch=batch,
            follow=follow,
            follow_every=follow_every,
            pull=pull,
            sync_every=sync_every,
        )


def run_sync(
    settings: Settings,
    *,
    partner_id: str | None = None,
    once: bool = False,
    interval: float = 300.0,
    session: requests.Session | None = None,
) -> int:
    """`iop-fhir sync`: what it stores passes through the same repository and write hooks as the API's writes."""
    with opened(settings) as runtime:
        return sync.run(
            runtime.store,
            runtime.repository,
            settings,
            partner_id=partner_id,
            once=once,
            interval=interval,
            session=session,
        )
