"""Persistence. The store owns what the service keeps and the small protocols its callers type against (base.py:
FHIR resources, IOP records, inbound referrals, the outbox, sync cursors, Subscription event counters, the audit log,
the token endpoint's clients, and their union Store/WriteTx; exports.py: Bulk Data export jobs); their SQL
implementation on SQLite and PostgreSQL (sql.py, search_sql.py, export_sql.py, audit_sql.py); the names of lease
holders (leases.py); the schema (schema.py) and the migrations that create it (migrate.py). It imports nothing of the
service but iop_fhir.r4, iop_fhir.errors and iop_fhir.config."""
