"""Exchange with partners: FHIR client, SMART backend auth, durable outbox, worker, referral intake, sync,
subscriptions."""
