"""42 CFR Part 2 as one rule (TERMINOLOGY.md §6):

- consent.py: consent decisions over the stored FHIR Consents;
- authority.py: who may write what decides disclosure (only the program grants consents; what a partner may write);
- disclosure.py: the labels every disclosure carries, the redisclosure mark, the restriction a partner's client gets;
- restriction.py: that restriction and its SQL condition, which the store applies at every stage of every query;
- visibility.py: the facts of each stored version the condition decides on (per version, not per resource);
- pushes.py: decisions on deliveries to partners;
- trail.py, audit.py, auditlog.py, accounting.py: the audit log of requests and its AuditEvent and accounting views.

Every access path goes through the repository (fhir/repository.py), which carries the client's restriction into each
store call that returns resources: searches and their chains and include rounds, conditional matches, history,
vread and read; the store has no way to return a resource row to a restricted client without it.
"""
