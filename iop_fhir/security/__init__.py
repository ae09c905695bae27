"""Who is asking and what they may do: access tokens, the client registry and signing keys, SMART scopes, the
authorization server (/auth), the request guard; and, until a privacy package owns them, the Part 2 consent
decisions, the restriction a partner's client carries, and the audit trail (AuditEvents, accounting of disclosures)."""
