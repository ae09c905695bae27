"""$evaluate-measure under /fhir: ``GET|POST /fhir/Measure/{id}/$evaluate-measure`` (the rules are in evaluate.py;
the Measures themselves are read and searched like any resource, seeded by conformance.py)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from flask import Blueprint, Response, current_app, request

from iop_fhir.fhir import evaluate, http, operation
from iop_fhir.outcomes import measures
from iop_fhir.security import guard

bp = Blueprint("measures", __name__, url_prefix="/fhir")


@bp.route("/Measure/<res_id>/$evaluate-measure", methods=["GET", "POST"])
def evaluate_measure(res_id: str) -> Response:
    http.check_format(request)
    settings = current_app.config["IOP_FHIR"]
    params = [(k, v) for k, v in request.args.items(multi=True)]
    if request.method == "POST":
        params += operation.parameters(http.json_body(request), "$evaluate-measure")
    asked = evaluate.parse(
        params,
        programs=current_app.extensions["iop_fhir.outcomes"].programs,
        lenient=http.lenient(request.headers.get("Prefer")),
    )
    report = evaluate.evaluate(
        guard.access(),
        guard.repository(),
        current_app.extensions["iop_fhir.outcomes"],
        measures.load(Path(settings.mappings_dir) / "outcomes"),
        res_id,
        asked,
        date.today(),
    )
    return http.fhir_response(report)
