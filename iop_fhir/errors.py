"""The exception tree of iop-fhir; every error becomes an OperationOutcome in one handler (see app.py).

    FhirError                 an outcome with an HTTP status
    ├── BadRequest            400  malformed input, unknown search parameter, ...
    │   └── Invalid           400  a resource that fails validation (one issue per problem, each with its path)
    ├── Unauthorized          401
    ├── Forbidden             403
    ├── NotFound              404
    ├── MethodNotAllowed      405
    ├── NotAcceptable         406
    ├── Conflict              409  version conflict, id mismatch with existing state
    ├── Gone                  410  read of a deleted resource
    ├── PreconditionFailed    412  If-Match mismatch, conditional request with several matches
    ├── PayloadTooLarge       413
    ├── UnsupportedMediaType  415
    └── Unprocessable         422  a well-formed request the rules refuse

https://hl7.org/fhir/R4/operationoutcome.html, https://hl7.org/fhir/R4/http.html#Status-Codes
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue: what went wrong, and where (a FHIRPath or JSON path)."""

    code: str
    diagnostics: str
    expression: str | None = None
    severity: str = "error"

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


def information(diagnostics: str) -> dict[str, Any]:
    return operation_outcome([Issue("informational", diagnostics, severity="information")])


class FhirError(Exception):
    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "exception"

    def __init__(
        self,
        diagnostics: str = "",
        expression: str | None = None,
        *,
        code: str | None = None,
        issues: list[Issue] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.issues = issues or [Issue(code or self.default_code, diagnostics, expression)]
        self.headers = headers or {}
        super().__init__(diagnostics or "; ".join(i.diagnostics for i in self.issues))

    @property
    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class BadRequest(FhirError):
    status = 400
    default_code = "invalid"


class Invalid(BadRequest):
    """A resource that failed validation; carries every issue found, each with its FHIRPath."""

    def __init__(self, issues: list[Issue] | str, expression: str | None = None, *, code: str = "invalid") -> None:
        if isinstance(issues, str):
            issues = [Issue(code, issues, expression)]
        super().__init__(issues=issues)


class Unauthorized(FhirError):
    status = 401
    default_code = "login"


class Forbidden(FhirError):
    status = 403
    default_code = "forbidden"


class NotFound(FhirError):
    status = 404
    default_code = "not-found"


class MethodNotAllowed(FhirError):
    status = 405
    default_code = "not-supported"


class NotAcceptable(FhirError):
    status = 406
    default_code = "not-supported"


class Conflict(FhirError):
    status = 409
    default_code = "conflict"


class Gone(FhirError):
    status = 410
    default_code = "deleted"


class PreconditionFailed(FhirError):
    status = 412
    default_code = "conflict"


class PayloadTooLarge(FhirError):
    status = 413
    default_code = "too-costly"


class UnsupportedMediaType(FhirError):
    status = 415
    default_code = "not-supported"


class Unprocessable(FhirError):
    status = 422
    default_code = "processing"
