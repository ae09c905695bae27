"""Records that stand for several records (mappings/group-session.yaml: one session per attendee), in the engine alone:
each member's resources are exactly those of a record of its own kind, named by ids of the group and the member."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.errors import Invalid
from iop_fhir.mapping import ids, load_engine
from iop_fhir.mapping.engine import Engine, merge
from iop_fhir.mapping.spec import SpecError, load_all

REPO = Path(__file__).resolve().parents[2]
GROUP_SYSTEM = "https://iop-fhir.org/fhir/sid/group-session"
ENROLLMENTS = [f"6f1c2d9e-0000-4000-8000-00000000000{n}" for n in (1, 2, 3)]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(REPO / "mappings")


def group() -> dict[str, Any]:
    return {
        "group_id": "G-1",
        "service": "group-therapy",
        "approach": "cbt",
        "start": "2026-01-12T18:00:00-05:00",
        "end": "2026-01-12T21:00:00-05:00",
        "modality": "in-person",
        "facilitator": {"name": "Dana Whitfield, LCADC", "npi": "1234567893"},
        "attendees": [
            {
                "enrollment_id": ENROLLMENTS[0],
                "attendance": "attended",
                "craving_score": 3,
                "drug_screen": {
                    "specimen": "urine",
                    "collected_at": "2026-01-12T18:05:00-05:00",
                    "results": [{"analyte": "fentanyl", "result": "negative"}],
                },
                "progress_note": "private",
            },
            {"enrollment_id": ENROLLMENTS[1], "attendance": "late", "craving_score": 5},
            {"enrollment_id": ENROLLMENTS[2], "attendance": "no-show"},
        ],
    }


def mapped(engine: Engine, record: dict[str, Any]) -> list[Any]:
    derived = engine.prepare("group-session", record, {})
    return engine.map("group-session", derived.record, engine.natural_key("group-session", derived.record))


def test_each_attendees_resources_are_those_of_a_session_of_their_own(engine: Engine) -> None:
    record = group()
    produced = {p.reference: p.resource for p in mapped(engine, record)}
    expected: dict[str, Any] = {}
    for attendee in record["attendees"]:
        session = {k: v for k, v in record.items() if k not in ("group_id", "attendees")} | attendee
        member = next(m for m in engine.members("group-session", record) if m.key == attendee["enrollment_id"])
        assert member.record == session
        for item in engine.map("session", session, engine.member_id("group-session", "G-1", member)):
            resource = item.resource
            if item.role == "encounter":
                resource = merge(resource, {"identifier": [{"system": GROUP_SYSTEM, "value": "G-1"}]})
            expected[item.reference] = resource
    assert produced == expected


def test_attendee_ids_depend_on_the_group_and_the_enrollment_only(engine: Engine) -> None:
    record = group()
    first = {p.reference for p in mapped(engine, record)}
    reordered = copy.deepcopy(record)
    reordered["attendees"].reverse()
    reordered["topic"] = "another topic"
    assert {p.reference for p in mapped(engine, reordered)} == first
    other_group = {**copy.deepcopy(record), "group_id": "G-2"}
    shared = {p.reference for p in mapped(engine, other_group) if p.shared}
    assert {p.reference for p in mapped(engine, other_group)} & first == shared  # only the facilitator
    member = engine.members("group-session", record)[0]
    assert engine.member_id("group-session", "G-1", member) == ids.record_id("group-session", ["G-1", ENROLLMENTS[0]])


def test_the_shared_facilitator_is_produced_once(engine: Engine) -> None:
    roles = [p.role for p in mapped(engine, group())]
    assert roles.count("facilitator") == 1
    assert roles.count("encounter") == 3


def test_an_attendees_problem_is_reported_at_the_attendees_field(engine: Engine) -> None:
    record = group()
    record["attendees"][1]["attendance"] = "asleep"
    record["attendees"][0]["drug_screen"]["results"][0]["result"] = "maybe"
    with pytest.raises(Invalid) as error:
        engine.prepare("group-session", record, {})
    assert sorted(i.expression or "" for i in error.value.issues) == [
        "attendees[0].drug_screen.results[0].result",
        "attendees[1].attendance",
    ]


def test_a_group_field_problem_is_reported_at_the_group_field(engine: Engine) -> None:
    record = group()
    record["modality"] = "carrier-pigeon"
    with pytest.raises(Invalid) as error:
        engine.prepare("group-session", record, {})
    # Every attendee's session has the bad modality; the group reports it once, where it was sent.
    assert [i.expression for i in error.value.issues] == ["modality"]


def test_the_resources_map_back_to_the_group_without_the_private_notes(engine: Engine) -> None:
    record = group()
    produced = mapped(engine, record)
    back = engine.reverse("group-session", [(p.role, p.resource) for p in produced])
    expected = copy.deepcopy(record)
    for attendee in expected["attendees"]:
        attendee.pop("progress_note", None)
        attendee.pop("enrollment_id")  # read back through the enrollment's Patient, which this test does not have
    assert back == expected


def test_a_retracted_attendee_resource_follows_the_sessions_retract_rule(engine: Engine) -> None:
    encounter = next(p.resource for p in mapped(engine, group()) if p.role == "encounter")
    assert engine.retracted("group-session", "encounter", encounter)["status"] == "entered-in-error"
    assert engine.resource_spec("group-session", "drug-screen") is engine.spec("session").resource("drug-screen")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("kind: session", "kind: no-such-kind"), "expand.kind 'no-such-kind'"),
        (("    encounter:\n", "    appointment:\n"), "expand.add names roles session does not have: appointment"),
        (("    service: $service\n", "    service: {$code: service, from: $service}\n"), "record must map"),
    ],
)
def test_a_bad_expansion_is_refused_when_the_mappings_load(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    shutil.copy(REPO / "mappings" / "session.yaml", tmp_path / "session.yaml")
    text = (REPO / "mappings" / "group-session.yaml").read_text(encoding="utf-8")
    assert change[0] in text
    (tmp_path / "group-session.yaml").write_text(text.replace(change[0], change[1], 1), encoding="utf-8")
    with pytest.raises(SpecError, match=message):
        load_all(tmp_path)
