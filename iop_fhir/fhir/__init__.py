"""The FHIR R4 API at /fhir: the repository (every interaction), views, Bundles (batch, transaction, searchset),
history, capability and Bulk Data export. The R4 machinery it runs on is in ``iop_fhir.r4``."""
