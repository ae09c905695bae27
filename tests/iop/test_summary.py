"""The discharge summary for providers without FHIR: the transition-of-care document rendered as HTML and PDF
(iop_fhir/iop/summary.py, pure, from the document Bundle alone), served at /iop/discharges/{id}/summary.html|.pdf to
the program's own staff, and the US Core DocumentReference that carries the PDF."""

from __future__ import annotations

import copy
import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES
from flask import Flask
from flask.testing import FlaskClient
from pypdf import PdfReader

from iop_fhir.iop import narrative, summary
from iop_fhir.privacy.disclosure import REDISCLOSURE_NOTICE
from iop_fhir.r4 import validation
from iop_fhir.r4.profiles import ProfileRegistry
from tests.privacy.scenario import contract, issue

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "summary" / "sample-document.json"
VALIDATOR = EXAMPLES.parent / "tools" / "fhir-validate"
# What a reader must find in the summary of the sample document.
EXPECTED = (
    "Marcus J. Bell",
    "1988-04-12",
    "MRN-551207",
    "Adult SUD IOP",
    "2026-01-02",
    "2026-03-27",
    "Completed the program",
    "Dana Whitfield, LCADC",
    "Riverside Recovery Center",
    "Opioid dependence, in remission",
    "Major depressive disorder, recurrent, moderate",
    "Buprenorphine 8 mg / naloxone 2 mg sublingual film",
    "Naloxone 4 mg nasal spray",
    "Next appointment: 2026-04-02 10:00",
    "Passaic Valley Recovery Services",
    "42 CFR part 2",
)


@pytest.fixture
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SAMPLE.read_text(encoding="utf-8"))
    return loaded


def pdf_text(pdf: bytes) -> list[str]:
    """Each page's text, with runs of whitespace (line breaks inside a paragraph) as one space."""
    return [" ".join(page.extract_text().split()) for page in PdfReader(io.BytesIO(pdf)).pages]


def visible_text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", html, flags=re.S)).split())


def hostile(document: dict[str, Any]) -> dict[str, Any]:
    """The sample with a problems narrative that tries scripts, handlers, styles, links and frames."""
    changed = copy.deepcopy(document)
    section = changed["entry"][0]["resource"]["section"][0]
    section["text"]["div"] = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><p onclick="steal()" style="background:url(https://x.test/t)">'
        "Opioid dependence <b>in remission</b> &lt;script&gt;</p><script>alert('x')</script>"
        '<style>body{display:none}</style><iframe src="https://x.test"></iframe><img src="https://x.test/p.png"/>'
        '<a href="javascript:alert(1)">bad link</a> <a href="https://example.org/info">info</a>'
        "<form><input name='q'/>typed</form><custom-tag>kept text</custom-tag></div>"
    )
    return changed


# -- HTML -----------------------------------------------------------------------------------------------------------


def test_html_shows_the_patient_the_stay_the_sections_the_next_appointment_and_the_notice(
    document: dict[str, Any],
) -> None:
    html = summary.render_html(document)
    text = visible_text(html)
    for expected in EXPECTED:
        assert expected in text, expected
    assert REDISCLOSURE_NOTICE in text
    for title in ("Problems", "Medications", "Results", "Plan of care", "Functional status", "Consents"):
        assert f">{title}</h2>" in html
    # the notice comes before any clinical content
    assert html.index("42 CFR part 2") < html.index("Opioid dependence")


def test_html_is_one_self_contained_accessible_page_with_print_css(document: dict[str, Any]) -> None:
    html = summary.render_html(document)
    assert html.startswith('<!DOCTYPE html>\n<html lang="en">')
    assert '<meta charset="utf-8">' in html
    assert "@media print" in html
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)=["']?https?:""", html)  # nothing loaded from elsewhere
    assert re.search(r'<aside class="notice" role="note" aria-labelledby="part2-notice">', html)
    assert html.count("<h1>") == 1
    # the internal record identifier means nothing to a reader and is not shown
    assert "iop-record" not in html


def test_html_style_is_the_one_the_content_security_policy_allows(document: dict[str, Any]) -> None:
    import base64
    import hashlib

    html = summary.render_html(document)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    assert len(styles) == 1
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in summary.CONTENT_SECURITY_POLICY
    assert summary.CONTENT_SECURITY_POLICY.startswith("default-src 'none'")


def test_narrative_scripts_handlers_styles_frames_and_unsafe_links_are_removed(document: dict[str, Any]) -> None:
    html = summary.render_html(hostile(document))
    lowered = html.lower()
    for refused in ("<script", "alert(", "onclick", "steal()", "<iframe", "<img", "javascript:", "<form", "<input",
                    "x.test", "display:none", "<custom-tag"):  # fmt: skip
        assert refused not in lowered, refused
    # the narrative's own text stays, escaped where it was escaped
    assert "Opioid dependence <b>in remission</b> &lt;script&gt;" in html
    assert "kept text" in html and "typed" not in html
    assert '<a href="https://example.org/info" rel="noopener noreferrer">info</a>' in html
    assert "bad link" in html


