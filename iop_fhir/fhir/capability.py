"""The CapabilityStatement at /fhir/metadata: exactly what this server implements
(https://hl7.org/fhir/R4/capabilitystatement.html)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson

from iop_fhir import __version__
from iop_fhir.config import auth_url
from iop_fhir.fhir import auditevents
from iop_fhir.r4 import definitions, search
from iop_fhir.r4.indexing import indexed_params

# Parameter kinds the search engine implements; composite and special parameters are not offered.
SEARCHABLE_KINDS = frozenset({"token", "reference", "date", "string", "number", "quantity", "uri"})
# Resource-level parameters handled outside the index, or not at all (_text, _content, _query).
_RESULT_PARAMS = ("_count", "_sort", "_include", "_revinclude", "_summary", "_elements", "_total")
_INTERACTIONS = [
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
]
# Compartment search GET Patient/{id}/{type} (https://hl7.org/fhir/R4/compartmentdefinition-patient.html).
PATIENT_COMPARTMENT = "http://hl7.org/fhir/CompartmentDefinition/patient"
RELEASE_DATE = "2026-11-22"
# Bulk Data Access IG v2 (https://hl7.org/fhir/uv/bulkdata/export.html): $export at system, Patient and Group level.
BULK_DATA = "http://hl7.org/fhir/uv/bulkdata"
_EXPORT_OPERATIONS = {
    "Patient": f"{BULK_DATA}/OperationDefinition/patient-export",
    "Group": f"{BULK_DATA}/OperationDefinition/group-export",
}
# The program's figures as Measures (mappings/outcomes), evaluated at GET|POST Measure/{id}/$evaluate-measure.
EVALUATE_MEASURE = "http://hl7.org/fhir/OperationDefinition/Measure-evaluate-measure"
EVALUATE_MEASURE_DOCUMENTATION = (
    "The program's Measures only (iop-retention-30 and the others served at Measure). Parameters: periodStart and "
    "periodEnd (required, dates), subject (Patient/<id> or <id>: an individual report over that patient's stays), "
    "reportType (population, or subject when a subject is given; subject-list is not supported), and program (this "
    "server's extension: a code of CodeSystem iop-program, to count one program's stays). Unknown parameters are a "
    "400, ignored under Prefer: handling=lenient. Needs read access to Measure, MeasureReport, Patient, "
    "EpisodeOfCare, Encounter, Observation, CarePlan, Goal and Task. A partner's client counts only the stays of "
    "patients whose records it may read. The MeasureReport is returned, not stored; POST it to MeasureReport to "
    "keep it."
)
EXPORT_DOCUMENTATION = (
    "Kick-off by GET, or POST with a Parameters body (or no body: the query string's parameters). Parameters: "
    "_outputFormat, _type, _since, _elements (top-level elements, name or Type.name; resources tagged SUBSETTED), "
    "patient (Patient and Group level; a valueReference in a POST's Parameters, repeatable). _typeFilter is "
    "refused (400) even with Prefer: handling=lenient; includeAssociatedData is ignored under it."
)


def supported_search_params(res_type: str) -> list[definitions.SearchParam]:
    indexed = indexed_params(res_type)
    always = ("_id", "_lastUpdated")
    return [
        p
        for name, p in sorted(definitions.search_params(res_type).items())
        if name in always or (p.type in SEARCHABLE_KINDS and name in indexed)
    ]


def _resource(res_type: str) -> dict[str, Any]:
    if res_type == auditevents.AUDIT_EVENT:
        return _audit_event()
    params = supported_search_params(res_type)
    references = [p.name for p in params if p.type == "reference"]
    return {
        "type": res_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{res_type}",
        "interaction": [{"code": code} for code in _INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-supported",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "logical"],
        "searchInclude": ["*"] + [f"{res_type}:{name}" for name in references],
        "searchRevInclude": ["*"],
        "searchParam": [{"name": p.name, "definition": p.url, "type": p.type} for p in params],
        "operation": _operations(res_type),
    }


def _audit_event() -> dict[str, Any]:
    """AuditEvent is the audit log rendered (fhir/auditevents.py): read and searched by administrators, written by the
    service alone; each has one version, 1."""
    known = definitions.search_params(auditevents.AUDIT_EVENT)
    return {
        "type": auditevents.AUDIT_EVENT,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{auditevents.AUDIT_EVENT}",
        "documentation": "The audit log, for administrators: read and search only (the service writes every event, "
        "once: version 1 is its only one); sorted by date, newest first unless _sort=date; no _include or "
        "_revinclude, no type history, and not in batch or transaction entries.",
        "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "history-instance"}, {"code": "search-type"}],
        "versioning": "versioned",
        "readHistory": True,
        "updateCreate": False,
        "conditionalCreate": False,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": [
            {"name": name, "definition": known[name].url, "type": known[name].type, "documentation": documentation}
            for name, documentation in sorted(auditevents.SEARCH_PARAMS.items())
        ],
        "operation": _operations(auditevents.AUDIT_EVENT),
    }


def _operations(res_type: str) -> list[dict[str, str]]:
    operations = [{"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}]
    if res_type == "Measure":
        operations.append(
            {
                "name": "evaluate-measure",
                "definition": EVALUATE_MEASURE,
                "documentation": EVALUATE_MEASURE_DOCUMENTATION,
            }
        )
    if res_type in _EXPORT_OPERATIONS:
        operations.append(
            {"name": "export", "definition": _EXPORT_OPERATIONS[res_type], "documentation": EXPORT_DOCUMENTATION}
        )
    return operations


def _security(base_url: str) -> dict[str, Any]:
    """SMART Backend Services at this server's /auth/token (https://hl7.org/fhir/smart-app-launch/conformance.html)."""
    return {
        "extension": [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": auth_url(base_url, "token")}],
            }
        ],
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ],
        "description": "OAuth 2.0 client credentials with a signed client assertion (SMART Backend Services); "
        "discovery at .well-known/smart-configuration",
    }


