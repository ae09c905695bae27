"""The discharge summary for providers without FHIR: a transition-of-care document Bundle (type document, Composition
first) rendered as a self-contained HTML page and as a PDF, and the US Core DocumentReference that carries the PDF.
Pure: the Bundle in, a string, bytes or a resource out; nothing here reads the store or the request.

What is shown comes from the Bundle alone: the header from the Composition and the resources it references (Patient,
EpisodeOfCare, authors, custodian), each section's title and narrative (made safe by narrative.py), the next
appointment and the aftercare referral (Appointment, ServiceRequest, Task), and the 42 CFR Part 2 redisclosure
notice (the Bundle's RedisclosureProhibitionMark, or §2.32 Statement 1).

https://hl7.org/fhir/R4/documents.html#presentation, https://hl7.org/fhir/us/core/STU6.1/StructureDefinition-us-core-documentreference.html
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass, field
from html import escape
from typing import Any

from iop_fhir.iop import narrative
from iop_fhir.mapping import ids
from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.privacy.disclosure import DS4P_DISPLAY, REDISCLOSURE_NOTICE

TITLE = "IOP discharge summary"
RECORD_SYSTEM = ids.RECORD_SYSTEM
LEVEL_OF_CARE_SYSTEM = f"{ids.CANONICAL}/CodeSystem/asam-level-of-care"
DISCHARGE_REASON_URL = f"{ids.CANONICAL}/StructureDefinition/discharge-reason"
# Verified: 18842-5 is enumerated by the US Core clinical note type ValueSet (us-core-clinical-note-type, 6.1.0).
DISCHARGE_SUMMARY_TYPE = {"system": "http://loinc.org", "code": "18842-5", "display": "Discharge summary"}
CLINICAL_NOTE = {
    "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
    "code": "clinical-note",
    "display": "Clinical Note",
}
# The DocumentReference's role among a discharge's resources (its id and identifier derive from it).
SUMMARY_ROLE = "summary-pdf"
US_CORE_DOCUMENT_REFERENCE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference"


class NotADocument(ValueError):
    """The Bundle is not a FHIR document (type document with a Composition first)."""


@dataclass
class Section:
    title: str
    body: narrative.Element
    sections: list[Section] = field(default_factory=list)


@dataclass
class Summary:
    """What the HTML page and the PDF both show, in their order."""

    patient: str
    facts: list[tuple[str, str]]
    notice: str
    next_steps: list[str]
    sections: list[Section] = field(default_factory=list)
    document: str = ""


# ---------------------------------------------------------------------------------------------- reading the Bundle


class _Document:
    def __init__(self, bundle: dict[str, Any]) -> None:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "document":
            raise NotADocument("not a Bundle of type document")
        entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        if not entries or entries[0]["resource"].get("resourceType") != "Composition":
            raise NotADocument("a document's first entry is its Composition")
        self.bundle = bundle
        self.composition: dict[str, Any] = entries[0]["resource"]
        self.resources = [e["resource"] for e in entries]
        self._by_reference: dict[str, dict[str, Any]] = {}
        for entry in entries:
            resource = entry["resource"]
            local = f"{resource.get('resourceType')}/{resource.get('id')}"
            self._by_reference.setdefault(local, resource)
            full = entry.get("fullUrl")
            if isinstance(full, str):
                self._by_reference[full] = resource

    def resolve(self, reference: Any) -> dict[str, Any] | None:
        if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
            return None
        target = reference["reference"]
        found = self._by_reference.get(target)
        if found is None and "/" in target:
            found = self._by_reference.get("/".join(target.rsplit("/", 2)[-2:]))
        return found

    def of_type(self, res_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r.get("resourceType") == res_type]

    def local_reference(self, reference: Any) -> dict[str, str] | None:
        """``reference`` as Type/id of the resource it resolves to (a document may use urn:uuid fullUrls)."""
        found = self.resolve(reference)
        if found is not None and found.get("id"):
            return {"reference": f"{found['resourceType']}/{found['id']}"}
        if isinstance(reference, dict) and isinstance(reference.get("reference"), str):
            target = reference["reference"]
            if not target.startswith("urn:") and "/" in target:
                return {"reference": "/".join(target.rsplit("/", 2)[-2:])}
        return None


def _concept(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if coding.get("display"):
            return str(coding["display"])
    codes = [str(c.get("code")) for c in concept.get("coding") or [] if c.get("code")]
    return ", ".join(codes)


def _human_name(resource: dict[str, Any] | None) -> str:
    if resource is None:
        return ""
    if resource.get("resourceType") == "Organization":
        return str(resource.get("name") or "")
    for name in resource.get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = [*name.get("prefix", []), *name.get("given", []), name.get("family", "")]
        text = " ".join(str(p) for p in parts if p)
        if name.get("suffix"):
            text = f"{text}, {' '.join(name['suffix'])}"
        if text:
            return text
    return ""


def _who(document: _Document, reference: Any) -> str:
    found = _human_name(document.resolve(reference))
    if not found and isinstance(reference, dict):
        found = str(reference.get("display") or "")
    return found


def _day(value: Any) -> str:
    """A FHIR date or dateTime as a reader wants it: the day, and the time with its offset when there is one."""
    if not isinstance(value, str) or not value:
        return ""
    day, _, time = value.partition("T")
    if not time:
        return day
    clock = time[:5]
    offset = time[8:].lstrip("0123456789.") if len(time) > 8 else ""
    return f"{day} {clock}{f' ({offset})' if offset and offset != 'Z' else ' UTC' if offset == 'Z' else ''}"


def _period(period: Any) -> tuple[str, str]:
    if not isinstance(period, dict):
        return "", ""
    return _day(period.get("start")), _day(period.get("end"))


def _identifiers(patient: dict[str, Any]) -> str:
    shown = []
    for identifier in patient.get("identifier") or []:
        value = identifier.get("value")
        if not value or identifier.get("system") == RECORD_SYSTEM:
            continue  # the service's own record identifier means nothing to a reader
        issuer = (identifier.get("assigner") or {}).get("display") or _concept(identifier.get("type"))
        shown.append(f"{value} ({issuer})" if issuer else str(value))
    return "; ".join(shown)


def _episode(document: _Document) -> dict[str, Any] | None:
    for event in document.composition.get("event") or []:
        for detail in event.get("detail") or []:
            found = document.resolve(detail)
            if found is not None and found.get("resourceType") == "EpisodeOfCare":
                return found
    episodes = document.of_type("EpisodeOfCare")
    return episodes[0] if episodes else None


def _first_event(composition: dict[str, Any]) -> dict[str, Any]:
    events = composition.get("event") or []
    return events[0] if events and isinstance(events[0], dict) else {}


def _program(episode: dict[str, Any] | None) -> str:
    if episode is None:
        return ""
    parts = []
    for concept in episode.get("type") or []:
        coding: dict[str, Any] = next(iter(concept.get("coding") or []), {})
        text = _concept(concept)
        if coding.get("system") == LEVEL_OF_CARE_SYSTEM and coding.get("code"):
            text = f"ASAM level {coding['code']} {coding.get('display', '')}".strip()
        if text:
            parts.append(text)
    return ", ".join(parts)


def _discharge_reason(document: _Document, episode: dict[str, Any] | None) -> str:
    for extension in (episode or {}).get("extension") or []:
        if extension.get("url") == DISCHARGE_REASON_URL:
            return _concept(extension.get("valueCodeableConcept"))
    for encounter in document.of_type("Encounter"):
        disposition = (encounter.get("hospitalization") or {}).get("dischargeDisposition")
        if disposition:
            return _concept(disposition)
    return ""


def _notice(bundle: dict[str, Any]) -> str:
    """The notice the document carries with its RedisclosureProhibitionMark, else §2.32 Statement 1."""
    for label in (bundle.get("meta") or {}).get("security") or []:
        if label.get("code") == "RedisclosureProhibitionMark":
            for extension in label.get("extension") or []:
                if extension.get("url") == DS4P_DISPLAY and isinstance(extension.get("valueString"), str):
                    return str(extension["valueString"])
    return REDISCLOSURE_NOTICE


def _next_steps(document: _Document) -> list[str]:
    """The next appointment(s), the aftercare referral and where the partner says it stands, one line each."""
    steps = []
    appointments = [a for a in document.of_type("Appointment") if a.get("status") not in ("cancelled", "noshow")]
    for appointment in sorted(appointments, key=lambda a: str(a.get("start") or "")):
        where = [
            _who(document, p.get("actor"))
            for p in appointment.get("participant") or []
            if (p.get("actor") or {}).get("reference", "").split("/")[-2:-1] != ["Patient"]
        ]
        what = appointment.get("description") or _concept(next(iter(appointment.get("serviceType") or []), None))
        line = f"Next appointment: {_day(appointment.get('start')) or 'date to be set'}"
        line += "".join(f", {part}" for part in [what, *where] if part)
        steps.append(f"{line} ({appointment.get('status', 'booked')})")
    for request in document.of_type("ServiceRequest"):
        performers = [_who(document, p) for p in request.get("performer") or []]
        line = f"Referred to {', '.join(p for p in performers if p) or 'aftercare'}: {_concept(request.get('code'))}"
        reasons = [_concept(r) for r in request.get("reasonCode") or []]
        if any(reasons):
            line += f". Reason: {'; '.join(r for r in reasons if r)}"
        when = request.get("occurrenceDateTime") or (request.get("occurrencePeriod") or {}).get("start")
        if when:
            line += f". Requested for {_day(when)}"
        steps.append(line)
    for task in document.of_type("Task"):
        status = _concept(task.get("businessStatus")) or str(task.get("status") or "")
        line = f"Referral status: {status}" if status else "Referral status: unknown"
        owner = _who(document, task.get("owner"))
        if owner:
            line += f" ({owner})"
        for output in task.get("output") or []:
            value = next((v for k, v in output.items() if k.startswith("value")), None)
            shown = _day(value) if isinstance(value, str) else _concept(value) or _who(document, value)
            if shown:
                line += f"; {_concept(output.get('type')) or 'output'}: {shown}"
        steps.append(line)
    return steps


def _section(section: dict[str, Any], depth: int = 0) -> Section:
    div = (section.get("text") or {}).get("div")
    body = narrative.parse(div) if isinstance(div, str) else narrative.Element("div")
    subsections = [
        _section(sub, depth + 1) for sub in section.get("section") or [] if isinstance(sub, dict) and depth < 3
    ]
    # A sub-section whose narrative the section's own already shows is not shown twice.
    shown = " ".join(body.text().split())
    subsections = [sub for sub in subsections if not shown or " ".join(sub.body.text().split()) not in shown]
    if not body.text().strip() and not subsections:
        body = narrative.Element("div", children=[narrative.Element("p", children=["No information."])])
    return Section(str(section.get("title") or _concept(section.get("code")) or "Section"), body, subsections)


def read(bundle: dict[str, Any]) -> Summary:
    """What the summary shows, from the document Bundle alone."""
    document = _Document(bundle)
    composition = document.composition
    patient = document.resolve(composition.get("subject")) or {}
    name = _human_name(patient) or str((composition.get("subject") or {}).get("display") or "Unnamed patient")
    episode = _episode(document)
    admitted, discharged = _period((episode or {}).get("period"))
    if not admitted and not discharged:
        admitted, discharged = _period(_first_event(composition).get("period"))
    authors = [a for a in (_who(document, r) for r in composition.get("author") or []) if a]
    custodian = document.resolve(composition.get("custodian"))
    organization = _human_name(custodian) or str((composition.get("custodian") or {}).get("display") or "")
    if custodian is not None:
        phone = next((t.get("value") for t in custodian.get("telecom") or [] if t.get("system") == "phone"), None)
        if phone:
            organization = f"{organization}, {phone}"
    facts = [
        ("Patient", name),
        ("Birth date", _day(patient.get("birthDate"))),
        ("Identifiers", _identifiers(patient)),
        ("Program", _program(episode)),
        ("Admission", admitted),
        ("Discharge", discharged),
        ("Discharge reason", _discharge_reason(document, episode)),
        ("Author", "; ".join(authors)),
        ("Organization", organization),
        ("Document date", _day(composition.get("date"))),
    ]
    sections = [_section(section) for section in composition.get("section") or [] if isinstance(section, dict)]
    identifier = (bundle.get("identifier") or {}).get("value") or bundle.get("id") or ""
    return Summary(
        patient=name,
        facts=[(label, value) for label, value in facts if value],
        notice=_notice(bundle),
        next_steps=_next_steps(document),
        sections=sections,
        document=str(identifier),
    )


# ---------------------------------------------------------------------------------------------- HTML

STYLE = """
:root { color-scheme: light; }
body { font: 11pt/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #111;
  max-width: 52rem; margin: 1.5rem auto; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin: 0 0 .5rem; }