@pytest.mark.parametrize(
    ("xhtml", "safe"),
    [
        ('<div xmlns="http://www.w3.org/1999/xhtml">a &amp; b</div>', "<div>a &amp; b</div>"),
        ("<div><p>unclosed <b>bold</div>", "<div><p>unclosed <b>bold</b></p></div>"),
        ("<div><script><script>x</script>y</script>z</div>", "<div>yz</div>"),  # as a browser parses it
        ('<div><td colspan="2" onmouseover="x()" id="a">c</td></div>', '<div><td colspan="2">c</td></div>'),
        ("<div><h1>Title</h1></div>", "<div><h3>Title</h3></div>"),
        ('<div title="&quot;&gt;<x>">t</div>', '<div title="&quot;&gt;&lt;x&gt;">t</div>'),
        ("<div><!-- comment --><![CDATA[x]]>text</div>", "<div>text</div>"),
    ],
)
def test_narrative_keeps_only_escaped_text_and_allowed_elements(xhtml: str, safe: str) -> None:
    assert narrative.safe_html(xhtml) == safe


def test_a_deeply_nested_narrative_keeps_its_text_and_renders(document: dict[str, Any]) -> None:
    changed = copy.deepcopy(document)
    changed["entry"][0]["resource"]["section"][0]["text"]["div"] = (
        "<div>" + "<b>" * 5000 + "deep" + "</b>" * 5000 + "</div>"
    )
    assert "deep" in summary.render_html(changed)
    assert "deep" in " ".join(pdf_text(summary.render_pdf(changed)))


def test_a_table_row_taller_than_a_page_continues_on_the_next(document: dict[str, Any]) -> None:
    changed = copy.deepcopy(document)
    changed["entry"][0]["resource"]["section"][0]["text"]["div"] = (
        "<div><table><tr><td>long</td><td>" + " word" * 9000 + " last</td></tr></table></div>"
    )
    pages = pdf_text(summary.render_pdf(changed))
    assert len(pages) > 3
    assert "word last" in " ".join(pages)


def test_sub_sections_are_shown_under_their_section_unless_its_narrative_already_shows_them(
    document: dict[str, Any],
) -> None:
    changed = copy.deepcopy(document)
    consents = changed["entry"][0]["resource"]["section"][5]
    consents["section"] = [
        {"title": "Consent to this disclosure", "text": {"status": "generated", "div": "<div>Signed 2026-01-02</div>"}},
        {"title": "Repeated", "text": {"status": "generated", "div": "<div>signed 2026-01-02, until</div>"}},
    ]
    html = summary.render_html(changed)
    assert '<h3 id="section-6-1">Consent to this disclosure</h3><div class="narrative"><div>Signed 2026-01-02' in html
    assert "Repeated" not in html
    text = " ".join(pdf_text(summary.render_pdf(changed)))
    assert "Consent to this disclosure Signed 2026-01-02" in text


def test_a_bundle_that_is_not_a_document_is_refused(document: dict[str, Any]) -> None:
    with pytest.raises(summary.NotADocument):
        summary.render_html({**document, "type": "collection"})
    with pytest.raises(summary.NotADocument):
        summary.render_pdf({**document, "entry": document["entry"][1:]})


# -- PDF ------------------------------------------------------------------------------------------------------------


def test_pdf_text_has_the_same_content_and_the_notice_is_on_the_first_page(document: dict[str, Any]) -> None:
    pdf = summary.render_pdf(document)
    assert pdf.startswith(b"%PDF-")
    pages = pdf_text(pdf)
    text = " ".join(pages)
    for expected in EXPECTED:
        assert expected in text, expected
    assert " ".join(REDISCLOSURE_NOTICE.split()) in pages[0]
    assert "alert" not in text


def test_every_pdf_page_footer_names_the_patient_and_numbers_the_page(document: dict[str, Any]) -> None:
    # a longer document: every section repeated, so that it runs over several pages
    longer = copy.deepcopy(document)
    composition = longer["entry"][0]["resource"]
    composition["section"] = composition["section"] * 4
    pages = pdf_text(summary.render_pdf(longer))
    assert len(pages) > 1
    for number, page in enumerate(pages, 1):
        assert "Marcus J. Bell, born 1988-04-12" in page
        assert f"Page {number} of {len(pages)}" in page


