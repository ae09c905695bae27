"""Security: access tokens and scopes, Part 2 consent decisions, AuditEvent and Provenance."""
