"""iop-fhir: a FHIR R4 interoperability service for Intensive Outpatient Programs (ASAM level 2.1)."""

from typing import Any

__all__ = ["create_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The app factory is imported lazily so that pure modules (mapping, search, vendor) load without Flask wiring.
    if name == "create_app":
        from iop_fhir.app import create_app

        return create_app
    raise AttributeError(name)
