"""42 CFR Part 2 as one rule: the labels every record carries (disclosure.py), consent decisions (consent.py), the
restriction a partner's client carries (disclosure.restriction_for), decisions on pushes to partners (pushes.py), the
audit trail of requests (trail.py, audit.py) and the accounting of disclosures (accounting.py). TERMINOLOGY.md §6."""
