"""FHIR R4 (4.0.1) as plain data and pure functions, the ground floor: the vendored definitions (data/), instants,
search parsing, indexing, validation, profiles and the Patient compartment. No I/O beyond reading data/, no Flask, no
store; it imports nothing of the service but ``iop_fhir.errors`` (the exception tree, itself importing nothing)."""
