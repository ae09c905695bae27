"""The FHIR R4 API at /fhir: interactions, search parsing, Bundles, capability, validation, and the R4 definitions
they run on (vendored under data/)."""
