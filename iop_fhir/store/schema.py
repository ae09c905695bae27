"""The SQL schema of the store: FHIR resources (current, every version, search index), the IOP records, the inbound
referrals, the outbox, the sync cursors, the Subscription event counters, the OAuth clients and signing keys of the
service's token endpoint, the Bulk Data export jobs and their files, and the audit log.

Times are integers, microseconds since the Unix epoch (UTC), so that range comparisons are exact and identical on
SQLite and PostgreSQL. Index rows are replaced whole whenever their resource is written. Alembic migrations under
``migrations/`` create this schema; ``tests/store/test_migrations.py`` checks they agree.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    literal_column,
    or_,
    true,
)

metadata = MetaData()

TYPE = 64  # longest R4 resource type name is 37 characters
ID = 64  # https://hl7.org/fhir/R4/datatypes.html#id

resources = Table(
    "resources",
    metadata,
    Column("res_type", String(TYPE), primary_key=True),
    Column("res_id", String(ID), primary_key=True),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("content", LargeBinary, nullable=True),  # the stored JSON bytes; null once deleted
    # Part 2 visibility of the current version (store/base.py VersionFacts), as resource_history keeps it for every
    # version: the one Patient it belongs to (null: none; base.MANY_OWNERS: several, see version_patients), a
    # protected label, the counseling-note label. A partner's search decides on these columns, not on the index.
    Column("owner", String(ID), nullable=True),
    Column("protected", Boolean, nullable=False, server_default=false()),
    Column("note", Boolean, nullable=False, server_default=false()),
    Index("ix_resources_type_updated", "res_type", "last_updated"),
    # A partner's resources of a type: the rows of its permitted Patients, and those that belong to nobody.
    Index("ix_resources_owner", "res_type", "deleted", "owner", "protected", "note", "version_id"),
    # The resources of a type, live ones apart, in their default order: a search's count (Bundle.total) and an
    # unfiltered page are read from this index alone, not from the table's rows with their content.
    Index("ix_resources_live", "res_type", "deleted", "last_updated", "res_id"),
    # A resource's place in the default order by its id: a page is chosen among a search's matches from this index
    # alone (store/search_sql.py _Pager), and only the page's rows are read whole.
    Index("ix_resources_page", "res_type", "res_id", "deleted", "last_updated"),
)

history = Table(
    "resource_history",
    metadata,
    Column("res_type", String(TYPE), primary_key=True),
    Column("res_id", String(ID), primary_key=True),
    Column("version_id", Integer, primary_key=True),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),  # POST, PUT, PATCH, DELETE
    Column("content", LargeBinary, nullable=True),
    # Part 2 visibility of the version (store/base.py VersionFacts): a protected label, the counseling-note label.
    Column("protected", Boolean, nullable=False, server_default=false()),
    Column("note", Boolean, nullable=False, server_default=false()),
    Index("ix_history_updated", "last_updated"),
    Index("ix_history_type_updated", "res_type", "last_updated"),
)

# The Patients each version belongs to (VersionFacts.patients; patient_id null: a Patient reference naming no local
# id), a deletion those of the version it deleted.
version_patients = Table(
    "version_patients",
    metadata,
    Column("res_type", String(TYPE), nullable=False),
    Column("res_id", String(ID), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("patient_id", String(ID), nullable=True),
    Index("ix_version_patients_version", "res_type", "res_id", "version_id"),
)


def _index_table(
    name: str,
    *columns: Column[object],
    value_index: tuple[str, ...],
    sort: tuple[str, str],
    **index_options: Any,
) -> Table:
    """An index table. ``sort`` names the columns ``_sort`` orders by (ascending, descending); see SORT_VALUES."""
    table = Table(
        name,
        metadata,
        Column("res_type", String(TYPE), nullable=False),
        Column("res_id", String(ID), nullable=False),
        Column("param", String(100), nullable=False),
        *columns,
        # Set on one row per resource and param: the one holding the sort value (r4/indexing.py mark_sort_rows).
        Column("sort_asc", Boolean, nullable=False, server_default=false()),
        Column("sort_desc", Boolean, nullable=False, server_default=false()),
        Index(f"ix_{name}_resource", "res_type", "res_id"),
        # Covering: a filter's subquery (type, param, value -> res_id) is answered from the index alone.
        Index(f"ix_{name}_value", "res_type", "param", *value_index, "res_id", **index_options),
    )
    SORT_VALUES[name] = sort
    ascending, descending = (table.c[c] for c in sort)
    # Partial, one row per resource: a sort walks it in order (then res_id, ascending in both directions) and stops
    # after a page; the descending one is declared descending so that ties still come in ascending res_id.
    # "= true" (SQLite: "= 1"), the very term search_sql.py writes: SQLite uses a partial index only when the query
    # repeats its condition.
    for direction, value, flag in (
        ("asc", ascending, table.c.sort_asc == true()),
        ("desc", descending.desc(), table.c.sort_desc == true()),
    ):
        Index(
            f"ix_{name}_sort_{direction}",
            table.c.res_type,
            table.c.param,
            value,
            table.c.res_id,
            postgresql_where=flag,
            sqlite_where=flag,
        )
    return table


# What ``_sort`` orders each index table's resources by (ascending, descending): the lowest ascending value of the
# resource's rows for the param, or the highest descending one; the row holding it is flagged sort_asc / sort_desc.
SORT_VALUES: dict[str, tuple[str, str]] = {}

idx_token = _index_table(
    "idx_token",
    Column("system", Text, nullable=True),
    Column("code", Text, nullable=True),
    Column("text", Text, nullable=True),  # display / CodeableConcept.text, lower-cased, for :text
    value_index=("code", "system"),
    sort=("code", "code"),
)
idx_string = _index_table(
    "idx_string",
    Column("norm", Text, nullable=False),  # lower-cased, accents removed: default and :contains matching
    Column("exact", Text, nullable=False),
    value_index=("norm",),
    sort=("norm", "norm"),
    # On PostgreSQL, LIKE 'prefix%' can use a b-tree index only with pattern operators (unless the collation is C).
    postgresql_ops={"norm": "text_pattern_ops"},
)
idx_date = _index_table(
    "idx_date",
    Column("low", BigInteger, nullable=False),  # first microsecond of the value's range
    Column("high", BigInteger, nullable=False),  # last microsecond of the value's range
    value_index=("low", "high"),
    sort=("low", "high"),
)
# A date range (both a lower and an upper bound on one parameter) is found from where its rows start
# (store/search_sql.py _Query.date_range): a row at most SHORT_DATE long that ends in or after the range starts at
# most SHORT_DATE before it, so ix_idx_date_value reads the range and a week before it. Longer rows (open periods, a
# year or a month as a date) have their own partial index, and so have the rows of a resource with several values of
# the parameter, whose bounds may each hold on another row. Both conditions are written as the search writes them,
# with the constant in the SQL (SQLite uses a partial index only when the query repeats its condition).
SHORT_DATE = 7 * 24 * 3600 * 1_000_000  # a week, in microseconds


def long_date(table: Table) -> ColumnElement[bool]:
    """Whether a date index row spans more than SHORT_DATE."""
    return table.c.high - table.c.low > literal_column(str(SHORT_DATE))


def one_of_several(table: Table) -> ColumnElement[bool]:
    """Whether an index row is not the only row of its resource and param: only one row holds both sort flags."""
    return or_(table.c.sort_asc == false(), table.c.sort_desc == false())


Index(
    "ix_idx_date_long",
    idx_date.c.res_type,
    idx_date.c.param,
    idx_date.c.low,
    idx_date.c.high,
    idx_date.c.res_id,
    postgresql_where=long_date(idx_date),
    sqlite_where=long_date(idx_date),
)
Index(
    "ix_idx_date_several",
    idx_date.c.res_type,
    idx_date.c.param,
    idx_date.c.res_id,
    postgresql_where=one_of_several(idx_date),
    sqlite_where=one_of_several(idx_date),
)
idx_number = _index_table(
    "idx_number",
    Column("value", Float, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    value_index=("value",),
    sort=("value", "value"),
)
idx_quantity = _index_table(
    "idx_quantity",
    Column("value", Float, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    Column("system", Text, nullable=True),
    Column("code", Text, nullable=True),
    Column("unit", Text, nullable=True),
    value_index=("value",),
    sort=("value", "value"),
)
idx_reference = _index_table(
    "idx_reference",
    Column("target_type", String(TYPE), nullable=True),
    Column("target_id", String(ID), nullable=True),
    Column("url", Text, nullable=True),  # absolute or canonical references, kept as written
    Column("sort_value", Text, nullable=True),  # what _sort orders by: target_id, or url when there is none
    value_index=("target_id", "target_type"),
    sort=("sort_value", "sort_value"),
)
idx_uri = _index_table(
    "idx_uri",
    Column("value", Text, nullable=False),
    value_index=("value",),
    sort=("value", "value"),
)

INDEX_TABLES: dict[str, Table] = {
    "token": idx_token,
    "string": idx_string,
    "date": idx_date,
    "number": idx_number,
    "quantity": idx_quantity,
    "reference": idx_reference,
    "uri": idx_uri,
}

# One row per IOP record (/iop): the record as loaded (orjson bytes) and the FHIR resources it produced, written in
# the same transaction as those resources. Partners are records of kind "partner" whose id the client chooses.
# record_day is the day an enrollment (its admission) or a discharge is dated on (base.record_day); stay_end, on an
# enrollment's row, the day of its latest active discharge (null while the stay is open, or the day is unreadable):
# the outcomes of a period read the enrollments whose stay can overlap it by ix_iop_records_stays, not every stay.
iop_records = Table(
    "iop_records",
    metadata,
    Column("kind", String(32), primary_key=True),
    Column("id", String(ID), primary_key=True),
    Column("enrollment_id", String(ID), nullable=True),
    Column("status", String(20), nullable=False),  # active | entered-in-error
    Column("version", Integer, nullable=False),
    Column("content", LargeBinary, nullable=False),  # orjson of the record dict
    Column("resources", LargeBinary, nullable=False),  # orjson of [{"role": ..., "reference": "Type/id"}, ...]
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("record_day", String(10), nullable=True),
    Column("stay_end", String(10), nullable=True),
    Index("ix_iop_records_enrollment", "kind", "enrollment_id", "created", "id"),
    Index("ix_iop_records_created", "kind", "created", "id"),
    Index("ix_iop_records_stays", "kind", "status", "stay_end", "record_day"),
    # The key of each enrollment's records (sql.py stay_keys) read from the index alone, never from the rows.
    Index("ix_iop_records_stay_key", "enrollment_id", "kind", "version", "updated"),
)

# The enrollments each group session record names as attendees (base.attendees), whatever its status, replaced
# whenever the record is saved: a stay's group sessions are read by its enrollment, not by reading every group.
group_attendees = Table(
    "group_attendees",
    metadata,
    Column("group_id", String(ID), primary_key=True),
    Column("enrollment_id", String(ID), primary_key=True),
    Index("ix_group_attendees_enrollment", "enrollment_id", "group_id"),
)

# Inbound referrals (exchange/referrals.py): one row per referral Task received, written in the Task's transaction
# and by each staff decision. The id is the Task's. `status` is the referral's own (content.status, kept here for the
# listing by status); `record_status` is the StoredRecord status it is read with (active | entered-in-error).
inbound_referrals = Table(
    "inbound_referrals",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("status", String(20), nullable=False),  # requested | accepted | declined | no-show | admitted
    Column("record_status", String(20), nullable=False),  # active | entered-in-error
    Column("enrollment_id", String(ID), nullable=True),  # the enrollment an admission recorded
    Column("version", Integer, nullable=False),
    Column("content", LargeBinary, nullable=False),  # orjson of the referral dict
    Column("resources", LargeBinary, nullable=False),  # orjson of [{"role": ..., "reference": "Type/id"}, ...]
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Index("ix_inbound_referrals_created", "created", "id"),
    Index("ix_inbound_referrals_status", "status", "created", "id"),
)

# The durable outbox: what must reach a partner, added in the same transaction as the write that caused it, and
# delivered by `iop-fhir worker`. A claimed row's next_attempt_at is its lease expiry, so one index range
# (status, next_attempt_at) finds both due pending rows and rows whose worker died mid-delivery. Rows are never
# deleted: delivered rows are the delivery log, dead rows wait for an operator's retry.
outbox = Table(
    "outbox",
    metadata,
    Column("id", String(36), primary_key=True),  # uuid4
    Column("partner_id", String(ID), nullable=False),
    Column("record_kind", String(32), nullable=False),
    Column("record_id", String(ID), nullable=True),
    Column("kind", String(20), nullable=False),  # bundle | notification
    Column("payload", LargeBinary, nullable=False),  # orjson of {"method", "url", "body"}
    Column("status", String(20), nullable=False),  # pending | delivering | delivered | dead | blocked | superseded
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("lease_until", BigInteger, nullable=True),
    Column("leased_by", String(200), nullable=True),
    Column("last_error", LargeBinary, nullable=True),  # orjson of the error (DeliveryError.to_json() shape)
    Column("response", LargeBinary, nullable=True),  # orjson of what the partner answered (statuses, locations)
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("delivered_at", BigInteger, nullable=True),
    Index("ix_outbox_due", "status", "next_attempt_at"),
    Index("ix_outbox_partner", "partner_id", "status"),
    Index("ix_outbox_record", "record_kind", "record_id"),
)

# How far `iop-fhir sync` has read each hospital's changes: per partner, our patient and resource type, the newest
# meta.lastUpdated (as the partner wrote it) of what was stored. Written in the transaction that stored the resource.
sync_cursors = Table(
    "sync_cursors",
    metadata,
    Column("partner_id", String(ID), primary_key=True),
    Column("patient_id", String(ID), primary_key=True),
    Column("res_type", String(TYPE), primary_key=True),
    Column("last_updated", Text, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

# The number of the last event of each Subscription that numbers its notifications (Subscriptions R5 Backport
# events-since-subscription-start), incremented in the transaction of the write it notifies. Kept when the
# Subscription is deleted: one re-created under the same id counts on.
subscription_events = Table(
    "subscription_events",
    metadata,
    Column("sub_id", String(ID), primary_key=True),
    Column("events", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

# The clients allowed to get access tokens at /auth/token (SMART Backend Services): the public JWKS they sign client
# assertions with, and the most they may be granted. partner_id, purpose_of_use and admin go into every token of the
# client, never taken from its request. Clients are disabled, never deleted, so a client id is never reused.
auth_clients = Table(
    "auth_clients",
    metadata,
    Column("client_id", String(ID), primary_key=True),
    Column("name", Text, nullable=False),
    Column("jwks", Text, nullable=False),  # JSON {"keys": [...]}, public keys only
    Column("scope", Text, nullable=False),  # space-separated SMART scopes
    Column("partner_id", String(ID), nullable=True),
    Column("purpose_of_use", String(32), nullable=True),  # v3-ActReason code
    Column("admin", Boolean, nullable=False),
    # may write Consents through /fhir: the program's consent management (privacy/authority.py)
    Column("consents", Boolean, nullable=False, server_default=false()),
    Column("active", Boolean, nullable=False),
    Column("created", BigInteger, nullable=False),
)

# The keys that sign the service's access tokens when no IOP_FHIR_SIGNING_KEY_FILE is set: generated once by
# whichever process needs one first and shared by every process on the database. The newest signs; all verify.
auth_keys = Table(
    "auth_keys",
    metadata,
    Column("kid", String(ID), primary_key=True),
    Column("private_pem", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
)

# The jti of every client assertion accepted, until it expires: the unique key refuses a replay in any process.
auth_jtis = Table(
    "auth_jtis",
    metadata,
    Column("client_id", String(ID), nullable=False),
    Column("jti", String(255), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    UniqueConstraint("client_id", "jti", name="uq_auth_jtis_client_jti"),
    Index("ix_auth_jtis_expires", "expires_at"),
)

# Bulk Data $export jobs (fhir/export.py): who asked (the principal whose access the job rebuilds when it runs), what
# it asked for, where the job stands and which process holds it. A job is claimed with a lease, like an outbox row,
# so that one whose process died is taken over; `cursor` (JSON: type, last id, current file) moves in the transaction
# that stores each chunk, so a job taken over resumes where it stopped. Finished jobs are deleted once `expires` passes.
export_jobs = Table(
    "export_jobs",
    metadata,
    Column("id", String(36), primary_key=True),  # uuid4
    Column("client_id", String(ID), nullable=False),  # only this client may poll, download or delete
    Column("principal", Text, nullable=False),  # JSON: client_id, scope, partner, purpose, admin
    Column("request", Text, nullable=False),  # the kick-off URL, as the manifest's `request`
    Column("params", Text, nullable=False),  # JSON: level, group, types, since, ignored
    Column("status", String(16), nullable=False),  # queued | running | completed | failed
    Column("transaction_time", BigInteger, nullable=True),  # set when the job first runs
    Column("cursor", Text, nullable=True),
    Column("exported", BigInteger, nullable=False),  # resources written so far
    Column("error", Text, nullable=True),  # why a failed job failed (never PHI)
    Column("attempts", Integer, nullable=False),
    Column("lease_until", BigInteger, nullable=True),
    Column("leased_by", String(200), nullable=True),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("expires", BigInteger, nullable=True),
    # JSON for a partner's job: the patients (and those with counseling notes) whose consents it ran under, every
    # run's together; its files are deleted once a consent of one of them no longer permits disclosure.
    Column("consented", Text, nullable=True),
    Index("ix_export_jobs_due", "status", "lease_until"),
)

# The NDJSON an export job produced, in the database so that any process can serve any job's files: each file (one
# resource type, or OperationOutcomes of errors) is a run of chunks of whole lines, streamed in chunk order.
export_files = Table(
    "export_files",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("file_no", Integer, primary_key=True),
    Column("chunk_no", Integer, primary_key=True),
    Column("res_type", String(TYPE), nullable=False),
    Column("kind", String(8), nullable=False),  # output | error
    Column("lines", Integer, nullable=False),
    Column("content", LargeBinary, nullable=False),  # NDJSON lines, each ending with a newline
)

# The audit log (store/base.py AuditRow): one narrow row per audited event, appended in the transaction of the write it
# audits or in batches of reads (privacy/auditlog.py), never changed; rendered as AuditEvent resources on demand. The
# indexes serve its searches: by date, by patient and date (the accounting of disclosures), by client or partner.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", String(ID), primary_key=True),  # the rendered AuditEvent's id
    Column("recorded", BigInteger, nullable=False),
    Column("action", String(16), nullable=False),  # privacy/audit.py ACTIONS
    Column("outcome", String(2), nullable=False),  # 0 | 4 | 8 | 12
    Column("client_id", String(ID), nullable=False),
    Column("on_behalf_of", String(80), nullable=True),  # Organization/<partner id>
    Column("purpose", String(32), nullable=True),  # v3-ActReason code
    Column("patient", String(80), nullable=True),  # Patient/<id>
    Column("entities", Text, nullable=False),  # JSON list of "Type/id"
    Column("query", Text, nullable=True),  # a search as received
    Index("ix_audit_log_recorded", "recorded", "id"),
    Index("ix_audit_log_patient", "patient", "recorded"),
    Index("ix_audit_log_client", "client_id", "recorded"),
    Index("ix_audit_log_partner", "on_behalf_of", "recorded"),
)