@lru_cache(maxsize=16)  # keyed by base URL, which may come from the Host header: bounded
def _statement_bytes(base_url: str) -> bytes:
    statement = {
        "resourceType": "CapabilityStatement",
        "id": "iop-fhir",
        "url": f"{base_url}/metadata",
        "version": __version__,
        "name": "IopFhirServer",
        "title": "iop-fhir FHIR R4 server",
        "status": "active",
        "experimental": False,
        "date": RELEASE_DATE,
        "publisher": "iop-fhir",
        "description": "FHIR R4 API of iop-fhir, the interoperability service for Intensive Outpatient Programs.",
        "kind": "instance",
        "instantiates": [f"{BULK_DATA}/CapabilityStatement/bulk-data"],
        "software": {"name": "iop-fhir", "version": __version__},
        "implementation": {"description": "iop-fhir", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/merge-patch+json"],
        "rest": [
            {
                "mode": "server",
                "security": _security(base_url),
                "documentation": "Search result parameters: " + ", ".join(_RESULT_PARAMS) + " (_totalMethod=count "
                "as _total=accurate); chained parameters one level deep; modifiers :exact :contains :missing :not "
                ":text. Every page of a multi-page search carries Bundle.total unless _total=none, counted up to "
                f"{search.COUNT_LIMIT} matches (left out above that unless _total=accurate). Next links of "
                "searches and histories carry an opaque _cursor. POST Type?query "
                "is a conditional create (as If-None-Exist). PATCH takes a JSON Patch (application/json-patch+json) "
                "or a JSON Merge Patch (application/json or application/merge-patch+json), and conditionally "
                "(PATCH Type?query: no match 404, several 412). Compartment search: Patient/{id}/{type}.",
                "resource": [_resource(t) for t in sorted(definitions.resource_types())],
                "compartment": [PATIENT_COMPARTMENT],
                "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
                "operation": [
                    {
                        "name": "validate",
                        "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                    },
                    {
                        "name": "export",
                        "definition": f"{BULK_DATA}/OperationDefinition/export",
                        "documentation": EXPORT_DOCUMENTATION,
                    },
                ],
            }
        ],
    }
    return orjson.dumps(statement)


def capability_statement(base_url: str) -> bytes:
    return _statement_bytes(base_url)