h2 { font-size: 1.15rem; margin: 1.5rem 0 .4rem; border-bottom: 1px solid #999; padding-bottom: .15rem; }
h3, h4, h5, h6 { font-size: 1rem; margin: .8rem 0 .3rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: 0; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
.notice { border: 2px solid #7a0000; background: #fff4f4; padding: .6rem .8rem; margin: 1rem 0; }
.notice h2 { border: 0; margin: 0 0 .3rem; color: #7a0000; }
.notice p { margin: 0; font-size: .95rem; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0; }
th, td { border: 1px solid #999; padding: .2rem .4rem; text-align: left; vertical-align: top; }
th { background: #eee; }
footer { margin-top: 2rem; font-size: .85rem; color: #444; }
@media print {
  body { margin: 0; max-width: none; font-size: 10pt; }
  .notice { break-inside: avoid; }
  section { break-inside: auto; }
  h2 { break-after: avoid; }
  tr, li { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
}
@page { margin: 16mm 14mm 18mm; }
"""
# The page's Content-Security-Policy: nothing loads, only its own stylesheet applies (by hash, so no other).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()}'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def render_html(bundle: dict[str, Any]) -> str:
    """The document as one self-contained HTML page (no scripts, no external resources, print CSS)."""
    summary = read(bundle)
    e = escape
    facts = "".join(f"<dt>{e(label)}</dt><dd>{e(value)}</dd>" for label, value in summary.facts)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="robots" content="noindex, nofollow">',
        f"<title>{e(TITLE)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{e(TITLE)}</h1>",
        f'<dl class="facts" aria-label="Patient and stay">{facts}</dl>',
        "</header>",
        '<aside class="notice" role="note" aria-labelledby="part2-notice">',
        '<h2 id="part2-notice">Confidential: 42 CFR Part 2 substance use disorder record</h2>',
        f"<p>{e(summary.notice)}</p>",
        "</aside>",
        "<main>",
    ]
    if summary.next_steps:
        items = "".join(f"<li>{e(step)}</li>" for step in summary.next_steps)
        parts.append(
            '<section aria-labelledby="next-steps"><h2 id="next-steps">Next appointment and aftercare referral</h2>'
            f"<ul>{items}</ul></section>"
        )
    for number, section in enumerate(summary.sections, 1):
        parts.append(_html_section(section, f"section-{number}", 2))
    parts += [
        "</main>",
        f"<footer><p>Document {e(summary.document)}. {e(summary.patient)}. "
        "Rendered from the FHIR transition-of-care document; the narrative of each section is the document's own."
        "</p></footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _html_section(section: Section, anchor: str, level: int) -> str:
    heading = f"h{min(level, 6)}"
    subsections = "".join(
        _html_section(sub, f"{anchor}-{number}", level + 1) for number, sub in enumerate(section.sections, 1)
    )
    return (
        f'<section aria-labelledby="{anchor}"><{heading} id="{anchor}">{escape(section.title)}</{heading}>'
        f'<div class="narrative">{narrative.to_html(section.body)}</div>{subsections}</section>'
    )


# ---------------------------------------------------------------------------------------------- PDF

# The PDF's text is set in the standard Helvetica (every reader has it; nothing embedded), whose encoding is
# Windows-1252: other characters are written as the nearest it has, or "?".
_NEAREST = str.maketrans(
    {
        "\u2192": "->", "\u2190": "<-", "\u2191": "up", "\u2193": "down", "\u2264": "<=", "\u2265": ">=",
        "\u2260": "!=", "\u2212": "-", "\u2713": "yes", "\u2717": "no", "\u2022": "\u2022", "\u00a0": " ",
    }
)  # fmt: skip
FOOTER_FONT = ("Helvetica", 8)


def _pdf_text(text: str) -> str:
    """``text`` escaped for a reportlab Paragraph, in characters Helvetica can show."""
    return escape(text.translate(_NEAREST).encode("cp1252", "replace").decode("cp1252"), quote=False)


def _inline(node: narrative.Element | str) -> str:
    """The Paragraph markup of inline content (bold, italic, code, sub/superscript, line breaks)."""
    if isinstance(node, str):
        return _pdf_text(" ".join(node.split()) if node.strip() else (" " if node else ""))
    inner = "".join(_inline(child) for child in node.children)
    tag = node.tag
    if tag == "br":
        return "<br/>"
    if tag in ("b", "strong", "th"):
        return f"<b>{inner}</b>"
    if tag in ("i", "em", "cite", "var", "dfn"):
        return f"<i>{inner}</i>"
    if tag in ("code", "tt", "kbd", "samp"):
        return f'<font face="Courier">{inner}</font>'
    if tag == "sub":
        return f"<sub>{inner}</sub>"
    if tag == "sup":
        return f"<super>{inner}</super>"
    if tag == "q":
        return f'"{inner}"'
    if tag in _BLOCKS:
        return f"{inner}<br/>" if inner.strip() else ""
    return inner


_BLOCKS = frozenset(
    {"div", "p", "blockquote", "pre", "h3", "h4", "h5", "h6", "ul", "ol", "li", "dl", "dt", "dd", "table", "hr",
     "caption", "tr", "td", "thead", "tbody", "tfoot"}
)  # fmt: skip


def _flowables(element: narrative.Element, styles: dict[str, Any], width: float, depth: int = 0) -> list[Any]:
    """The block content of ``element`` as platypus flowables; runs of inline content become paragraphs."""
    from reportlab.platypus import Paragraph, Spacer

    out: list[Any] = []
    run: list[str] = []

    def flush() -> None:
        text = "".join(run).strip()
        if text.removesuffix("<br/>").strip():
            out.append(Paragraph(text.removesuffix("<br/>"), styles["body"]))
        run.clear()

    for child in element.children:
        if isinstance(child, str) or child.tag not in _BLOCKS:
            run.append(_inline(child))
            continue
        flush()
        tag = child.tag
        if tag in ("h3", "h4", "h5", "h6"):
            out.append(Paragraph(_inline_children(child), styles["subheading"]))
        elif tag in ("ul", "ol"):
            number = 0
            for item in child.children:
                if isinstance(item, str) or item.tag != "li":
                    continue
                number += 1
                bullet = f"{number}." if tag == "ol" else "\u2022"
                nested = [c for c in item.children if not isinstance(c, str) and c.tag in ("ul", "ol", "table")]
                text = "".join(_inline(c) for c in item.children if c not in nested).strip()
                style = styles["item"].clone(f"item{depth}", leftIndent=14 + 14 * depth)
                out.append(Paragraph(text.removesuffix("<br/>") or " ", style, bulletText=bullet))
                holder = narrative.Element("div", children=list(nested))
                out.extend(_flowables(holder, styles, width - 14, depth + 1))
        elif tag == "table":
            out.append(_table(child, styles, width))
        elif tag == "dl":
            for item in child.children:
                if isinstance(item, narrative.Element) and item.tag in ("dt", "dd"):
                    style = styles["body"] if item.tag == "dd" else styles["term"]
                    out.append(Paragraph(_inline_children(item), style))
        elif tag == "hr":
            out.append(Spacer(1, 6))
        elif tag == "pre":
            from reportlab.platypus import Preformatted

            out.append(Preformatted(child.text(), styles["pre"]))
        else:  # div, p, blockquote, caption, stray table parts
            out.extend(_flowables(child, styles, width, depth))
    flush()
    return out


def _inline_children(element: narrative.Element) -> str:
    return "".join(_inline(c) for c in element.children).strip().removesuffix("<br/>") or " "


def _table(element: narrative.Element, styles: dict[str, Any], width: float) -> Any:
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, Table, TableStyle

    rows: list[list[Any]] = []
    texts: list[list[str]] = []
    header_rows = 0
    caption = None

    def collect(node: narrative.Element, in_head: bool) -> None:
        nonlocal header_rows, caption
        for child in node.children:
            if isinstance(child, str):
                continue
            if child.tag == "caption":
                caption = _inline_children(child)
            elif child.tag in ("thead", "tbody", "tfoot"):
                collect(child, child.tag == "thead")
            elif child.tag == "tr":
                cells = [c for c in child.children if isinstance(c, narrative.Element) and c.tag in ("td", "th")]
                is_header = in_head or (bool(cells) and all(c.tag == "th" for c in cells))
                style = styles["cell-head"] if is_header else styles["cell"]
                rows.append([Paragraph(_inline_children(c), style) for c in cells])
                texts.append([c.text() for c in cells])
                if is_header and len(rows) == header_rows + 1:
                    header_rows += 1

    collect(element, False)
    columns = max((len(r) for r in rows), default=1)
    rows = [r + [""] * (columns - len(r)) for r in rows] or [[""]]
    # splitInRow: a row taller than a page continues on the next one instead of failing the layout
    table = Table(
        rows,
        colWidths=_column_widths(texts, columns, width),
        repeatRows=header_rows,
        hAlign="LEFT",
        splitInRow=1,
    )
    commands: list[tuple[Any, ...]] = [
        ("GRID", (0, 0), (-1, -1), 0.5, colors.HexColor("#999999")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
    ]
    if header_rows:
        commands.append(("BACKGROUND", (0, 0), (-1, header_rows - 1), colors.HexColor("#EEEEEE")))
    table.setStyle(TableStyle(commands))
    if caption:
        from reportlab.platypus import KeepTogether

        return KeepTogether([Paragraph(caption, styles["term"]), table])
    return table


def _column_widths(texts: list[list[str]], columns: int, width: float) -> list[float]:
    """Each column gets room for its longest word (no word is broken), and the rest of the width in proportion to
    how much more its longest text needs (within limits), so a short label or status column stays narrow."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    padding = 12.0
    least, wanted = [], []
    for column in range(columns):
        cells = [_pdf_plain(row[column]) for row in texts if column < len(row)]
        words = [w for cell in cells for w in cell.split()]
        least.append(max((stringWidth(w, "Helvetica-Bold", 9) for w in words), default=0) + padding)
        wanted.append(min(max((stringWidth(c, "Helvetica", 9) for c in cells), default=0), width * 0.6) + padding)
    if sum(least) >= width:
        return [width * w / sum(least) for w in least]
    extra = [max(w - m, 0.0) for w, m in zip(wanted, least, strict=True)]
    spare = width - sum(least)
    if sum(extra) == 0:
        return [m + spare / columns for m in least]
    return [m + spare * e / sum(extra) for m, e in zip(least, extra, strict=True)]


def _pdf_plain(text: str) -> str:
    return " ".join(text.translate(_NEAREST).encode("cp1252", "replace").decode("cp1252").split())


def _styles() -> dict[str, Any]:
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle

    body = ParagraphStyle("body", fontName="Helvetica", fontSize=9.5, leading=12.5, spaceAfter=3)
    return {
        "title": ParagraphStyle("title", parent=body, fontName="Helvetica-Bold", fontSize=16, leading=20, spaceAfter=6),
        "heading": ParagraphStyle(
            "heading", parent=body, fontName="Helvetica-Bold", fontSize=12, leading=15, spaceBefore=10, spaceAfter=4
        ),
        "subheading": ParagraphStyle("subheading", parent=body, fontName="Helvetica-Bold", spaceBefore=4),
        "body": body,
        "term": ParagraphStyle("term", parent=body, fontName="Helvetica-Bold", spaceAfter=0),
        "item": ParagraphStyle("item", parent=body, leftIndent=14, bulletIndent=3, spaceAfter=1.5),
        "cell": ParagraphStyle("cell", parent=body, fontSize=9, leading=11, spaceAfter=0),
        "cell-head": ParagraphStyle("cell-head", parent=body, fontName="Helvetica-Bold", fontSize=9, leading=11),
        "fact": ParagraphStyle("fact", parent=body, spaceAfter=0),
        "notice-title": ParagraphStyle(
            "notice-title", parent=body, fontName="Helvetica-Bold", textColor=colors.HexColor("#7A0000"), spaceAfter=2
        ),
        "notice": ParagraphStyle("notice", parent=body, fontSize=8.5, leading=11, spaceAfter=0),
        "pre": ParagraphStyle("pre", parent=body, fontName="Courier", fontSize=8.5, leading=10.5),
        "small": ParagraphStyle("small", parent=body, fontSize=8, leading=10, textColor=colors.HexColor("#444444")),
    }


def _pdf_section(section: Section, styles: dict[str, Any], width: float, heading: str) -> list[Any]:
    from reportlab.platypus import KeepTogether, Paragraph

    body = _flowables(section.body, styles, width)
    for sub in section.sections:
        body.extend(_pdf_section(sub, styles, width, "subheading"))
    # A heading never ends a page alone: it keeps its first block with it.
    return [KeepTogether([Paragraph(_pdf_text(section.title), styles[heading]), *body[:1]]), *body[1:]]


def render_pdf(bundle: dict[str, Any]) -> bytes:
    """The document as a PDF (US Letter, text, not images of it): the header, the Part 2 notice on the first page,
    the next steps and every section; each page's footer names the patient and numbers the page."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import LETTER
    from reportlab.lib.units import mm
    from reportlab.pdfgen.canvas import Canvas
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    summary = read(bundle)
    styles = _styles()
    margin = 16 * mm
    width = LETTER[0] - 2 * margin
    footer_name = _pdf_text(summary.patient).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    birth = dict(summary.facts).get("Birth date")
    if birth:
        footer_name += f", born {birth}"

    class NumberedCanvas(Canvas):  # type: ignore[misc]
        """Draws each page's footer once the page count is known ("page 2 of 5")."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:  # noqa: N802 (reportlab's name)
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for state in self._pages:
                self.__dict__.update(state)
                self._footer(total)
                super().showPage()
            super().save()

        def _footer(self, total: int) -> None:
            self.saveState()
            self.setFont(*FOOTER_FONT)
            self.setFillColor(colors.HexColor("#333333"))
            self.setStrokeColor(colors.HexColor("#999999"))
            self.line(margin, 12 * mm, LETTER[0] - margin, 12 * mm)
            self.drawString(margin, 8 * mm, f"{footer_name}. Confidential: 42 CFR Part 2")
            self.drawRightString(LETTER[0] - margin, 8 * mm, f"Page {self._pageNumber} of {total}")
            self.restoreState()

    facts = Table(
        [[Paragraph(f"<b>{_pdf_text(label)}</b>", styles["fact"]), Paragraph(_pdf_text(value), styles["fact"])]
         for label, value in summary.facts],
        colWidths=[32 * mm, width - 32 * mm],
        hAlign="LEFT",
    )  # fmt: skip
    facts.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("TOPPADDING", (0, 0), (-1, -1), 1),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
            ]
        )
    )
    notice = Table(
        [
            [Paragraph("Confidential: 42 CFR Part 2 substance use disorder record", styles["notice-title"])],
            [Paragraph(_pdf_text(summary.notice), styles["notice"])],
        ],
        colWidths=[width],
    )
    notice.setStyle(
        TableStyle(
            [
                ("BOX", (0, 0), (-1, -1), 1.5, colors.HexColor("#7A0000")),
                ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#FFF4F4")),
                ("LEFTPADDING", (0, 0), (-1, -1), 6),
                ("RIGHTPADDING", (0, 0), (-1, -1), 6),
                ("TOPPADDING", (0, 0), (0, 0), 5),
                ("BOTTOMPADDING", (0, -1), (-1, -1), 6),
            ]
        )
    )
    story: list[Any] = [Paragraph(_pdf_text(TITLE), styles["title"]), facts, Spacer(1, 8), notice]
    if summary.next_steps:
        story.append(Paragraph("Next appointment and aftercare referral", styles["heading"]))
        story.extend(Paragraph(_pdf_text(step), styles["item"], bulletText="\u2022") for step in summary.next_steps)
    for section in summary.sections:
        story.extend(_pdf_section(section, styles, width, "heading"))
    story.append(Spacer(1, 10))
    story.append(
        Paragraph(
            _pdf_text(
                f"Document {summary.document}. Rendered from the FHIR transition-of-care document; the narrative "
                "of each section is the document's own."
            ),
            styles["small"],
        )
    )
    out = io.BytesIO()
    document = SimpleDocTemplate(
        out,
        pagesize=LETTER,
        leftMargin=margin,
        rightMargin=margin,
        topMargin=14 * mm,
        bottomMargin=18 * mm,
        title=TITLE,
        author=dict(summary.facts).get("Organization", ""),
        subject="Transition of care",
        creator="iop-fhir",
        invariant=True,  # the same document renders to the same bytes (no creation time or random id inside)
        lang="en",
    )
    document.build(story, canvasmaker=NumberedCanvas)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- DocumentReference


def document_reference(bundle: dict[str, Any], pdf: bytes, *, discharge_id: str) -> dict[str, Any]:
    """The US Core DocumentReference (6.1.0) of the discharge's PDF summary: a current discharge summary
    (LOINC 18842-5) and clinical note of the document's patient, its authors and custodian, the stay as its
    context period, the PDF inline (base64) with its size and SHA-1, and the Part 2 labels. Its id and identifier
    derive from the discharge, so re-rendering a corrected discharge replaces it instead of adding another."""
    document = _Document(bundle)
    composition = document.composition
    subject = document.local_reference(composition.get("subject"))
    if subject is None or not subject["reference"].startswith("Patient/"):
        raise NotADocument("the document's Composition.subject is not a Patient in the Bundle")
    episode = _episode(document)
    period = dict((episode or {}).get("period") or _first_event(composition).get("period") or {})
    authors = [ref for ref in (document.local_reference(a) for a in composition.get("author") or []) if ref]
    custodian = document.local_reference(composition.get("custodian"))
    created = _instant(composition.get("date")) or _instant(bundle.get("timestamp"))
    attachment: dict[str, Any] = {
        "contentType": "application/pdf",
        "language": "en-US",
        "data": base64.b64encode(pdf).decode("ascii"),
        "size": len(pdf),
        "hash": base64.b64encode(hashlib.sha1(pdf).digest()).decode("ascii"),  # R4: the SHA-1 of the data
        "title": TITLE,
    }
    if created:
        attachment["creation"] = created
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": document_reference_id(discharge_id),
        "meta": {"profile": [US_CORE_DOCUMENT_REFERENCE], "security": [dict(label) for label in PART2_LABELS]},
        "identifier": [
            {"system": RECORD_SYSTEM, "value": ids.identifier_value("discharge", discharge_id, SUMMARY_ROLE)}
        ],
        "status": "current",
        "docStatus": "final" if composition.get("status") == "final" else "preliminary",
        "type": {"coding": [dict(DISCHARGE_SUMMARY_TYPE)], "text": "Discharge summary"},
        "category": [{"coding": [dict(CLINICAL_NOTE)]}],
        "subject": subject,
        "description": TITLE,
        "securityLabel": [
            {"coding": [{k: v for k, v in PART2_LABELS[0].items() if k != "extension"}]},
            {"coding": [dict(label) for label in PART2_LABELS[1:3]]},
        ],
        "content": [{"attachment": attachment}],
    }
    if created:
        resource["date"] = created
    if authors:
        resource["author"] = authors
    if custodian is not None:
        resource["custodian"] = custodian
    if period.get("start") or period.get("end"):
        resource["context"] = {"period": {k: period[k] for k in ("start", "end") if period.get(k)}}
    return resource


def document_reference_id(discharge_id: str) -> str:
    return ids.resource_id("discharge", discharge_id, SUMMARY_ROLE)


def _instant(value: Any) -> str | None:
    """A dateTime with a time and a zone, as DocumentReference.date (an instant) needs; None otherwise."""
    if not isinstance(value, str) or "T" not in value:
        return None
    time = value.split("T", 1)[1]
    return value if time.endswith("Z") or "+" in time or "-" in time else None
