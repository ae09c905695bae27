"""The IOP record schemas, one per kind, and load(): a payload validated as it is, or Invalid listing every problem.

Only the shape of a record is checked here: JSON types, formats, ranges and rules between fields. Codes are plain
strings; whether a code is allowed depends on the terminology and is checked by the mapping. Loading changes
nothing: the loaded record has the payload's own names and values (dates stay strings), no field added or dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from iop_fhir.errors import Invalid, Issue
from iop_fhir.r4 import validation
from iop_fhir.r4.validation import CONTROL_RE

# Kind names (as the service takes them) and the collection names of /iop URLs.
KINDS: tuple[str, ...] = (
    "enrollment",
    "assessment",
    "treatment-plan",
    "session",
    "group-session",
    "consent",
    "discharge",
    "medication",
    "partner",
)
PLURALS: dict[str, str] = {kind: f"{kind}s" for kind in KINDS}
# Kinds of which the service keeps one record, read and written at /iop/<kind> (the program's own Organization).
SINGLETONS: tuple[str, ...] = ("organization",)
KIND_OF_PLURAL: dict[str, str] = {plural: kind for kind, plural in PLURALS.items()}

ASAM_DIMENSIONS = (
    "withdrawal",
    "biomedical",
    "emotional_behavioral",
    "readiness_to_change",
    "relapse_potential",
    "recovery_environment",
)
PARTNER_KINDS = ("hospital-ehr", "inpatient-unit", "aftercare-provider")
AUTH_TYPES = ("none", "bearer", "smart-backend-services")
# UCUM units a measured drug screen result may carry (each is its own UCUM code).
SCREEN_UNITS = ("g/dL", "mg/dL", "g/L", "mg/L", "ug/L", "ng/mL", "ug/mL")
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
MAX_ISSUES = 100
FHIR_INTEGER_MIN, FHIR_INTEGER_MAX = -(2**31), 2**31 - 1  # https://hl7.org/fhir/R4/datatypes.html#integer

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
DATE_ONLY = _DATE
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})?")
_PHONE = re.compile(r"\+?[0-9][0-9 ()\-.]{5,30}[0-9]")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+")


# --- Problems: marshmallow messages that carry the OperationOutcome issue code


class Problem(str):
    """An error message with its issue code (required, structure, value, invariant). Plain-string messages, such as
    those of marshmallow's validators, are value problems."""

    code: str

    def __new__(cls, code: str, text: str) -> Problem:
        problem = super().__new__(cls, text)
        problem.code = code
        return problem


def _error(code: str, text: str) -> ValidationError:
    return ValidationError(Problem(code, text))


def json_type(value: Any) -> str:
    return validation.json_type(value, article=False)


def _wrong_type(expected: str, value: Any) -> ValidationError:
    return _error("structure", f"must be {expected}, got {json_type(value)}")


def npi_check_digit_is_valid(npi: str) -> bool:
    """Luhn over the card issuer prefix 80840 and the first nine digits (https://www.cms.gov/Regulations-and-Guidance/
    Administrative-Simplification/NationalProvIdentStand/Downloads/NPIcheckdigit.pdf)."""
    total = 0
    for position, digit in enumerate(reversed("80840" + npi[:9])):
        value = int(digit)
        if position % 2 == 0:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return (10 - total % 10) % 10 == int(npi[9])


# --- Fields: the JSON value returned as it is, after checks of type and format


class _Strict:
    """Marshmallow's own errors (a missing required field, a null) with their issue codes."""

    def make_error(self, key: str, **kwargs: Any) -> ValidationError:
        if key == "required":
            return _error("required", "required field is missing")
        if key == "null":
            return _error("structure", "must not be null")
        return _error("structure", f"is not valid ({key})")


