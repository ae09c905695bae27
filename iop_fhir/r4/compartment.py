"""The R4 Patient compartment (https://hl7.org/fhir/R4/compartmentdefinition-patient.html): for each resource type
in it, the reference search parameters through which a resource belongs to a Patient's compartment. Patient/$export
and Group/$export export exactly these. Loaded from the vendored ``data/compartment-patient.json``, which
``tools/vendor_r4.py`` rebuilds.
"""

from __future__ import annotations

import json
from functools import cache

from iop_fhir.r4.definitions import DATA

FILE = "compartment-patient.json"  # tools/vendor_r4.py writes it


@cache
def patient_compartment() -> dict[str, tuple[str, ...]]:
    """Resource type → the parameters that put a resource of it in a Patient's compartment (Patient itself: ``link``;
    a Patient is also in its own compartment)."""
    data = json.loads((DATA / FILE).read_text())
    return {res_type: tuple(params) for res_type, params in data["resource"].items()}
