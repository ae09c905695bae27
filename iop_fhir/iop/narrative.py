"""FHIR narrative XHTML made safe to show: a whitelist of the narrative's formatting elements and attributes
(https://hl7.org/fhir/R4/narrative.html#xhtml, invariants txt-1 and txt-2), everything else removed, parsed into a
small tree that the HTML and the PDF summary both render. Pure: a string in, a tree or a string out.

A narrative comes from a Bundle, which may have come from anywhere: it is never embedded as it arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from html.parser import HTMLParser

# The narrative's formatting elements (txt-1), less img: a summary loads nothing from elsewhere.
ALLOWED = frozenset(
    {
        "a", "abbr", "acronym", "b", "big", "blockquote", "br", "caption", "cite", "code", "col", "colgroup", "dd",
        "dfn", "div", "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "kbd", "li", "ol", "p", "pre",
        "q", "samp", "small", "span", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
        "tt", "ul", "var",
    }
)  # fmt: skip
VOID = frozenset({"br", "hr", "col"})
# Dropped elements that have no end tag (nothing inside them to skip).
DROPPED_VOID = frozenset({"img", "input", "link", "meta", "base", "source"})
# Removed with everything inside them: their content is code or controls, not narrative.
DROPPED = frozenset(
    {
        "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet", "form", "input", "button",
        "select", "textarea", "option", "noscript", "template", "svg", "math", "head", "title", "link", "meta",
        "base", "img", "audio", "video", "source", "canvas",
    }
)  # fmt: skip
# Attributes kept (no id/name: they could clash with the page's own; no style, no event handlers).
ATTRIBUTES = frozenset({"colspan", "rowspan", "scope", "abbr", "title", "lang", "dir", "headers", "span"})
# Narrative headings sit under the section's own heading (h2).
HEADINGS = {"h1": "h3", "h2": "h3", "h3": "h3", "h4": "h4", "h5": "h5", "h6": "h6"}
SAFE_SCHEMES = ("https://", "http://", "mailto:")
# Deeper elements are unwrapped (their text kept): no narrative needs more, and rendering recurses per level.
MAX_DEPTH = 40


@dataclass
class Element:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        """The element's text, as a reader sees it."""
        return "".join(c if isinstance(c, str) else ("\n" if c.tag == "br" else c.text()) for c in self.children)


class _Sanitizer(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("div")
        self._open: list[Element] = [self.root]
        self._skipping: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skipping:
            if tag == self._skipping[-1] and tag not in VOID:
                self._skipping.append(tag)
            return
        if tag in DROPPED:
            if tag not in DROPPED_VOID:
                self._skipping.append(tag)
            return
        if tag not in ALLOWED or len(self._open) > MAX_DEPTH:
            return  # unwrapped: its text stays, the element goes
        tag = HEADINGS.get(tag, tag)
        element = Element(tag, _attributes(tag, attrs))
        self._open[-1].children.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skipping or tag in DROPPED or tag not in ALLOWED or len(self._open) > MAX_DEPTH:
            return
        self._open[-1].children.append(Element(HEADINGS.get(tag, tag), _attributes(tag, attrs)))

    def handle_endtag(self, tag: str) -> None:
        if self._skipping:
            if tag == self._skipping[-1]:
                self._skipping.pop()
            return
        tag = HEADINGS.get(tag, tag)
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        if not self._skipping and data:
            self._open[-1].children.append(data)


def _attributes(tag: str, attrs: list[tuple[str, str | None]]) -> dict[str, str]:
    kept = {name: value for name, value in attrs if name in ATTRIBUTES and value is not None}
    if tag == "a":
        href = next((value for name, value in attrs if name == "href" and value), None)
        if href is not None and href.strip().lower().startswith(SAFE_SCHEMES):
            kept["href"] = href.strip()
            kept["rel"] = "noopener noreferrer"
    return kept


def parse(xhtml: str) -> Element:
    """The narrative as a tree of allowed elements under one ``div`` (its own outer div becomes a child div)."""
    sanitizer = _Sanitizer()
    sanitizer.feed(xhtml)
    sanitizer.close()
    return sanitizer.root


def to_html(element: Element) -> str:
    """The tree as HTML; every text and attribute value escaped."""
    return "".join(_html(child) for child in element.children)


def _html(node: Element | str) -> str:
    if isinstance(node, str):
        return escape(node, quote=False)
    attrs = "".join(f' {name}="{escape(value)}"' for name, value in sorted(node.attrs.items()))
    if node.tag in VOID:
        return f"<{node.tag}{attrs}>"
    return f"<{node.tag}{attrs}>{''.join(_html(c) for c in node.children)}</{node.tag}>"


def safe_html(xhtml: str) -> str:
    """``xhtml`` with only what a FHIR narrative may hold for formatting (see the module docstring)."""
    return to_html(parse(xhtml))