class Text(_Strict, fields.String):
    """A JSON string with some non-blank content (FHIR strings may not be empty)."""

    openapi: ClassVar[dict[str, str]] = {}  # OpenAPI properties of the format (pattern, format)

    def __init__(self, *, metadata: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(metadata={**self.openapi, **(metadata or {})}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise _wrong_type("a string", value)
        if not value.strip():
            raise _error("value", "must not be empty")
        control = CONTROL_RE.search(value)
        if control is not None:
            # Refused here, naming the field: the FHIR resource the value lands in would refuse it at its own path.
            raise _error(
                "value",
                f"must not contain control characters (below U+0020, other than tab, CR and LF); "
                f"found U+{ord(control.group()):04X} at position {control.start()}",
            )
        self._check(value)
        return value

    def _check(self, value: str) -> None:
        """Format checks of subclasses."""


class Code(Text):
    """A code; which codes are allowed is the terminology's business, not the schema's."""

    def _check(self, value: str) -> None:
        if value != value.strip():
            raise _error("value", f"must not start or end with whitespace, got {value!r}")


class FhirId(Text):
    """An id that is also a FHIR id ([A-Za-z0-9-.]{1,64}), as record, enrollment and partner ids are."""

    openapi = {"pattern": r"^[A-Za-z0-9\-.]{1,64}$"}

    def _check(self, value: str) -> None:
        if not FHIR_ID.fullmatch(value):
            raise _error("value", f"must be 1 to 64 letters, digits, '-' or '.', got {value[:80]!r}")


class Npi(Text):
    """A US National Provider Identifier: ten digits, the last a Luhn check digit."""

    openapi = {"pattern": r"^[0-9]{10}$", "description": "NPI (ten digits)"}

    def _check(self, value: str) -> None:
        if not re.fullmatch(r"[0-9]{10}", value):
            raise _error("value", f"must be an NPI of ten digits, got {value[:20]!r}")
        if not npi_check_digit_is_valid(value):
            raise _error("value", f"NPI {value} has a wrong check digit")


class Phone(Text):
    def _check(self, value: str) -> None:
        if not _PHONE.fullmatch(value) or sum(c.isdigit() for c in value) < 7:
            raise _error("value", "must be a phone number such as +1-973-555-0142")


class Email(Text):
    openapi = {"format": "email"}

    def _check(self, value: str) -> None:
        if not _EMAIL.fullmatch(value):
            raise _error("value", "must be an email address such as name@example.org")


class Uri(Text):
    """An absolute URI of any scheme, such as an identifier system (urn:oid:..., https://...)."""

    openapi = {"format": "uri"}

    def _check(self, value: str) -> None:
        if not _URI.fullmatch(value):
            raise _error("value", f"must be an absolute URI such as urn:oid:1.2.3 or https://..., got {value[:80]!r}")


class HttpUrl(Text):
    openapi = {"format": "uri"}

    def _check(self, value: str) -> None:
        try:
            parts = urlsplit(value)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and not re.search(r"\s", value)
        except ValueError:
            valid = False
        if not valid:
            raise _error("value", f"must be an http or https URL, got {value[:80]!r}")


class Date(Text):
    """A calendar date YYYY-MM-DD, kept as the string sent."""

    openapi = {"format": "date"}

    def _check(self, value: str) -> None:
        if not _DATE.fullmatch(value):
            raise _error("value", f"must be a date YYYY-MM-DD, got {value[:40]!r}")
        try:
            date.fromisoformat(value)
        except ValueError:
            raise _error("value", f"is not a calendar date: {value!r}") from None


class DateTime(Text):
    """A date and time with seconds and a timezone offset, kept as the string sent."""

    openapi = {"format": "date-time"}

    def _check(self, value: str) -> None:
        match = _DATE_TIME.fullmatch(value)
        if not match:
            raise _error("value", f"must be a date-time such as 2026-01-07T18:00:00-05:00, got {value[:40]!r}")
        if match.group(2) is None:
            raise _error(
                "value",
                f"must include a timezone offset such as -05:00 or Z, got {value!r}: "
                "a clinical time without zone is ambiguous",
            )
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise _error("value", f"is not a valid date-time: {value!r}") from None


class Integer(_Strict, fields.Integer):
    """A JSON integer within the range of a FHIR integer (32 bits), which is where it ends up."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float):
                raise _error("structure", f"must be an integer, got {value}")
            raise _wrong_type("an integer", value)
        if not FHIR_INTEGER_MIN <= value <= FHIR_INTEGER_MAX:
            raise _error("value", f"must be between {FHIR_INTEGER_MIN} and {FHIR_INTEGER_MAX}, got {value}")
        return value


class Number(_Strict, fields.Float):
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong_type("a number", value)
        return value


class Boolean(_Strict, fields.Boolean):
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise _wrong_type("true or false", value)
        return value


class Object(_Strict, fields.Nested):
    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, partial: Any = None, **kwargs: Any
    ) -> Any:
        if not isinstance(value, dict):
            raise _wrong_type("a JSON object", value)
        return super()._deserialize(value, attr, data, partial=partial, **kwargs)


class Array(_Strict, fields.List):  # type: ignore[type-arg]
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> Any:
        if not isinstance(value, list):
            raise _wrong_type("a JSON array", value)
        return super()._deserialize(value, attr, data, **kwargs)


def _between(low: float, high: float) -> validate.Range:
    return validate.Range(min=low, max=high, error="must be between {min} and {max}, got {input}")


def _at_least(low: float) -> validate.Range:
    return validate.Range(min=low, error="must be at least {min}, got {input}")


_POSITIVE = validate.Range(min=0, min_inclusive=False, error="must be greater than 0, got {input}")
_NOT_EMPTY = validate.Length(min=1, error="must not be empty")


def _one_of(choices: tuple[str, ...]) -> validate.OneOf:
    return validate.OneOf(choices, error="must be one of: {choices}; got {input!r}")


def _list(inner: fields.Field[Any], **kwargs: Any) -> Array:
    """A JSON array, non-empty when given (an empty list says nothing a missing one does not)."""
    return Array(inner, validate=_NOT_EMPTY, **kwargs)


def _objects(schema: type[Schema], **kwargs: Any) -> Array:
    return _list(Object(schema), **kwargs)


# --- Schemas


class RecordSchema(Schema):
    """Base of every record schema: unknown fields are rejected, naming the allowed ones."""

    class Meta:
        unknown = RAISE

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        allowed = ", ".join(sorted(f.data_key or name for name, f in self.load_fields.items()))
        self.error_messages = {
            **self.error_messages,
            "unknown": Problem("structure", f"unknown field; allowed fields: {allowed}"),
            "type": Problem("structure", "must be a JSON object"),
        }


def _invariants(problems: dict[Any, Any]) -> None:
    """Raise the cross-field problems gathered as {field: message} or {field: {index: {field: message}}}."""
    if problems:
        raise ValidationError(problems)


def _merge(problems: dict[Any, Any], path: tuple[Any, ...], text: str) -> None:
    node = problems
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node.setdefault(path[-1], []).append(Problem("invariant", text))


def _items(data: Mapping[str, Any], key: str) -> list[Any]:
    """The list under ``key`` of loaded data: schema validators run after field errors too, so it may be absent."""
    value = data.get(key)
    return value if isinstance(value, list) else []


def _duplicates(items: list[Any], key: str, what: str, problems: dict[Any, Any], path: tuple[Any, ...]) -> None:
    seen: set[Any] = set()
    for index, item in enumerate(items):
        value = item.get(key) if isinstance(item, dict) else None
        if value is None:
            continue
        if value in seen:
            _merge(problems, (*path, index, key), f"{what} {value!r} appears more than once")
        seen.add(value)


def _not_before(data: Mapping[str, Any], earlier: str, later: str, parse: Any) -> None:
    if data.get(earlier) is not None and data.get(later) is not None:
        if parse(data[later]) < parse(data[earlier]):
            _invariants({later: [Problem("invariant", f"must not be before {earlier} ({data[earlier]})")]})


def _not_in_future(data: Mapping[str, Any], name: str) -> None:
    # A revocation is a fact the program was told of: it cannot be recorded ahead of time.
    if data.get(name) is not None and date.fromisoformat(data[name]) > date.today():
        _invariants({name: [Problem("invariant", f"must not be in the future (today is {date.today()})")]})


class ClinicianSchema(RecordSchema):
    name = Text(required=True)
    npi = Npi(required=True)


class PatientIdentifierSchema(RecordSchema):
    system = Uri(required=True)
    value = Text(required=True)
    assigner = Text()


class PatientNameSchema(RecordSchema):
    given = _list(Text())
    family = Text(required=True)


class AddressSchema(RecordSchema):
    line = _list(Text())
    city = Text()
    state = Text()
    postal_code = Text()
    country = Text()


class PatientSchema(RecordSchema):
    identifiers = _objects(PatientIdentifierSchema, required=True)
    name = Object(PatientNameSchema, required=True)
    birth_date = Date(required=True)
    gender = Code(required=True)
    race = _list(Code(), metadata={"description": "OMB race categories (vocabulary race); several may apply"})
    ethnicity = Code(metadata={"description": "OMB ethnicity category (vocabulary ethnicity)"})
    preferred_language = Code(metadata={"description": "BCP-47 tag of the language preferred (vocabulary language)"})
    phone = Phone()
    email = Email()
    address = Object(AddressSchema)


class ReferralInSchema(RecordSchema):
    source = Code(required=True)
    organization = Text()
    service_request = HttpUrl(metadata={"description": "URL of the referring ServiceRequest"})


class DiagnosisSchema(RecordSchema):
    system = Code(required=True)
    code = Code(required=True)
    display = Text()
    role = Code()


class SupportContactSchema(RecordSchema):
    relationship = Code(required=True)
    name = Text(required=True)
    phone = Phone()
    family_sessions = Boolean()


class CandidacySchema(RecordSchema):
    stable_housing = Boolean()
    manages_own_medications = Boolean()
    has_transportation = Boolean()
    needs_24h_supervision = Boolean()
    needs_medical_detox = Boolean()

    @validates_schema(skip_on_field_errors=True)
    def _answers_something(self, data: dict[str, Any], **kwargs: Any) -> None:
        # The candidacy Observation holds one component per answer: with none it would say nothing.
        if all(value is None for value in data.values()):
            names = ", ".join(self.fields)
            raise ValidationError(f"answer at least one of {names}, or leave candidacy out")


class EnrollmentSchema(RecordSchema):
    patient = Object(PatientSchema, required=True)
    program = Code(required=True)
    level_of_care = Code(required=True)
    admission_date = Date(required=True)
    referral = Object(ReferralInSchema)
    diagnoses = _objects(DiagnosisSchema)
    support_contacts = _objects(SupportContactSchema)
    candidacy = Object(CandidacySchema)


class InstrumentSchema(RecordSchema):
    # Item counts, item ranges, totals and their sum depend on the instrument: mapping/rules.py checks them.
    instrument = Code(required=True)
    items = _list(Integer(validate=_at_least(0)))
    total_score = Integer(validate=_at_least(0), metadata={"description": "computed from items when not given"})


class AsamDimensionsSchema(RecordSchema):
    withdrawal = Integer(required=True, validate=_between(0, 4))
    biomedical = Integer(required=True, validate=_between(0, 4))
    emotional_behavioral = Integer(required=True, validate=_between(0, 4))
    readiness_to_change = Integer(required=True, validate=_between(0, 4))
    relapse_potential = Integer(required=True, validate=_between(0, 4))
    recovery_environment = Integer(required=True, validate=_between(0, 4))


class SubstanceUseSchema(RecordSchema):
    substance = Code(required=True)
    frequency = Code()
    last_use = Date()
    route = Code()


class AssessmentSchema(RecordSchema):
    enrollment_id = FhirId(required=True)
    kind = Code(required=True)
    performed_at = DateTime(required=True)
    clinician = Object(ClinicianSchema)
    instruments = _objects(InstrumentSchema)
    asam_dimensions = Object(AsamDimensionsSchema)
    substance_use = _objects(SubstanceUseSchema)
    triggers = _list(Text())
    recommended_level_of_care = Code()
    notes = Text()


class PlanPeriodSchema(RecordSchema):
    start = Date(required=True)
    end = Date()

    @validates_schema(skip_on_field_errors=False)
    def _end_not_before_start(self, data: dict[str, Any], **kwargs: Any) -> None:
        _not_before(data, "start", "end", date.fromisoformat)


class GoalSchema(RecordSchema):
    # Unique keys and known references are checked with the plan's other rules (mapping/rules.py).
    key = Code(required=True, metadata={"description": "names the goal within the plan (interventions[].goals)"})
    description = Text(required=True)
    measure = Code()
    target = Number(validate=_at_least(0))
    due = Date()


class InterventionSchema(RecordSchema):
    service = Code(required=True)
    approach = Code()
    topic = Text()
    specimen = Code()
    frequency = Integer(required=True, validate=_at_least(1))
    period = Number(required=True, validate=_POSITIVE)
    period_unit = Code(required=True)
    minutes = Integer(validate=_between(1, 600))
    goals = _list(Code())
    participants = _list(Code())


class CareTeamMemberSchema(RecordSchema):
    role = Code(required=True)
    name = Text(required=True)
    npi = Npi(required=True)


class TreatmentPlanSchema(RecordSchema):
    enrollment_id = FhirId(required=True)
    status = Code(required=True)
    period = Object(PlanPeriodSchema, required=True)
    goals = _objects(GoalSchema)
    interventions = _objects(InterventionSchema, required=True)
    care_team = _objects(CareTeamMemberSchema)


class ScreenResultSchema(RecordSchema):
    analyte = Code(required=True)
    result = Code(required=True)
    value = Number(
        validate=_at_least(0),
        metadata={"description": "the measured concentration (breath or blood alcohol), with unit; optional"},
    )
    unit = Code(validate=_one_of(SCREEN_UNITS), metadata={"description": "the UCUM unit of value; required with value"})

    @validates_schema(skip_on_field_errors=False)
    def _value_with_unit(self, data: dict[str, Any], **kwargs: Any) -> None:
        if (data.get("value") is None) != (data.get("unit") is None):
            missing = "unit" if data.get("unit") is None else "value"
            other = "value" if missing == "unit" else "unit"
            _invariants({missing: [Problem("required", f"required when {other} is given")]})


class DrugScreenSchema(RecordSchema):
    specimen = Code(required=True)
    collected_at = DateTime(required=True)
    results = _objects(ScreenResultSchema, required=True)

    @validates_schema(skip_on_field_errors=False)
    def _one_result_per_analyte(self, data: dict[str, Any], **kwargs: Any) -> None:
        problems: dict[Any, Any] = {}
        _duplicates(_items(data, "results"), "analyte", "analyte", problems, ("results",))
        _invariants(problems)


class SessionSchema(RecordSchema):
    enrollment_id = FhirId(required=True)
    service = Code(required=True)
    approach = Code()
    topic = Text()
    start = DateTime(required=True)
    end = DateTime(required=True)
    modality = Code(required=True)
    attendance = Code(required=True)
    facilitator = Object(ClinicianSchema)
    craving_score = Integer(validate=_between(0, 10))
    drug_screen = Object(DrugScreenSchema)
    progress_note = Text()

    @validates_schema(skip_on_field_errors=False)
    def _end_not_before_start(self, data: dict[str, Any], **kwargs: Any) -> None:
        _not_before(data, "start", "end", datetime.fromisoformat)


class GroupAttendeeSchema(RecordSchema):
    """One patient's part of a group session: what a session record says of its patient."""

    enrollment_id = FhirId(required=True)
    attendance = Code(required=True)
    craving_score = Integer(validate=_between(0, 10))
    drug_screen = Object(DrugScreenSchema)
    progress_note = Text()


class GroupSessionSchema(RecordSchema):
    """One group event and its attendees; each attendee's enrollment must exist and be active, once each (422)."""

    group_id = FhirId(required=True, metadata={"description": "the program's id of the group event; the record's id"})
    service = Code(required=True)
    approach = Code()
    topic = Text()
    start = DateTime(required=True)
    end = DateTime(required=True)
    modality = Code(required=True)
    facilitator = Object(ClinicianSchema)
    attendees = _objects(GroupAttendeeSchema, required=True)

    @validates_schema(skip_on_field_errors=False)
    def _end_not_before_start(self, data: dict[str, Any], **kwargs: Any) -> None:
        _not_before(data, "start", "end", datetime.fromisoformat)


class ConsentSchema(RecordSchema):
    enrollment_id = FhirId(required=True)
    recipient = FhirId(required=True, metadata={"description": "id of the partner the records may be disclosed to"})
    purposes = _list(Code(), required=True)
    scope = Code(required=True)
    signed_on = Date(required=True)
    expires_on = Date()
    revoked_on = Date(
        metadata={
            "description": "the day the patient revoked the consent in writing (42 CFR §2.31(a)(4)); once set it "
            "stays: POST /iop/consents/{id}/revoke sets it, and the FHIR Consent becomes inactive"
        }
    )

    @validates_schema(skip_on_field_errors=False)
    def _dates_in_order(self, data: dict[str, Any], **kwargs: Any) -> None:
        _not_before(data, "signed_on", "expires_on", date.fromisoformat)
        _not_before(data, "signed_on", "revoked_on", date.fromisoformat)
        _not_in_future(data, "revoked_on")


class RevocationSchema(RecordSchema):
    revoked_on = Date(required=True, metadata={"description": "the day the patient revoked the consent"})

    @validates_schema(skip_on_field_errors=False)
    def _not_in_future(self, data: dict[str, Any], **kwargs: Any) -> None:
        _not_in_future(data, "revoked_on")


class GoalOutcomeSchema(RecordSchema):
    goal = Code(required=True, metadata={"description": "key of a goal of the treatment plan"})
    status = Code(required=True)


class DiagnosisStatusSchema(RecordSchema):
    code = Code(required=True, metadata={"description": "code of a diagnosis of the enrollment"})
    clinical_status = Code(required=True, metadata={"description": "at discharge (vocabulary clinical-status)"})


class ContinuingCareServiceSchema(RecordSchema):
    service = Code(required=True)
    name = Text()
    frequency = Integer(required=True, validate=_at_least(1))
    period = Number(required=True, validate=_POSITIVE)
    period_unit = Code(required=True)


class EmergencyContactSchema(RecordSchema):
    name = Text(required=True)
    relationship = Code()
    phone = Phone(required=True)


class RelapsePreventionPlanSchema(RecordSchema):
    triggers = _list(Text())
    warning_signs = _list(Text())
    coping_strategies = _list(Text())
    emergency_contacts = _objects(EmergencyContactSchema)


class ContinuingCareSchema(RecordSchema):
    level_of_care = Code()
    services = _objects(ContinuingCareServiceSchema)
    relapse_prevention_plan = Object(RelapsePreventionPlanSchema)


class ReferralOutSchema(RecordSchema):
    partner = FhirId(required=True, metadata={"description": "id of the partner the patient is referred to"})
    service = Code(required=True)
    reason = Text()
    priority = Code()


class DischargeSchema(RecordSchema):
    enrollment_id = FhirId(required=True)
    discharge_date = Date(required=True)
    reason = Code(required=True)
    summary = Text()
    goal_outcomes = _objects(GoalOutcomeSchema)
    diagnoses = _objects(DiagnosisStatusSchema)
    continuing_care = Object(ContinuingCareSchema)
    referral = Object(ReferralOutSchema)

    @validates_schema(skip_on_field_errors=False)
    def _one_outcome_per_goal(self, data: dict[str, Any], **kwargs: Any) -> None:
        problems: dict[Any, Any] = {}
        _duplicates(_items(data, "goal_outcomes"), "goal", "goal", problems, ("goal_outcomes",))
        _duplicates(_items(data, "diagnoses"), "code", "diagnosis", problems, ("diagnoses",))
        _invariants(problems)


class DoseSchema(RecordSchema):
    quantity = Number(required=True, validate=_POSITIVE)
    unit = Text(required=True, metadata={"description": "the dose unit as written: film, tablet, mg, mL, spray"})
    frequency = Integer(required=True, validate=_at_least(1))
    period = Number(required=True, validate=_POSITIVE)
    period_unit = Code(required=True)


class IndicationSchema(RecordSchema):
    system = Code(required=True)
    code = Code(required=True)
    display = Text()


class MedicationSchema(RecordSchema):
    """A medication of an enrolled patient; source decides the FHIR resource (mappings/medication.yaml)."""

    enrollment_id = FhirId(required=True)
    medication = Code(required=True)
    strength = Text(metadata={"description": "as written on the label, e.g. 8 mg / 2 mg"})
    form = Code()
    dose = Object(DoseSchema)
    indication = Object(IndicationSchema)
    category = Code(required=True)
    status = Code(required=True)
    start = Date(required=True)
    end = Date()
    prescriber = Object(ClinicianSchema)
    source = Code(required=True)
    quantity = Integer(validate=_at_least(1), metadata={"description": "units handed over (a dispense)"})
    note = Text()

    @validates_schema(skip_on_field_errors=False)
    def _end_not_before_start(self, data: dict[str, Any], **kwargs: Any) -> None:
        _not_before(data, "start", "end", date.fromisoformat)


# Which auth fields each auth type needs; the others must be absent.
AUTH_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "bearer": ("token_file",),
    "smart-backend-services": ("token_url", "client_id", "private_key_file"),
}
_OPTIONAL_AUTH_FIELDS: dict[str, tuple[str, ...]] = {"smart-backend-services": ("key_id", "scope")}


class PartnerAuthSchema(RecordSchema):
    type = Code(required=True, validate=_one_of(AUTH_TYPES))
    token_file = Text(metadata={"description": "bearer: file holding the token (the token itself is never stored)"})
    token_url = HttpUrl()
    client_id = Text()
    private_key_file = Text()
    key_id = Text()
    scope = Text()

    @validates_schema(skip_on_field_errors=False)
    def _fields_of_the_auth_type(self, data: dict[str, Any], **kwargs: Any) -> None:
        auth_type = data.get("type")
        if auth_type not in AUTH_FIELDS:
            return
        needed = AUTH_FIELDS[auth_type]
        allowed = {"type", *needed, *_OPTIONAL_AUTH_FIELDS.get(auth_type, ())}
        problems: dict[str, list[Problem]] = {}
        for name in needed:
            if name not in data:
                problems[name] = [Problem("required", f"required when type is {auth_type}")]
        for name in data:
            if name not in allowed:
                problems[name] = [Problem("invariant", f"not used when type is {auth_type}")]
        _invariants(problems)


class PartnerSchema(RecordSchema):
    id = FhirId(required=True, metadata={"description": "chosen by the client; also the Organization's id"})
    kind = Code(required=True, validate=_one_of(PARTNER_KINDS))
    name = Text(required=True)
    active = Boolean()
    npi = Npi()
    fhir_base_url = HttpUrl(required=True)
    auth = Object(PartnerAuthSchema)


class TaxId(Text):
    """A US Employer Identification Number (federal tax id): nine digits, written NN-NNNNNNN or without the dash."""

    openapi = {"pattern": r"^[0-9]{2}-?[0-9]{7}$", "description": "EIN (nine digits, NN-NNNNNNN)"}

    def _check(self, value: str) -> None:
        if not re.fullmatch(r"[0-9]{2}-?[0-9]{7}", value):
            raise _error("value", f"must be an EIN of nine digits such as 12-3456789, got {value[:20]!r}")


class OrganizationSchema(RecordSchema):
    """The program itself (one per service): the Organization its records name as provider, requester and the
    disclosing program of its consents."""

    id = FhirId(required=True, metadata={"description": "chosen by the client; also the Organization's id"})
    name = Text(required=True)
    npi = Npi()
    tax_id = TaxId()
    address = Object(AddressSchema)
    phone = Phone()
    programs = _list(Code(), metadata={"description": "the programs it runs (vocabulary program)"})
    part2_program = Boolean(metadata={"description": "whether it is a federally assisted 42 CFR Part 2 program"})

    @validates_schema(skip_on_field_errors=False)
    def _programs_once(self, data: dict[str, Any], **kwargs: Any) -> None:
        problems: dict[Any, Any] = {}
        seen: set[Any] = set()
        for index, program in enumerate(_items(data, "programs")):
            if program in seen:
                _merge(problems, ("programs", index), f"program {program!r} appears more than once")
            seen.add(program)
        _invariants(problems)


class RetractionSchema(RecordSchema):
    reason = Text()


SCHEMAS: dict[str, type[RecordSchema]] = {
    "enrollment": EnrollmentSchema,
    "assessment": AssessmentSchema,
    "treatment-plan": TreatmentPlanSchema,
    "session": SessionSchema,
    "group-session": GroupSessionSchema,
    "consent": ConsentSchema,
    "discharge": DischargeSchema,
    "medication": MedicationSchema,
    "partner": PartnerSchema,
    "organization": OrganizationSchema,
}
_INSTANCES: dict[str, RecordSchema] = {kind: schema() for kind, schema in SCHEMAS.items()}
_RETRACTION = RetractionSchema()
_REVOCATION = RevocationSchema()


# --- Loading


def load(kind: str, payload: Any) -> dict[str, Any]:
    """The record of ``kind`` in ``payload``, unchanged; Invalid with one issue per problem if it is not valid."""
    schema = _INSTANCES.get(kind)
    if schema is None:
        raise ValueError(f"unknown record kind {kind!r}")  # the views only pass known kinds
    return _load(schema, payload, f"a {kind} record")


def load_retraction(payload: Any) -> str | None:
    """The reason of a retraction body ({"reason": ...}), or None for none."""
    if payload is None:
        return None
    reason: str | None = _load(_RETRACTION, payload, "a retraction").get("reason")
    return reason


def load_revocation(payload: Any) -> str:
    """The day of a revocation body ({"revoked_on": "YYYY-MM-DD"})."""
    revoked_on: str = _load(_REVOCATION, payload, "a revocation")["revoked_on"]
    return revoked_on


def _load(schema: Schema, payload: Any, what: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise Invalid([Issue("structure", f"the body must be a JSON object ({what}), got {json_type(payload)}")])
    try:
        loaded: dict[str, Any] = schema.load(payload)
    except ValidationError as error:
        raise Invalid(issues(error.messages)) from None
    return loaded


def issues(messages: Any) -> list[Issue]:
    """Marshmallow's nested error messages as issues whose expression is the JSON path (``a.b[2].c``)."""
    found: list[Issue] = []
    _collect(messages, "", found)
    if len(found) > MAX_ISSUES:
        more = len(found) - MAX_ISSUES
        found = found[:MAX_ISSUES]
        found.append(Issue("informational", f"{more} further problems are not listed", severity="information"))
    return found


def field_path(path: str, key: str) -> str:
    """The path of member ``key`` under ``path``; a key that is not a plain name (an empty one, one with a dot) is
    quoted, so that the path still names it: ``a["b.c"]``, ``[""]``. Keys are cut at 80 characters."""
    if _NAME.fullmatch(key):
        return f"{path}.{key}" if path else key
    shown = key if len(key) <= 80 else key[:80] + "..."
    return f"{path}[{json.dumps(shown, ensure_ascii=False)}]"


def _collect(messages: Any, path: str, found: list[Issue]) -> None:
    if isinstance(messages, dict):
        for key, nested in messages.items():
            if key == "_schema":
                child = path
            elif isinstance(key, int):
                child = f"{path}[{key}]"
            else:
                child = field_path(path, str(key))
            _collect(nested, child, found)
    elif isinstance(messages, list):
        for message in messages:
            _collect(message, path, found)
    else:
        code = messages.code if isinstance(messages, Problem) else "value"
        found.append(Issue(code, str(messages), path or None))
