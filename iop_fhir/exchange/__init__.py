"""Exchange with partners: the FHIR client (client.py), SMART backend auth (auth.py), the client of a partner record
(partners.py), the durable outbox and its worker, Part 2 decisions on pushes, referral intake, transitions and their
follow-up, sync from hospital EHRs, subscriptions."""
