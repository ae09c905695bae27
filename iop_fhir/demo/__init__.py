"""`iop-fhir demo`: a realistic synthetic program (partners, referrals, patients and their stays) seeded through the
service's own API. cohort.py draws the program as plain data; seeding.py sends it and sums up what the store holds."""

from iop_fhir.demo.seeding import DemoError, DemoSummary, seed

__all__ = ["DemoError", "DemoSummary", "seed"]