def test_the_same_document_renders_to_the_same_pdf(document: dict[str, Any]) -> None:
    assert summary.render_pdf(document) == summary.render_pdf(copy.deepcopy(document))


def test_characters_helvetica_lacks_become_their_nearest_and_text_stays_extractable(document: dict[str, Any]) -> None:
    changed = copy.deepcopy(document)
    changed["entry"][0]["resource"]["section"][2]["text"]["div"] = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><p>PHQ-9 17 \u2192 8, score \u2265 5, Jos\u00e9</p></div>'
    )
    text = " ".join(pdf_text(summary.render_pdf(changed)))
    assert "PHQ-9 17 -> 8, score >= 5, Jos\u00e9" in text


# -- DocumentReference ----------------------------------------------------------------------------------------------


def test_document_reference_is_a_us_core_discharge_summary_carrying_the_pdf(document: dict[str, Any]) -> None:
    import base64

    pdf = summary.render_pdf(document)
    reference = summary.document_reference(document, pdf, discharge_id="d-1")
    assert reference["status"] == "current"
    assert reference["type"]["coding"] == [
        {"system": "http://loinc.org", "code": "18842-5", "display": "Discharge summary"}
    ]
    assert reference["category"][0]["coding"][0]["code"] == "clinical-note"
    assert reference["subject"] == {"reference": "Patient/5d2e1c34-0d6b-5a7e-9c1f-3a2b4c5d6e01"}
    assert reference["author"] == [
        {"reference": "Practitioner/dana-whitfield"},
        {"reference": "Organization/riverside-recovery"},
    ]
    assert reference["date"] == "2026-03-27T16:00:00-04:00"
    assert reference["context"] == {"period": {"start": "2026-01-02", "end": "2026-03-27"}}
    attachment = reference["content"][0]["attachment"]
    assert attachment["contentType"] == "application/pdf"
    assert base64.b64decode(attachment["data"]) == pdf
    assert attachment["size"] == len(pdf)
    codes = {label["code"] for label in reference["meta"]["security"]}
    assert {"R", "42CFRPart2", "SUD", "NORDSCLCD"} <= codes
    # the same discharge always names the same DocumentReference
    assert summary.document_reference(document, pdf, discharge_id="d-1")["id"] == reference["id"]


def test_document_reference_passes_r4_and_the_us_core_profile(document: dict[str, Any]) -> None:
    reference = summary.document_reference(document, summary.render_pdf(document), discharge_id="d-1")
    assert validation.validate(reference) == []
    profiles = ProfileRegistry.load(REPO / "profiles", REPO / "mappings" / "terminology")
    assert [i for i in profiles.claimed_issues(reference) if i.severity in ("error", "fatal")] == []


