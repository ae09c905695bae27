"""Builds what goes to a partner: a transaction Bundle in which every entry is a conditional update on the
resource's business identifier, so a delivery replayed any number of times leaves one copy at the receiver.

https://hl7.org/fhir/R4/http.html#cond-update, https://hl7.org/fhir/R4/bundle.html#references
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from iop_fhir.mapping import ids
from iop_fhir.privacy.disclosure import REDISCLOSURE_NOTICE, redisclosure_mark

__all__ = ["REDISCLOSURE_NOTICE", "business_identifier", "conditional_url", "transaction"]

NPI = "http://hl7.org/fhir/sid/us-npi"
PARTNER_SYSTEM = f"{ids.CANONICAL}/sid/partner"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def business_identifier(resource: dict[str, Any]) -> tuple[str, str] | None:
    """The identifier a receiver can match the resource by: ours first, then an NPI, then a partner id."""
    identifiers = [i for i in resource.get("identifier", []) if isinstance(i, dict) and i.get("value")]
    for system in (ids.RECORD_SYSTEM, NPI, PARTNER_SYSTEM):
        for identifier in identifiers:
            if identifier.get("system") == system:
                return system, str(identifier["value"])
    return None


def conditional_url(resource: dict[str, Any]) -> str:
    found = business_identifier(resource)
    res_type = resource["resourceType"]
    if found is None:
        return f"{res_type}/{resource['id']}"
    system, value = found
    return f"{res_type}?identifier={quote(system, safe=':/')}|{quote(value, safe='/.-')}"


def transaction(resources: Iterable[dict[str, Any]], *, labels: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A transaction Bundle of conditional updates; references between the resources become urn:uuid fullUrls,
    server-assigned meta (versionId, lastUpdated) is dropped, and the Bundle carries the Part 2 labels and the
    redisclosure notice."""
    resources = list(resources)
    urns = {f"{r['resourceType']}/{r['id']}": urn for r in resources if (urn := _urn(r)) is not None}
    entries = []
    for resource in resources:
        body = _rewrite(copy.deepcopy(resource), urns)
        meta = {k: v for k, v in body.get("meta", {}).items() if k not in ("versionId", "lastUpdated", "source")}
        reference = f"{resource['resourceType']}/{resource['id']}"
        url = conditional_url(resource)
        if url != reference:
            body.pop("id", None)  # the receiver names it; we find it again by identifier
        if meta:
            body["meta"] = meta
        else:
            body.pop("meta", None)
        entries.append(
            {
                "fullUrl": urns.get(reference, reference),
                "resource": body,
                "request": {"method": "PUT", "url": url},
            }
        )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    bundle["meta"] = {"security": [*(labels or []), redisclosure_mark()]}
    return bundle


def _rewrite(value: Any, urns: dict[str, str]) -> Any:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                base = item.split("/_history/")[0]
                if base in urns:
                    value[key] = urns[base]
            else:
                _rewrite(item, urns)
    elif isinstance(value, list):
        for item in value:
            _rewrite(item, urns)
    return value


def _urn(resource: dict[str, Any]) -> str | None:
    """The entry's urn:uuid fullUrl: its id when that is a UUID; for another id (a partner's or the program's
    Organization, named by its own id) that the receiver does not keep, one derived from it, so references to it
    within the Bundle still resolve. None for a resource sent to its own id."""
    res_type, res_id = resource["resourceType"], resource["id"]
    if _is_uuid(res_id):
        return f"urn:uuid:{res_id}"
    if conditional_url(resource) == f"{res_type}/{res_id}":
        return None
    return f"urn:uuid:{uuid.uuid5(ids.NAMESPACE, f'{res_type}/{res_id}')}"


def _is_uuid(value: str) -> bool:
    return len(value) == 36 and value.count("-") == 4
