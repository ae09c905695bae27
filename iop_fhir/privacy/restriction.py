"""The restriction a partner's client carries (42 CFR Part 2): which patients' records it may see, and the SQL
condition that decides it inside the store, for the current version of a resource and for any one version, both
through the facts the store keeps with every version it saves (store/base.py VersionFacts, computed from the
version's search index by privacy/visibility.py). The store applies the condition the request carries at every
stage of a query and knows nothing of Part 2 itself.

A resource belongs to every Patient it refers to through an indexed reference (a superset of the Patient
compartment), and a Patient to itself. It is visible only if every Patient it belongs to is permitted, and, when it
carries a label that needs a consent of its own (SUD counseling notes), permitted for notes too; a resource with a
protected label that belongs to no Patient is not visible at all. TERMINOLOGY.md §6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, FromClause, and_, bindparam, exists, false, func, or_, select

from iop_fhir.r4.search import is_id
from iop_fhir.store import schema
from iop_fhir.store.base import MANY_OWNERS

_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
# meta.security labels that make a resource protected (TERMINOLOGY.md §6.2): restricted or very restricted
# confidentiality, the Part 2 policy, and the SUD sensitivities (with the legacy ETH and the counseling-note label).
PROTECTED_LABELS = frozenset(
    {
        (_CONFIDENTIALITY, "R"),
        (_CONFIDENTIALITY, "V"),
        (_ACT_CODE, "42CFRPart2"),
        (_ACT_CODE, "SUD"),
        (_ACT_CODE, "ETH"),
        (_ACT_CODE, "ETHUD"),
        (_ACT_CODE, "OPIOIDUD"),
        (_ACT_CODE, "PSYTHPN"),
    }
)
# Labels whose disclosure needs a consent that names them (SUD counseling notes, 42 CFR Part 2 as of 2024).
NOTE_LABELS = frozenset({(_ACT_CODE, "PSYTHPN")})

_VP = schema.version_patients


@dataclass(frozen=True)
class Restriction:
    """The patients whose records a request may see (decided by privacy/disclosure.restriction_for), and those
    whose counseling notes too."""

    patients: frozenset[str] = frozenset()
    note_patients: frozenset[str] = frozenset()

    def clause(self, row: FromClause) -> ColumnElement[bool]:
        """Whether the current resource of ``row`` (the resources table, or an alias of it) may be seen, decided on
        the visibility its current version was saved with (resources.owner, .protected, .note; store/schema.py): a
        resource of one Patient by that Patient's permission, one of no Patient if it carries no protected label,
        and one of several Patients on the patients its version names (version_patients)."""
        patients, notes = sorted(self.patients), sorted(self.note_patients)
        owner = row.c.owner
        mine = select(func.count()).where(
            _VP.c.res_type == row.c.res_type, _VP.c.res_id == row.c.res_id, _VP.c.version_id == row.c.version_id
        )

        def outside(allowed: list[str]) -> ColumnElement[Any]:
            # A count, not EXISTS: PostgreSQL would turn a NOT EXISTS into a hash of every version's patients.
            return mine.where(_VP.c.patient_id.is_(None) | _VP.c.patient_id.not_in(_ids(allowed))).scalar_subquery()

        return or_(
            and_(owner.in_(_ids(patients)), or_(row.c.note == false(), owner.in_(_ids(notes)))),
            and_(owner.is_(None), row.c.protected == false()),
            # Several Patients (at least one, so it belongs to the permitted ones when all of them are permitted).
            and_(owner == MANY_OWNERS, outside(patients) == 0, or_(row.c.note == false(), outside(notes) == 0)),
        )

    def version_clause(self, row: FromClause) -> ColumnElement[bool]:
        """Whether the version of ``row`` (resource_history, or resources for the current version: res_type, res_id,
        version_id, protected, note) may be seen: the same rule on the patients and labels that version had, so that
        a version is shown only if the patients it belonged to at that version permit it (a deletion: those of the
        version it deleted)."""
        patients, notes = sorted(self.patients), sorted(self.note_patients)
        refs = select(_VP.c.patient_id).where(
            _VP.c.res_type == row.c.res_type, _VP.c.res_id == row.c.res_id, _VP.c.version_id == row.c.version_id
        )

        def all_within(allowed: list[str]) -> ColumnElement[bool]:
            return ~exists(refs.where(_VP.c.patient_id.is_(None) | _VP.c.patient_id.not_in(_ids(allowed))))

        belongs = exists(refs.where(_VP.c.patient_id.in_(_ids(patients))))
        return and_(all_within(patients), or_(~row.c.note, all_within(notes)), or_(belongs, ~row.c.protected))


def _ids(values: list[str]) -> BindParameter[Any]:
    """Patient ids rendered into the statement rather than bound one by one: a partner may have more consented
    patients than SQLite takes parameters in one statement (32,766). Only FHIR ids (letters, digits, '-' and '.')
    are rendered, quoted by the dialect; anything else is bound as a parameter."""
    if all(is_id(value) for value in values):
        return bindparam(None, values, expanding=True, literal_execute=True)
    return bindparam(None, values, expanding=True)