@pytest.mark.peers
def test_document_reference_passes_the_independent_validator(document: dict[str, Any], tmp_path: Path) -> None:
    reference = summary.document_reference(document, summary.render_pdf(document), discharge_id="d-1")
    path = tmp_path / "DocumentReference.json"
    path.write_text(json.dumps(reference), encoding="utf-8")
    result = subprocess.run([str(VALIDATOR), str(path), str(SAMPLE)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the routes -----------------------------------------------------------------------------------------------------


def discharge(client: FlaskClient, enrollment_id: str) -> str:
    for kind, path in (("treatment-plan", "/iop/treatment-plans"), ("medication", "/iop/medications")):
        response = client.post(path, json=contract(kind, enrollment_id))
        assert response.status_code == 201, response.get_json()
    response = client.post("/iop/discharges", json=contract("discharge", enrollment_id))
    assert response.status_code == 201, response.get_json()
    record_id: str = response.get_json()["id"]
    return record_id


def test_the_program_reads_the_summary_as_html_and_pdf(client: FlaskClient, program: dict[str, Any]) -> None:
    record_id = discharge(client, program["a"]["enrollment"])
    html = client.get(f"/iop/discharges/{record_id}/summary.html")
    assert html.status_code == 200, html.get_data(as_text=True)[:500]
    assert html.mimetype == "text/html"
    assert html.headers["Cache-Control"] == "no-store"
    assert html.headers["Content-Disposition"] == f'inline; filename="discharge-{record_id}-summary.html"'
    assert html.headers["Content-Security-Policy"] == summary.CONTENT_SECURITY_POLICY
    page = html.get_data(as_text=True)
    text = visible_text(page)
    assert "<script" not in page.lower()
    pdf = client.get(f"/iop/discharges/{record_id}/summary.pdf")
    assert pdf.status_code == 200
    assert pdf.mimetype == "application/pdf"
    assert pdf.headers["Cache-Control"] == "no-store"
    assert pdf.headers["Content-Disposition"] == f'inline; filename="discharge-{record_id}-summary.pdf"'
    pages = pdf_text(pdf.get_data())
    for shown in (text, " ".join(pages)):
        for expected in (
            "Jordan A. Consentida",
            "MRN-A-1",
            "Alcohol dependence",
            "Buprenorphine and naloxone 8 mg / 2 mg",
            "Passaic Valley Recovery Services",
            "42 CFR part 2",
        ):
            assert expected in shown, expected
    assert "42 CFR part 2" in pages[0]
    # no PHI in the filename
    assert "Consentida" not in pdf.headers["Content-Disposition"]


def test_a_partners_client_may_not_read_the_summary(client: FlaskClient, program: dict[str, Any]) -> None:
    record_id = discharge(client, program["a"]["enrollment"])
    for extension in ("html", "pdf"):
        response = program["partner"].get(f"/iop/discharges/{record_id}/summary.{extension}")
        assert response.status_code == 403
        assert issue(response)["code"] == "forbidden"


def test_a_client_that_may_not_read_discharges_may_not_read_their_summary(
    app: Flask, client: FlaskClient, program: dict[str, Any]
) -> None:
    from tests.auth import mint
    from tests.privacy.scenario import as_client

    record_id = discharge(client, program["a"]["enrollment"])
    narrow = as_client(app, mint(app, "system/Observation.rs"))
    response = narrow.get(f"/iop/discharges/{record_id}/summary.pdf")
    assert response.status_code == 403
    assert "EpisodeOfCare" in issue(response)["diagnostics"]


@pytest.mark.parametrize("record_id", ["4b1c3f4e-0000-4000-8000-000000000000", "not..an id"])
def test_an_unknown_discharge_has_no_summary(client: FlaskClient, record_id: str) -> None:
    for extension in ("html", "pdf"):
        response = client.get(f"/iop/discharges/{record_id}/summary.{extension}")
        assert response.status_code == 404
        assert issue(response)["code"] == "not-found"
        assert issue(response)["expression"] == ["id"]


# -- the DocumentReference stored with the discharge ----------------------------------------------------------------


def stored_summaries(client: FlaskClient, record_id: str) -> list[dict[str, Any]]:
    identifier = f"https://iop-fhir.org/fhir/sid/iop-record|discharge/{record_id}/summary-pdf"
    response = client.get("/fhir/DocumentReference", query_string={"identifier": identifier})
    assert response.status_code == 200, response.get_json()
    return [entry["resource"] for entry in response.get_json().get("entry") or []]


def test_a_saved_discharge_stores_its_pdf_summary_as_a_document_reference(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    import base64

    record_id = discharge(client, program["a"]["enrollment"])
    [reference] = stored_summaries(client, record_id)
    assert reference["id"] == summary.document_reference_id(record_id)
    assert reference["status"] == "current"
    assert reference["subject"] == {"reference": program["a"]["patient"]}
    assert reference["type"]["coding"][0]["code"] == "18842-5"
    assert reference["context"]["period"] == {"start": "2026-01-05", "end": "2026-03-27"}
    pdf = base64.b64decode(reference["content"][0]["attachment"]["data"])
    text = " ".join(pdf_text(pdf))
    assert "Jordan A. Consentida" in text and "Buprenorphine" in text and "42 CFR part 2" in text
    found = client.get("/fhir/DocumentReference", query_string={"patient": program["a"]["patient"]})
    assert [e["resource"]["id"] for e in found.get_json()["entry"]] == [reference["id"]]


def test_a_corrected_discharge_updates_its_document_reference_and_a_retracted_one_marks_it_in_error(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    record_id = discharge(client, program["a"]["enrollment"])
    [first] = stored_summaries(client, record_id)
    corrected = contract("discharge", program["a"]["enrollment"])
    corrected["summary"] = "Completed 12 weeks; corrected attendance: 35 of 36 group sessions."
    response = client.put(f"/iop/discharges/{record_id}", json=corrected)
    assert response.status_code == 200, response.get_json()
    [second] = stored_summaries(client, record_id)
    assert second["id"] == first["id"]
    assert int(second["meta"]["versionId"]) > int(first["meta"]["versionId"])
    assert second["content"][0]["attachment"]["hash"] != first["content"][0]["attachment"]["hash"]
    assert client.post(f"/iop/discharges/{record_id}/retract", json={"reason": "wrong patient"}).status_code == 200
    [retracted] = stored_summaries(client, record_id)
    assert retracted["status"] == "entered-in-error"


def test_a_partner_does_not_get_the_stored_summary_of_a_patient_who_did_not_consent(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    record_id = discharge(client, program["b"]["enrollment"])
    assert len(stored_summaries(client, record_id)) == 1
    assert stored_summaries(program["partner"], record_id) == []
