"""The restriction a partner's client carries (42 CFR Part 2): which patients' records it may see, and the SQL
condition that decides it inside the store, for the current version of a resource (through its search index) and
for any one version (through the facts kept with it, store/base.py VersionFacts). The store applies the condition
the request carries at every stage of a query and knows nothing of Part 2 itself.

A resource belongs to every Patient it refers to through an indexed reference (a superset of the Patient
compartment), and a Patient to itself. It is visible only if every Patient it belongs to is permitted, and, when it
carries a label that needs a consent of its own (SUD counseling notes), permitted for notes too; a resource with a
protected label that belongs to no Patient is not visible at all. TERMINOLOGY.md §6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, FromClause, and_, bindparam, exists, or_, select

from iop_fhir.r4.search import is_id
from iop_fhir.store import schema

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

_REF = schema.idx_reference
_TOK = schema.idx_token
_VP = schema.version_patients


@dataclass(frozen=True)
class Restriction:
    """The patients whose records a request may see (decided by privacy/disclosure.restriction_for), and those
    whose counseling notes too."""

    patients: frozenset[str] = frozenset()
    note_patients: frozenset[str] = frozenset()

    def clause(self, row: FromClause) -> ColumnElement[bool]:
        """Whether the current resource of ``row`` (a table with res_type and res_id) may be seen."""
        patients, notes = sorted(self.patients), sorted(self.note_patients)
        own = row.c.res_type == "Patient"
        refs = select(_REF.c.res_id).where(
            _REF.c.res_type == row.c.res_type, _REF.c.res_id == row.c.res_id, _REF.c.target_type == "Patient"
        )

        def labels(pairs: frozenset[tuple[str, str]]) -> ColumnElement[bool]:
            return exists(
                select(_TOK.c.res_id).where(
                    _TOK.c.res_type == row.c.res_type,
                    _TOK.c.res_id == row.c.res_id,
                    _TOK.c.param == "_security",
                    or_(*[and_(_TOK.c.system == system, _TOK.c.code == code) for system, code in sorted(pairs)]),
                )
            )

        def all_within(allowed: list[str]) -> ColumnElement[bool]:
            itself = or_(~own, row.c.res_id.in_(_ids(allowed)))
            outside = refs.where(_REF.c.target_id.is_(None) | _REF.c.target_id.not_in(_ids(allowed)))
            return and_(itself, ~exists(outside))

        belongs = or_(
            and_(own, row.c.res_id.in_(_ids(patients))), exists(refs.where(_REF.c.target_id.in_(_ids(patients))))
        )
        return and_(
            all_within(patients),
            or_(~labels(NOTE_LABELS), all_within(notes)),
            or_(belongs, ~labels(PROTECTED_LABELS)),
        )

    def version_clause(self, row: FromClause) -> ColumnElement[bool]:
        """Whether the version of ``row`` (resource_history: res_type, res_id, version_id, protected, note) may be
        seen: the same rule on the patients and labels that version had, so that a version is shown only if the
        patients it belonged to at that version permit it (a deletion: those of the version it deleted)."""
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
