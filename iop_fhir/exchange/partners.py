"""The FHIR client for a partner record: the partner's base URL, its auth (auth.py) and the configured timeouts.

client.py speaks FHIR REST and classifies errors; auth.py makes the partner's credentials (and raises client.py's
DeliveryError); this module puts the two together, so that neither imports the other's caller.
"""

from __future__ import annotations

from typing import Any

import requests

from iop_fhir.config import Settings
from iop_fhir.exchange.auth import auth_for
from iop_fhir.exchange.client import PartnerClient


def client_for(
    partner: dict[str, Any], settings: Settings, *, session: requests.Session | None = None
) -> PartnerClient:
    """The client for a partner record: its base URL, its auth (secrets read from files or the environment now) and
    the configured timeout. A missing or unusable secret is a permanent DeliveryError naming the partner."""
    session = session if session is not None else requests.Session()
    auth = auth_for(partner, settings, session=session)
    return PartnerClient(partner["fhir_base_url"], session=session, auth=auth, timeout=settings.partner_timeout)
