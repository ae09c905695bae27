"""The synthetic program as plain data: the partners, the program's staff, and one story per referred patient (the
inpatient unit's referral Bundle, the staff's decision on it, and the records of an admitted patient's stay).

Everything is drawn from ``random.Random`` seeded with the demo's seed and dated from the fixed ``START``, so one
seed always gives the same program, and all of it lies in the past. People are synthetic: medical record numbers
start with ``DEMO``, phone numbers are in the 555-01xx range kept for fiction, e-mail addresses and FHIR servers are
under ``.example`` domains.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from iop_fhir.exchange.package import PARTNER_SYSTEM
from iop_fhir.iop.schemas import npi_check_digit_is_valid
from iop_fhir.mapping import ids

START = date(2026, 3, 2)  # a Monday: the first referral arrives that week; the last discharge is in the summer
WEEKS = 8  # the program's planned length
PROGRAM_NAME = "Clifton Intensive Outpatient Program"
HOSPITAL_NAME = "Riverside Regional Medical Center"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5.99999.1"  # under HL7's OID for examples, 2.16.840.1.113883.19
REFERRAL_SYSTEM = "https://fhir.riverside-regional.example/sid/referral"

INPATIENT_UNIT = "riverside-withdrawal-unit"
HOSPITAL_EHR = "riverside-regional-ehr"
OUTPATIENT_CLINIC = "garden-state-outpatient"
PEER_PROGRAM = "harbor-peer-recovery"

# Days the program does not meet: what was scheduled on them is recorded as cancelled by the program.
HOLIDAYS = {date(2026, 5, 25), date(2026, 6, 19), date(2026, 7, 3)}
# How long a consent signed in the program runs: long enough that the disclosures it permits stay permitted for
# years, so that a database seeded today and one seeded next year hold the same deliveries.
CONSENT_YEARS = 5


def npi(first_nine: str) -> str:
    """The NPI whose first nine digits are ``first_nine`` (the tenth is the Luhn check digit)."""
    return next(first_nine + d for d in "0123456789" if npi_check_digit_is_valid(first_nine + d))


def _partner(pid: str, kind: str, name: str, number: str, url: str) -> dict[str, Any]:
    return {"id": pid, "kind": kind, "name": name, "npi": npi(number), "fhir_base_url": url, "auth": {"type": "none"}}


def partners() -> list[dict[str, Any]]:
    """The program's partners as POST /iop/partners takes them. Nothing reaches their .example servers: the outbox
    keeps what would go to them until `iop-fhir worker` tries."""
    return [
        _partner(
            INPATIENT_UNIT,
            "inpatient-unit",
            "Riverside Regional Inpatient Withdrawal Management Unit",
            "123450001",
            "https://fhir.riverside-regional.example/withdrawal-unit/R4",
        ),
        _partner(HOSPITAL_EHR, "hospital-ehr", HOSPITAL_NAME, "123450002", "https://ehr.riverside-regional.example/R4"),
        _partner(
            OUTPATIENT_CLINIC,
            "aftercare-provider",
            "Garden State Outpatient Counseling",
            "123450003",
            "https://fhir.garden-state-counseling.example/R4",
        ),
        _partner(
            PEER_PROGRAM,
            "aftercare-provider",
            "Harbor Peer Recovery Community Center",
            "123450004",
            "https://fhir.harbor-peer-recovery.example/R4",
        ),
    ]


def _clinician(name: str, number: str) -> dict[str, str]:
    return {"name": name, "npi": npi(number)}


COUNSELORS = [
    _clinician("Morgan Ellis, LCADC", "123456701"),
    _clinician("Jamie Castillo, LCADC", "123456702"),
    _clinician("Riley Okafor, LPC", "123456703"),
]
THERAPIST = _clinician("Avery Lindqvist, LCSW", "123456704")
FAMILY_THERAPIST = _clinician("Casey Moreau, LMFT", "123456705")
PSYCHIATRIST = _clinician("Priyanka Raman, MD", "123456706")
PHYSICIAN = _clinician("Samuel Adeyemi, MD", "123456707")
PEER_SPECIALIST = _clinician("Toni Alvarez, CPRS", "123456708")
ART_THERAPIST = _clinician("Quinn Harper, ATR-BC", "123456709")

# -- people ------------------------------------------------------------------------------------------------------

GIVEN = {
    "female": "Maria Ashley Jessica Tanisha Keisha Emily Rosa Danielle Megan Nicole Lauren Gabriela Aaliyah".split(),
    "male": "James Michael Carlos Anthony Darnell Kevin Jose Tyler Brandon Marcus Justin Luis Andre Ryan".split(),
}
FAMILY = (
    "Alvarez Bennett Caldwell Dominguez Ellison Fitzgerald Gallagher Hernandez Iverson Jennings Kowalski Lombardi "
    "Mendoza Nowak O'Brien Patel Quinlan Ramirez Sullivan Thornton Underwood Vasquez Whitaker Yamamoto Zielinski "
    "Brooks Santiago Murphy"
).split()
TOWNS = [("Clifton", "07011"), ("Passaic", "07055"), ("Paterson", "07501"), ("Garfield", "07026")]
TOWNS += [("Nutley", "07110"), ("Bloomfield", "07003"), ("Little Falls", "07424"), ("Wayne", "07470")]
STREETS = "Grove St|Main Ave|Van Houten Ave|Broad St|Lakeview Ave|Allwood Rd|Market St|Valley Rd".split("|")
# Support contacts, and whether they join family sessions.
CONTACTS = [("spouse", True), ("domestic-partner", True), ("parent", True), ("sibling", True)]
CONTACTS += [("sponsor", False), ("friend", False), ("case-worker", False)]

# Primary substance: diagnosis, the screen analytes that show its use, how it was used, and its name in a goal.
SUBSTANCES: dict[str, dict[str, Any]] = {
    "fentanyl": {
        "diagnosis": ("F11.20", "Opioid dependence, uncomplicated"),
        "analytes": ["fentanyl", "xylazine"],
        "use": ("fentanyl", "daily", "intranasal"),
        "goal": "opioids",
    },
    "heroin": {
        "diagnosis": ("F11.20", "Opioid dependence, uncomplicated"),
        "analytes": ["opiates", "6-mam", "fentanyl"],
        "use": ("heroin", "daily", "injection"),
        "goal": "opioids",
    },
    "alcohol": {
        "diagnosis": ("F10.20", "Alcohol dependence, uncomplicated"),
        "analytes": ["ethyl-glucuronide"],
        "use": ("alcohol", "daily", "oral"),
        "goal": "alcohol",
    },
    "cocaine": {
        "diagnosis": ("F14.20", "Cocaine dependence, uncomplicated"),
        "analytes": ["cocaine"],
        "use": ("cocaine", "several-times-a-week", "intranasal"),
        "goal": "cocaine",
    },
    "methamphetamine": {
        "diagnosis": ("F15.20", "Other stimulant dependence, uncomplicated"),
        "analytes": ["methamphetamine", "amphetamines"],
        "use": ("methamphetamine", "daily", "smoked"),
        "goal": "methamphetamine",
    },
    "cannabis": {
        "diagnosis": ("F12.20", "Cannabis dependence, uncomplicated"),
        "analytes": ["cannabinoids"],
        "use": ("cannabis", "daily", "smoked"),
        "goal": "cannabis",
    },
}
SUBSTANCE_WEIGHTS = {"fentanyl": 28, "heroin": 8, "alcohol": 34, "cocaine": 12, "methamphetamine": 6, "cannabis": 12}
CO_OCCURRING = {
    "depression": ("F33.1", "Major depressive disorder, recurrent, moderate", 0.35),
    "anxiety": ("F41.1", "Generalized anxiety disorder", 0.25),
    "ptsd": ("F43.10", "Post-traumatic stress disorder, unspecified", 0.12),
}
NICOTINE = ("F17.210", "Nicotine dependence, cigarettes, uncomplicated")
# The urine panel of every weekly screen; the patient's own substances are added to it.
PANEL = ["ethyl-glucuronide", "opiates", "fentanyl", "buprenorphine", "cocaine", "cannabinoids"]
TRIGGERS = (
    "work stress|conflict at home|payday|being alone in the evening|the old neighborhood|chronic back pain|"
    "social events with drinking|boredom on weekends|grief|poor sleep"
).split("|")
WARNING_SIGNS = "skipping meetings|isolating from family|romanticizing past use|not sleeping|stopping medication"
COPING = "call sponsor|urge surfing|leave the situation early|attend an extra meeting|text the peer line|take a walk"
WARNING_SIGN_LIST, COPING_LIST = WARNING_SIGNS.split("|"), COPING.split("|")

# -- the week's schedule -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Track:
    """A track meets three days a week for three-hour blocks (ASAM 2.1: at least 9 hours a week)."""

    days: tuple[int, int, int]  # weekdays, Monday 0
    block: tuple[time, time]
    individual: time  # individual counseling, 50 minutes, on the second day
    family: time  # family sessions, 60 minutes, on the second day


TRACKS = (
    Track((0, 2, 4), (time(9), time(12)), individual=time(12, 30), family=time(13)),
    Track((0, 1, 3), (time(17, 30), time(20, 30)), individual=time(16, 15), family=time(16)),
)
CBT = (
    "identifying triggers and high-risk situations|challenging automatic thoughts|managing cravings|"
    "problem solving without substances|building a daily structure|assertive refusal skills|coping with boredom|"
    "reviewing the relapse prevention plan"
).split("|")
DBT = "distress tolerance: TIPP skills|emotion regulation: opposite action|wise mind|interpersonal effectiveness"
DBT_TOPICS = DBT.split("|")
PSYCHOEDUCATION = (
    "how substances change the brain|overdose prevention and naloxone|sleep and recovery|"
    "medications for addiction treatment|nutrition in early recovery|post-acute withdrawal"
).split("|")
THIRD_BLOCK = [
    ("relapse-prevention", "warning signs of relapse"),
    ("motivational-interviewing", "values and goals"),
    ("acceptance-commitment", "accepting cravings without acting on them"),
    ("twelve-step-facilitation", "finding a home group"),
]
HOLISTIC = [("mindfulness", "body scan and breathing"), ("yoga", "gentle yoga for stress")]
HOLISTIC += [("art-therapy", "drawing the road of recovery")]
NOTES = {
    "attended": [
        "Participated actively; named two coping strategies for cravings.",
        "Shared about a high-risk situation this week and how it was handled.",
        "Quiet in the first hour, engaged in the role play.",
        "Gave feedback to peers; reports better sleep.",
    ],
    "late": ["Arrived 20 minutes late (bus); engaged once present."],
    "left-early": ["Left at the break for a work shift; reviewed the missed material by phone."],
    "no-show": ["Did not attend and did not call; outreach call left a voicemail."],
    "excused-absence": ["Called ahead: medical appointment."],
}
# Goal outcomes at discharge, by discharge reason.
OUTCOMES = {
    "completed": dict(abstinence="achieved", triggers="achieved", attendance="achieved", cravings="achieved"),
    "stepped-down": dict(abstinence="sustaining", triggers="achieved", attendance="achieved", cravings="achieved"),
    "transferred": dict(abstinence="worsening", triggers="in-progress", attendance="achieved", cravings="worsening"),
    "stepped-up": dict(abstinence="not-achieved", triggers="in-progress", attendance="in-progress"),
    "against-advice": dict(abstinence="not-achieved", triggers="in-progress", attendance="not-achieved"),
}
GOOD_OUTCOME = {"mood": "improving", "anxiety": "improving", "medication": "sustaining", "cravings": "achieved"}
POOR_OUTCOME = {"mood": "no-change", "anxiety": "no-change", "medication": "in-progress", "cravings": "worsening"}


def eastern(day: date, at: time) -> str:
    """A New Jersey wall-clock time as a FHIR dateTime: EDT (-04:00) from the second Sunday of March to the first
    Sunday of November, else EST (-05:00); computed, so that no time zone database is needed."""
    march, november = date(day.year, 3, 8), date(day.year, 11, 1)
    summer = (
        march + timedelta(days=(6 - march.weekday()) % 7)
        <= day
        < november + timedelta(days=(6 - november.weekday()) % 7)
    )
    return datetime.combine(day, at, tzinfo=timezone(timedelta(hours=-4 if summer else -5))).isoformat()


def _later(at: time, minutes: int) -> time:
    return (datetime.combine(START, at) + timedelta(minutes=minutes)).time()


# -- stories -----------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """An /iop record of an admitted patient's stay, without its enrollment_id; ``what`` names it in errors."""

    kind: str
    what: str
    payload: dict[str, Any]


@dataclass
class Story:
    """One referred patient: the referral, the decision on it and, once admitted, the stay's records in the order
    the program records them."""

    index: int
    mrn: str
    referred_on: date
    bundle: dict[str, Any]  # the inpatient unit's referral, a transaction Bundle
    decision: str  # admit, decline or no-show
    requested_start: date  # asked for by the inpatient unit
    planned_admission: date  # the Monday after it
    decline_reason: str | None = None
    enrollment: dict[str, Any] = field(default_factory=dict)  # the admission's enrollment record
    discharge_reason: str | None = None
    records: list[Record] = field(default_factory=list)
    # What the partner the discharge refers the patient to reports on its copy of the referral Task, oldest first
    # (status, BSeR business status, status reason, outputs, lastModified): what following it (exchange/followup.py)
    # copies onto our Task. Empty when the partner never answers (or never got the referral: no consent).
    aftercare_answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How errors name the patient: by the synthetic MRN only."""
        return f"patient {self.mrn}"


@dataclass(frozen=True)
class _Profile:
    """The clinical picture drawn with the person, which an admitted patient's records follow."""

    substance: str
    moud: str | None  # medication for opioid use disorder: buprenorphine, methadone or None
    co_occurring: list[str]


@dataclass
class _Stay:
    """What the records of one stay are drawn from."""

    rng: random.Random
    admission: date
    track: Track
    profile: _Profile
    secondary_cannabis: bool
    family: dict[str, Any] | None  # the support contact who joins family sessions
    counselor: dict[str, str]
    reason: str  # of the discharge
    partner: str | None  # the discharge refers the patient to it
    weeks: int  # in the program before discharge
    engagement: float  # chance of coming to a scheduled session
    triggers: list[str]


def build(*, patients: int, seed: int) -> list[Story]:
    """The referred patients in the order their referrals arrive: ``patients`` admitted, and a few more declined or
    not coming to their admission."""
    if patients < 1:
        raise ValueError(f"patients must be at least 1, got {patients}")
    program = random.Random(f"iop-fhir demo {seed}")
    declined, no_shows = max(1, round(patients * 0.08)), max(1, round(patients * 0.04))
    # The first referral is admitted, completes, and consents to everything: the full example.
    decisions = ["admit"] * (patients - 1) + ["decline"] * declined + ["no-show"] * no_shows
    program.shuffle(decisions)
    decisions.insert(0, "admit")
    reasons = _discharge_reasons(program, patients)
    # Some patients sign no consent to their aftercare provider (the transition waits, blocked); one signs it only
    # after discharge, which releases the transition then.
    others = list(range(1, patients))
    no_consent = set(program.sample(others, min(len(others), max(1, round(patients * 0.15)))))
    late = sorted(set(others) - no_consent)
    late_consent = program.choice(late) if late else -1
    spacing = 70 / len(decisions)  # referrals arrive through ten weeks
    stories: list[Story] = []
    admitted = 0
    for index, decision in enumerate(decisions):
        rng = random.Random(f"iop-fhir demo {seed} patient {index}")
        story, profile = _story(rng, seed, index, START + timedelta(days=int(index * spacing)), decision)
        if decision == "admit":
            consent = "none" if admitted in no_consent else "late" if admitted == late_consent else "before"
            _admit(story, profile, rng, reasons[admitted], aftercare_consent=consent)
            admitted += 1
        stories.append(story)
    # One partner in about twenty declines the referral it got (no opening soon enough, or the patient chose
    # another provider); the first patient's, the full example, is accepted.
    answered = [s for s in stories[1:] if s.aftercare_answers and _referred_to(s) in (OUTPATIENT_CLINIC, PEER_PROGRAM)]
    for story in program.sample(answered, min(len(answered), max(1, round(len(answered) * 0.05)))):
        story.aftercare_answers = [_declined(story, program)]
    return stories


def _discharge_reasons(rng: random.Random, patients: int) -> list[str]:
    """Mostly completed; at least one left against advice and one was transferred to inpatient care."""
    counts = [
        ("against-advice", max(1, round(patients * 0.12))),
        ("transferred", max(1, round(patients * 0.08))),
        ("stepped-down", round(patients * 0.08)),
        ("stepped-up", round(patients * 0.04)),
    ]
    places = rng.sample(range(1, patients), min(patients - 1, sum(n for _, n in counts)))
    reasons = ["completed"] * patients
    for reason, count in counts:
        for _ in range(count):
            if places:
                reasons[places.pop()] = reason
    return reasons


def _story(rng: random.Random, seed: int, index: int, referred_on: date, decision: str) -> tuple[Story, _Profile]:
    gender = rng.choice(["female", "male"])
    given, family = rng.choice(GIVEN[gender]), rng.choice(FAMILY)
    mrn = f"DEMO{seed}-{index + 1:04d}"
    town, postal = rng.choice(TOWNS)
    substance = rng.choices(list(SUBSTANCE_WEIGHTS), weights=list(SUBSTANCE_WEIGHTS.values()))[0]
    moud = None
    if SUBSTANCES[substance]["goal"] == "opioids":
        moud = rng.choices(["buprenorphine", "methadone", None], weights=[70, 15, 15])[0]
    profile = _Profile(substance, moud, [c for c, (_, _, chance) in CO_OCCURRING.items() if rng.random() < chance])
    patient: dict[str, Any] = {
        "identifiers": [{"system": MRN_SYSTEM, "value": mrn, "assigner": HOSPITAL_NAME}],
        "name": {"given": [given], "family": family},
        "birth_date": date(rng.randint(1962, 2004), rng.randint(1, 12), rng.randint(1, 28)).isoformat(),
        "gender": gender,
        "phone": _phone(rng),
        "address": {
            "line": [f"{rng.randint(2, 480)} {rng.choice(STREETS)}"],
            "city": town,
            "state": "NJ",
            "postal_code": postal,
        },
    }
    if rng.random() < 0.4:
        patient["email"] = f"{given}.{family}{index + 1}@example.com".lower().replace("'", "")
    diagnoses = [_diagnosis(SUBSTANCES[substance]["diagnosis"], "primary")]
    diagnoses += [_diagnosis(CO_OCCURRING[c][:2], "co-occurring") for c in profile.co_occurring]
    if rng.random() < 0.45:
        diagnoses.append(_diagnosis(NICOTINE, "co-occurring"))
    requested = referred_on + timedelta(days=rng.randint(3, 5))
    planned = requested + timedelta(days=(7 - requested.weekday()) % 7)  # Monday, the weekly intake day
    story = Story(
        index=index,
        mrn=mrn,
        referred_on=referred_on,
        bundle=_referral_bundle(rng, patient, diagnoses, profile, referred_on, requested),
        decision=decision,
        requested_start=requested,
        planned_admission=planned,
    )
    if decision == "decline":
        story.decline_reason = rng.choice(
            [
                "Needs residential treatment (ASAM 3.5): no stable housing after discharge",
                "Lives outside the program's service area; referred to an IOP near home",
                "Medical needs exceed what the program provides; referred to partial hospitalization (ASAM 2.5)",
            ]
        )
    contacts = []
    for relationship, joins in rng.sample(CONTACTS, rng.choice([1, 1, 2])):
        relative = relationship in ("spouse", "parent", "sibling")
        name = f"{rng.choice(GIVEN[rng.choice(['female', 'male'])])} {family if relative else rng.choice(FAMILY)}"
        contact = {"relationship": relationship, "name": name, "phone": _phone(rng)}
        contacts.append({**contact, "family_sessions": True} if joins else contact)
    story.enrollment = {
        "patient": patient,
        "program": "adult-co-occurring" if profile.co_occurring else "adult-sud",
        "level_of_care": "2.1",
        "admission_date": planned.isoformat(),
        "referral": {"source": "withdrawal-management"},
        "diagnoses": diagnoses,
        "support_contacts": contacts,
        "candidacy": {
            "stable_housing": True,
            "manages_own_medications": True,
            "has_transportation": rng.random() < 0.85,
            "needs_24h_supervision": False,
            "needs_medical_detox": False,
        },
    }
    return story, profile


def _phone(rng: random.Random) -> str:
    return f"+1-{rng.choice(['973', '862', '201'])}-555-01{rng.randint(0, 99):02d}"


def _diagnosis(code: tuple[str, ...], role: str) -> dict[str, str]:
    return {"system": "icd-10-cm", "code": code[0], "display": code[1], "role": role}


def _coded(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": f"http://terminology.hl7.org/CodeSystem/{system}", "code": code}]}


def _referral_bundle(
    rng: random.Random,
    patient: dict[str, Any],
    diagnoses: list[dict[str, str]],
    profile: _Profile,
    referred_on: date,
    requested: date,
) -> dict[str, Any]:
    """The referral as the inpatient unit sends it (../shared/contract/inbound-referral-bundle.json): its Patient and
    ServiceRequest, each created only if not there yet, the diagnoses, and the Task asking the program to fulfil it."""
    mrn = patient["identifiers"][0]["value"]
    reference = f"REF-{mrn}"

    def urn(role: str) -> str:
        return f"urn:uuid:{uuid.uuid5(ids.NAMESPACE, f'demo referral {mrn} {role}')}"

    requester = {"identifier": {"system": PARTNER_SYSTEM, "value": INPATIENT_UNIT}, "display": partners()[0]["name"]}
    authored = eastern(referred_on, time(rng.randint(9, 16), rng.choice([0, 15, 30, 45])))
    detox_days = rng.randint(4, 7)
    notes = [f"Completed {detox_days}-day medically managed withdrawal ({SUBSTANCES[profile.substance]['use'][0]})."]
    if profile.moud:
        dose = "16 mg" if profile.moud == "buprenorphine" else "60 mg"
        notes.append(f"Started {profile.moud} {dose} daily on {(referred_on - timedelta(days=2)).isoformat()}.")
    notes.append(rng.choice(["Lives with family.", "Lives alone; stable housing.", "Staying with a sibling."]))
    conditions = [
        {
            "fullUrl": urn(f"condition {n}"),
            "resource": {
                "resourceType": "Condition",
                "clinicalStatus": _coded("condition-clinical", "active"),
                "verificationStatus": _coded("condition-ver-status", "confirmed"),
                "category": [_coded("condition-category", "encounter-diagnosis")],
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", **_display(dx)}]},
                "subject": {"reference": urn("patient")},
                "recordedDate": (referred_on - timedelta(days=detox_days)).isoformat(),
            },
            "request": {"method": "POST", "url": "Condition"},
        }
        for n, dx in enumerate(diagnoses)
    ]
    address = patient["address"]
    person = {
        "resourceType": "Patient",
        "identifier": [{"system": MRN_SYSTEM, "value": mrn, "assigner": {"display": HOSPITAL_NAME}}],
        "name": [{"family": patient["name"]["family"], "given": patient["name"]["given"]}],
        "gender": patient["gender"],
        "birthDate": patient["birth_date"],
        "telecom": [{"system": "phone", "value": patient["phone"], "use": "mobile"}],
        "address": [
            {"line": address["line"], "city": address["city"], "state": "NJ", "postalCode": address["postal_code"]}
        ],
    }
    service_request = {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": REFERRAL_SYSTEM, "value": reference}],
        "status": "active",
        "intent": "order",
        "category": [
            {"coding": [{"system": "http://snomed.info/sct", "code": "3457005", "display": "Patient referral"}]}
        ],
        "code": {
            "coding": [
                {
                    "system": "http://snomed.info/sct",
                    "code": "1254709001",
                    "display": "Referral to substance use disorder treatment program",
                }
            ],
            "text": "Step-down to intensive outpatient program (ASAM 2.1)",
        },
        "subject": {"reference": urn("patient")},
        "authoredOn": authored,
        "occurrencePeriod": {"start": requested.isoformat()},
        "requester": requester,
        "reasonReference": [{"reference": c["fullUrl"]} for c in conditions],
        "note": [{"text": " ".join(notes)}],
    }
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "focus": {"reference": urn("service-request")},
        "for": {"reference": urn("patient")},
        "authoredOn": authored,
        "requester": requester,
        "owner": {"display": PROGRAM_NAME},
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(urn("patient"), person, f"identifier={MRN_SYSTEM}|{mrn}"),
            *conditions,
            _entry(urn("service-request"), service_request, f"identifier={REFERRAL_SYSTEM}|{reference}"),
            _entry(urn("task"), task, None),
        ],
    }


def _display(diagnosis: dict[str, str]) -> dict[str, str]:
    return {"code": diagnosis["code"], "display": diagnosis["display"]}


def _entry(full_url: str, resource: dict[str, Any], if_none_exist: str | None) -> dict[str, Any]:
    request = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": full_url, "resource": resource, "request": request}


# -- an admitted patient's stay ----------------------------------------------------------------------------------


def _admit(story: Story, profile: _Profile, rng: random.Random, reason: str, *, aftercare_consent: str) -> None:
    family = next((c for c in story.enrollment["support_contacts"] if c.get("family_sessions")), None)
    weeks = {"completed": WEEKS, "stepped-down": WEEKS - 2}.get(reason) or rng.randint(3, 6)
    stay = _Stay(
        rng=rng,
        admission=story.planned_admission,
        track=rng.choice(TRACKS),
        profile=profile,
        secondary_cannabis=profile.substance != "cannabis" and rng.random() < 0.25,
        family=family,
        counselor=rng.choice(COUNSELORS),
        reason=reason,
        partner=_aftercare_partner(reason, rng),
        weeks=weeks,
        engagement={"completed": 0.93, "stepped-down": 0.95}.get(reason, 0.82),
        triggers=rng.sample(TRIGGERS, 3),
    )
    story.discharge_reason = reason
    records = story.records
    # Most patients let the program tell the referring unit of the admission (and send them back if needed); for
    # the others the admission notice waits in the outbox, blocked.
    if story.index == 0 or rng.random() < 0.85:
        records.append(Record("consent", "consent to the inpatient unit", _consent(INPATIENT_UNIT, stay.admission)))
    if story.index == 0 or rng.random() < 0.5:
        consent = _consent(HOSPITAL_EHR, stay.admission, scope="sud-records-except-counseling-notes")
        if story.index != 0 and rng.random() < 0.15:  # withdrawn in writing a few weeks later
            consent["revoked_on"] = (stay.admission + timedelta(days=rng.randint(14, 35))).isoformat()
        records.append(Record("consent", "consent to the hospital EHR", consent))
    records.append(Record("assessment", "intake assessment", _intake(stay)))
    if profile.moud:
        started = story.referred_on - timedelta(days=2)  # as the referral's note says
        records.append(Record("medication", f"{profile.moud} maintenance", _moud(profile.moud, started)))
    plan = _plan(stay)
    records.append(Record("treatment-plan", "treatment plan", plan))
    sessions = _sessions(stay)
    reassessed = False
    for session in sessions:
        day = date.fromisoformat(session["start"][:10])
        if not reassessed and day >= stay.admission + timedelta(weeks=4):
            records.append(Record("assessment", "reassessment in week 5", _reassessment(stay, day)))
            reassessed = True
        records.append(Record("session", f"{session['service']} session {session['start']}", session))
    discharge_day = date.fromisoformat(sessions[-1]["start"][:10])
    if reason in ("transferred", "stepped-up"):
        discharge_day += timedelta(days=1)
    elif reason == "against-advice":
        discharge_day += timedelta(days=3)  # once the outreach calls went unanswered
    to_aftercare = stay.partner in (OUTPATIENT_CLINIC, PEER_PROGRAM)
    if to_aftercare and aftercare_consent == "before":
        signed = discharge_day - timedelta(days=rng.randint(5, 12))
        records.append(Record("consent", f"consent to {stay.partner}", _consent(str(stay.partner), signed)))
    if reason in ("completed", "stepped-down"):
        records.append(Record("assessment", "discharge assessment", _exit(stay, discharge_day)))
    records.append(Record("discharge", "discharge", _discharge(stay, plan, sessions, discharge_day)))
    if to_aftercare and aftercare_consent == "late":
        # Signed at the first aftercare appointment: the transition waited, blocked, until then.
        signed = discharge_day + timedelta(days=6)
        records.append(Record("consent", f"consent to {stay.partner}", _consent(str(stay.partner), signed)))
    # The partner answers only a referral it got: one the patient consented to its receiving.
    if any(r.kind == "consent" and r.payload["recipient"] == stay.partner for r in records):
        late = discharge_day + timedelta(days=6) if to_aftercare and aftercare_consent == "late" else None
        story.aftercare_answers = _answers(stay, discharge_day, late)


def _moud(moud: str, started: date) -> dict[str, Any]:
    """The medication record of a patient on MOUD, started during withdrawal management: buprenorphine-naloxone
    prescribed by the program's physician, or methadone, which only an opioid treatment program may dispense for
    opioid use disorder (42 CFR 8.12), taken there daily and known to the program from the patient and the OTP."""
    indication = {"system": "icd-10-cm", "code": "F11.20", "display": "Opioid dependence, uncomplicated"}
    if moud == "buprenorphine":
        return {
            "medication": "buprenorphine-naloxone",
            "strength": "8 mg / 2 mg",
            "form": "sublingual-film",
            "dose": {"quantity": 2, "unit": "film", "frequency": 1, "period": 1, "period_unit": "d"},
            "indication": indication,
            "category": "moud",
            "status": "active",
            "start": started.isoformat(),
            "prescriber": PHYSICIAN,
            "source": "prescribed-by-program",
            "note": "Induction during inpatient withdrawal management; maintenance continued by the program.",
        }
    return {
        "medication": "methadone",
        "strength": "10 mg/mL",
        "form": "oral-solution",
        "dose": {"quantity": 60, "unit": "mg", "frequency": 1, "period": 1, "period_unit": "d"},
        "indication": indication,
        "category": "moud",
        "status": "active",
        "start": started.isoformat(),
        "source": "prescribed-elsewhere",
        "note": "Dosed daily at an opioid treatment program; doses coordinated with the program's physician.",
    }


BSER = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"  # exchange/followup.py
BUSINESS_STATUSES = {  # TaskBusinessStatusCS: the answers the demo's partners give
    "3.0": "Service Request Accepted",
    "4.0": "Service Request Declined",
    "5.1.1": "Service Request Event Scheduled",
    "5.1.2": "Scheduled Service Request Event Unattended",
    "5.1.4": "Service Request Event Completed",
}
DECLINE_REASONS = [
    "No opening for a new patient within the next four weeks; placed on the waiting list",
    "The patient chose a provider closer to home",
]


def _answer(status: str, code: str, moment: str, **more: Any) -> dict[str, Any]:
    """The partner's Task as it reports a step: its status, BSeR business status, when, and what more it says."""
    business = {"coding": [{"system": BSER, "code": code, "display": BUSINESS_STATUSES[code]}]}
    return {"status": status, "businessStatus": business, **more, "lastModified": moment}


def _visit(moment: str, text: str) -> dict[str, Any]:
    return {"type": {"text": text}, "valueDateTime": moment}


def _answers(stay: _Stay, discharge_day: date, consent_signed: date | None) -> list[dict[str, Any]]:
    """The partner's answers to the referral: accepted one to three days after discharge, the first visit scheduled and,
    for most, attended within the two weeks after discharge. The inpatient unit admits a transferred patient the day
    after. A few miss the first visit: most of those come to a second one, weeks later; a few are scheduled but had
    not come by the last report. A patient who consented only at the first appointment (``consent_signed``) is
    accepted and seen that day."""
    rng = stay.rng
    hour = time(rng.choice([9, 10, 11, 14, 15]), rng.choice([0, 30]))
    if consent_signed is not None:
        accepted = scheduled_on = visit = consent_signed
    elif stay.partner == INPATIENT_UNIT:
        accepted = scheduled_on = discharge_day
        visit = discharge_day + timedelta(days=1)
    else:
        accepted = discharge_day + timedelta(days=rng.choice([1, 1, 2, 3]))
        scheduled_on = accepted + timedelta(days=rng.choice([0, 1]))
        visit = scheduled_on + timedelta(days=rng.randint(2, 9))
    first = _visit(eastern(visit, hour), "first visit scheduled")
    answers = [
        _answer("accepted", "3.0", eastern(accepted, time(9, 40))),
        _answer("in-progress", "5.1.1", eastern(scheduled_on, time(11, 5)), output=[first]),
    ]
    fate = "attended" if consent_signed is not None or stay.partner == INPATIENT_UNIT else None
    fate = fate or rng.choices(["attended", "rescheduled", "pending"], weights=[86, 9, 5])[0]
    if fate == "pending":
        return answers
    if fate == "rescheduled":
        missed = eastern(visit, _later(hour, 120))
        answers.append(
            _answer("in-progress", "5.1.2", missed, output=[first], statusReason={"text": "did not come; called"})
        )
        rescheduled = eastern(visit + timedelta(days=1), time(11, 5))
        visit += timedelta(days=rng.randint(14, 21))
        first = _visit(eastern(visit, hour), "first visit rescheduled")
        answers.append(_answer("in-progress", "5.1.1", rescheduled, output=[first]))
    attended = _visit(eastern(visit, _later(hour, 5)), "first visit attended")
    answers.append(_answer("completed", "5.1.4", eastern(visit, _later(hour, 60)), output=[first, attended]))
    return answers


def _discharge_of(story: Story) -> dict[str, Any]:
    return next(r.payload for r in story.records if r.kind == "discharge")


def _referred_to(story: Story) -> str | None:
    """The partner an admitted patient's discharge refers the patient to."""
    referral: dict[str, Any] = _discharge_of(story).get("referral") or {}
    return referral.get("partner")


def _declined(story: Story, rng: random.Random) -> dict[str, Any]:
    """The partner's answer declining the referral, the day after discharge."""
    discharged = date.fromisoformat(_discharge_of(story)["discharge_date"])
    reason = {"text": rng.choice(DECLINE_REASONS)}
    return _answer("rejected", "4.0", eastern(discharged + timedelta(days=1), time(10, 15)), statusReason=reason)


def _aftercare_partner(reason: str, rng: random.Random) -> str | None:
    if reason == "transferred":
        return INPATIENT_UNIT  # back to withdrawal management
    if reason == "stepped-down":
        return OUTPATIENT_CLINIC
    if reason == "completed":
        return OUTPATIENT_CLINIC if rng.random() < 0.6 else PEER_PROGRAM
    return None


def _consent(recipient: str, signed: date, *, scope: str = "all-sud-records") -> dict[str, Any]:
    return {
        "recipient": recipient,
        "purposes": ["treatment", "care-coordination"],
        "scope": scope,
        "signed_on": signed.isoformat(),
        "expires_on": signed.replace(year=signed.year + CONSENT_YEARS).isoformat(),
    }


def _items(rng: random.Random, count: int, total: int) -> list[int]:
    """``count`` item scores of 0 to 3 adding up to ``total``."""
    items = [0] * count
    for _ in range(min(total, count * 3)):
        items[rng.choice([i for i in range(count) if items[i] < 3])] += 1
    return items


def _intake(stay: _Stay) -> dict[str, Any]:
    rng, profile = stay.rng, stay.profile
    depressed = "depression" in profile.co_occurring
    anxious = bool({"anxiety", "ptsd"} & set(profile.co_occurring))
    alcohol = profile.substance == "alcohol"
    substance, frequency, route = SUBSTANCES[profile.substance]["use"]
    last_use = stay.admission - timedelta(days=rng.randint(9, 14))
    use = [{"substance": substance, "frequency": frequency, "last_use": last_use.isoformat(), "route": route}]
    if stay.secondary_cannabis:
        last_use = stay.admission - timedelta(days=rng.randint(5, 20))
        use.append(
            {"substance": "cannabis", "frequency": "weekly", "last_use": last_use.isoformat(), "route": "smoked"}
        )
    return {
        "kind": "intake",
        "performed_at": eastern(stay.admission, _later(stay.track.block[0], -90)),
        "clinician": stay.counselor,
        "instruments": [
            {"instrument": "phq-9", "items": _items(rng, 9, rng.randint(12, 19) if depressed else rng.randint(3, 11))},
            {"instrument": "gad-7", "items": _items(rng, 7, rng.randint(10, 17) if anxious else rng.randint(2, 9))},
            {"instrument": "audit-c", "total_score": rng.randint(8, 12) if alcohol else rng.randint(0, 4)},
            {"instrument": "dast-10", "total_score": rng.randint(1, 3) if alcohol else rng.randint(6, 9)},
        ],
        "asam_dimensions": {
            "withdrawal": rng.randint(0, 1),
            "biomedical": rng.randint(0, 2),
            "emotional_behavioral": rng.randint(2, 3) if profile.co_occurring else rng.randint(1, 2),
            "readiness_to_change": rng.randint(1, 3),
            "relapse_potential": rng.randint(2, 3),
            "recovery_environment": rng.randint(1, 3),
        },
        "substance_use": use,
        "triggers": stay.triggers,
        "recommended_level_of_care": "2.1",
        "notes": rng.choice(
            [
                "Motivated for change after withdrawal management; ambivalent about mutual-help meetings.",
                "Engaged and goal-directed; names family as the main reason for treatment.",
                "Guarded at first, more open by the end of the interview; agrees to weekly drug screens.",
            ]
        ),
    }


def _reassessment(stay: _Stay, day: date) -> dict[str, Any]:
    rng = stay.rng
    struggling = stay.reason in ("against-advice", "transferred", "stepped-up")
    return {
        "kind": "reassessment",
        "performed_at": eastern(day, _later(stay.track.block[1], 15)),
        "clinician": stay.counselor,
        "instruments": [
            {"instrument": "phq-9", "total_score": rng.randint(9, 16) if struggling else rng.randint(3, 9)},
            {"instrument": "gad-7", "total_score": rng.randint(8, 14) if struggling else rng.randint(2, 8)},
        ],
        "recommended_level_of_care": "2.1",
        "notes": "Cravings rising; plan reviewed with the patient." if struggling else "Progressing; continue at 2.1.",
    }


def _exit(stay: _Stay, day: date) -> dict[str, Any]:
    rng = stay.rng
    return {
        "kind": "discharge",
        "performed_at": eastern(day, _later(stay.track.block[1], 15)),
        "clinician": stay.counselor,
        "instruments": [
            {"instrument": "phq-9", "total_score": rng.randint(1, 8)},
            {"instrument": "gad-7", "total_score": rng.randint(1, 7)},
            {"instrument": "audit-c", "total_score": rng.randint(0, 2)},
            {"instrument": "dast-10", "total_score": rng.randint(0, 2)},
        ],
        "asam_dimensions": {
            "withdrawal": 0,
            "biomedical": rng.randint(0, 1),
            "emotional_behavioral": rng.randint(0, 1),
            "readiness_to_change": rng.randint(0, 1),
            "relapse_potential": rng.randint(1, 2),
            "recovery_environment": rng.randint(0, 1),
        },
        "recommended_level_of_care": "1",
    }


def _goal(key: str, description: str, due: date, measure: str | None = None, target: float | None = None) -> Any:
    goal: dict[str, Any] = {"key": key, "description": description, "due": due.isoformat()}
    if measure is not None:
        goal["measure"] = measure
    if target is not None:
        goal["target"] = target
    return goal


def _every(service: str, weeks: int, minutes: int | None, goals: list[str], **more: Any) -> dict[str, Any]:
    """An intervention once every ``weeks`` weeks."""
    intervention = {"service": service, **more, "frequency": 1, "period": weeks, "period_unit": "wk"}
    if minutes is not None:
        intervention["minutes"] = minutes
    return {**intervention, "goals": goals} if goals else intervention


def _plan(stay: _Stay) -> dict[str, Any]:
    start, profile = stay.admission, stay.profile
    end = start + timedelta(weeks=WEEKS, days=-3)
    goals = [
        _goal("abstinence", f"Abstain from {SUBSTANCES[profile.substance]['goal']}", end, "negative-drug-screens"),
        _goal("triggers", "Identify three personal triggers and a coping plan for each", start + timedelta(weeks=4)),
        _goal("attendance", "Attend at least 90% of scheduled sessions", end, "attendance-rate", 0.9),
        _goal("cravings", "Keep craving at 3 or below on the 0-10 scale", end, "craving", 3),
    ]
    if "depression" in profile.co_occurring:
        goals.append(_goal("mood", "Reduce PHQ-9 total score below 10", end, "phq-9", 9))
    if "anxiety" in profile.co_occurring:
        goals.append(_goal("anxiety", "Reduce GAD-7 total score below 10", end, "gad-7", 9))
    if profile.moud:
        goals.append(_goal("medication", f"Take {profile.moud} as prescribed every day", end))
    mood = [g["key"] for g in goals if g["key"] in ("mood", "anxiety")]
    interventions = [
        _every("group-therapy", 1, 180, ["abstinence", "triggers"], approach="cbt", topic="CBT and DBT skills"),
        _every("group-therapy", 1, 180, ["abstinence", "cravings"], approach="relapse-prevention"),
        _every("psychoeducation", 2, 180, ["triggers"], topic="recovery education series"),
        _every("mindfulness", 2, 180, ["cravings"], topic="holistic group: mindfulness, yoga or art therapy"),
        _every(
            "individual-counseling",
            2 if stay.family else 1,
            50,
            ["abstinence", "attendance", *mood],
            approach="motivational-interviewing",
        ),
        _every("drug-testing", 1, None, ["abstinence"], specimen="urine"),
    ]
    if stay.family:
        interventions.append(_every("family-therapy", 2, 60, [], participants=[stay.family["relationship"]]))
    if profile.moud:
        interventions.append(_every("medication-management", 4, 20, ["medication", "cravings"]))
    care_team = [
        {"role": "primary-counselor", **stay.counselor},
        {"role": "therapist", **THERAPIST},
        {"role": "peer-recovery-specialist", **PEER_SPECIALIST},
    ]
    if profile.co_occurring:
        care_team.append({"role": "psychiatrist", **PSYCHIATRIST})
    if profile.moud:
        care_team.append({"role": "physician", **PHYSICIAN})
    if stay.family:
        care_team.append({"role": "family-therapist", **FAMILY_THERAPIST})
    return {
        "status": "active",
        "period": {"start": start.isoformat(), "end": end.isoformat()},
        "goals": goals,
        "interventions": interventions,
        "care_team": care_team,
    }


def _sessions(stay: _Stay) -> list[dict[str, Any]]:
    """The stay's sessions in time order. Each week: three group blocks (CBT or DBT skills; psychoeducation or a
    holistic group in alternate weeks; relapse prevention and related approaches), individual counseling (every
    other week when the family joins sessions in the weeks between), medication management every four weeks with
    MOUD, and a urine drug screen at the first block attended in person."""
    rng, track = stay.rng, stay.track
    begin, end = track.block
    sessions: list[dict[str, Any]] = []
    craving = rng.randint(4, 8)
    for week in range(stay.weeks):
        days = [stay.admission + timedelta(weeks=week, days=d) for d in track.days]
        last = week == stay.weeks - 1
        lapse = rng.random() < _lapse_chance(stay, week)
        craving = max(0, min(10, craving - 1 + rng.randint(-1, 1) + (3 if lapse else 0)))
        even = week % 2 == 0
        second = (
            {"service": "psychoeducation", "topic": PSYCHOEDUCATION[week // 2 % len(PSYCHOEDUCATION)]}
            if even
            else dict(zip(("service", "topic"), HOLISTIC[week // 2 % len(HOLISTIC)], strict=True))
        )
        approach, topic = THIRD_BLOCK[week % len(THIRD_BLOCK)]
        blocks = [
            {"service": "group-therapy", "approach": "cbt", "topic": CBT[week % len(CBT)]}
            if even
            else {"service": "group-therapy", "approach": "dbt", "topic": DBT_TOPICS[week // 2 % len(DBT_TOPICS)]},
            second,
            {"service": "group-therapy", "approach": approach, "topic": topic},
        ]
        week_sessions = []
        screened = False
        for slot, (day, block) in enumerate(zip(days, blocks, strict=True)):
            leader = ART_THERAPIST if block["service"] == "art-therapy" else stay.counselor if slot == 0 else THERAPIST
            session = _session(stay, day, (begin, end), leader, block, craving, last)
            if not screened and session["attendance"] in ("attended", "late") and session["modality"] == "in-person":
                session["drug_screen"] = _drug_screen(stay, day, begin, lapse, week)
                screened = True
            week_sessions.append(session)
        if stay.family and not even:
            block = {"service": "family-therapy", "topic": "communication and support at home"}
            slot_time = (track.family, _later(track.family, 60))
            week_sessions.append(
                _session(stay, days[1], slot_time, FAMILY_THERAPIST, block, craving, last, remote=("telehealth", 0.4))
            )
        elif not last or stay.reason == "completed":
            block = {"service": "individual-counseling", "approach": "motivational-interviewing"}
            slot_time = (track.individual, _later(track.individual, 50))
            week_sessions.append(
                _session(stay, days[1], slot_time, stay.counselor, block, craving, last, remote=("telephone", 0.3))
            )
        if stay.profile.moud and week % 4 == 1:
            block = {"service": "medication-management", "topic": f"{stay.profile.moud} dose review"}
            slot_time = (_later(begin, -40), _later(begin, -20))
            week_sessions.append(
                _session(stay, days[2], slot_time, PHYSICIAN, block, craving, last, remote=("telehealth", 0.25))
            )
        sessions.extend(sorted(week_sessions, key=lambda s: str(s["start"])))
    return sessions


def _lapse_chance(stay: _Stay, week: int) -> float:
    """The chance of use in a week of the stay: falling for those who do well, rising before a transfer or a step
    up, steady for those who leave against advice."""
    if stay.reason in ("completed", "stepped-down"):
        return float(0.3 * 0.55**week)
    if stay.reason in ("transferred", "stepped-up"):
        return 0.85 if week >= stay.weeks - 2 else 0.2
    return 0.35


def _session(
    stay: _Stay,
    day: date,
    times: tuple[time, time],
    facilitator: dict[str, str],
    block: dict[str, str],
    craving: int,
    last_week: bool,
    remote: tuple[str, float] = ("telehealth", 0.08),
) -> dict[str, Any]:
    rng = stay.rng
    modality = remote[0] if rng.random() < remote[1] else "in-person"
    if day in HOLIDAYS:
        attendance = "cancelled-by-program"
    elif stay.reason == "against-advice" and last_week:
        attendance = "no-show"  # had stopped coming before the discharge
    elif rng.random() < stay.engagement:
        attendance = rng.choices(["attended", "late", "left-early"], weights=[90, 6, 4])[0]
    else:
        attendance = rng.choices(["no-show", "excused-absence"], weights=[55, 45])[0]
    session: dict[str, Any] = {
        **block,
        "start": eastern(day, times[0]),
        "end": eastern(day, times[1]),
        "modality": modality,
        "attendance": attendance,
        "facilitator": facilitator,
    }
    if attendance in ("attended", "late", "left-early"):
        session["craving_score"] = max(0, min(10, craving + rng.randint(-1, 1)))
    if attendance in NOTES:
        session["progress_note"] = rng.choice(NOTES[attendance])
    return session


def _drug_screen(stay: _Stay, day: date, begin: time, lapse: bool, week: int) -> dict[str, Any]:
    rng, profile = stay.rng, stay.profile
    own = SUBSTANCES[profile.substance]["analytes"]
    analytes = PANEL + [a for a in [*own, *([profile.moud] if profile.moud == "methadone" else [])] if a not in PANEL]
    used = set(own) if lapse else set()
    if "xylazine" in used and rng.random() < 0.5:
        used.discard("xylazine")  # not every lapse is with adulterated fentanyl
    if stay.secondary_cannabis and week < 2:
        used.add("cannabinoids")  # detectable for weeks after regular use
    results = [{"analyte": a, "result": "positive" if a in used or a == profile.moud else "negative"} for a in analytes]
    return {"specimen": "urine", "collected_at": eastern(day, _later(begin, 10)), "results": results}


def _discharge(stay: _Stay, plan: dict[str, Any], sessions: list[dict[str, Any]], day: date) -> dict[str, Any]:
    rng, moud = stay.rng, stay.profile.moud
    scheduled = [s for s in sessions if s["attendance"] != "cancelled-by-program"]
    attended = [s for s in scheduled if s["attendance"] in ("attended", "late", "left-early")]
    screens = [s["drug_screen"]["results"] for s in sessions if "drug_screen" in s]
    clean = [r for r in screens if all(x["result"] == "negative" or x["analyte"] == moud for x in r)]
    tally = f"attended {len(attended)} of {len(scheduled)} scheduled sessions; {len(clean)} of {len(screens)} drug "
    tally += "screens negative" + (f" apart from prescribed {moud}" if moud else "")
    summary = {
        "completed": f"Completed {WEEKS} weeks of IOP; {tally}.",
        "stepped-down": f"Met treatment goals early; stepped down to outpatient care in week {stay.weeks}; {tally}.",
        "transferred": f"Relapse with daily use in week {stay.weeks}; transferred for medically monitored withdrawal "
        f"management (ASAM 3.7). Before the relapse: {tally}.",
        "stepped-up": f"Rising cravings and repeated use in the last two weeks; stepped up to partial hospitalization "
        f"(ASAM 2.5) after {stay.weeks} weeks; {tally}.",
        "against-advice": f"Stopped attending in week {stay.weeks} and left against clinical advice; outreach by phone "
        f"and letter; declined a referral to outpatient care. Until then: {tally}.",
    }[stay.reason]
    doing_well = stay.reason in ("completed", "stepped-down")
    outcomes = {**(GOOD_OUTCOME if doing_well else POOR_OUTCOME), **OUTCOMES[stay.reason]}
    if stay.reason == "completed" and len(attended) < 0.9 * len(scheduled):
        outcomes["attendance"] = "not-achieved"
    if stay.reason == "completed" and len(clean) < len(screens) - 1:
        outcomes["abstinence"] = "improving"
    relapse_plan: dict[str, Any] = {
        "triggers": stay.triggers,
        "warning_signs": rng.sample(WARNING_SIGN_LIST, 2),
        "coping_strategies": rng.sample(COPING_LIST, 3),
    }
    if stay.family:
        relapse_plan["emergency_contacts"] = [{k: stay.family[k] for k in ("name", "relationship", "phone")}]
    continuing: dict[str, Any] = {"relapse_prevention_plan": relapse_plan}
    level = {"transferred": "3.7", "stepped-up": "2.5", "against-advice": None}.get(stay.reason, "1")
    if level is not None:
        continuing["level_of_care"] = level
    if doing_well:
        meeting = "Alcoholics Anonymous" if stay.profile.substance == "alcohol" else "Narcotics Anonymous"
        mutual_help = rng.choice([("support-group", "SMART Recovery"), ("twelve-step", f"{meeting} home group")])
        services = [_continuing("outpatient-sud-counseling", None, 1, "wk"), _continuing(*mutual_help, 3, "wk")]
        if stay.partner == PEER_PROGRAM:
            services.append(_continuing("peer-support", "recovery coaching", 1, "wk"))
        if moud:
            services.append(_continuing("medication-management", f"{moud} maintenance", 1, "mo"))
        continuing["services"] = services
    discharge: dict[str, Any] = {
        "discharge_date": day.isoformat(),
        "reason": stay.reason,
        "summary": summary,
        "goal_outcomes": [{"goal": g["key"], "status": outcomes[g["key"]]} for g in plan["goals"]],
        "continuing_care": continuing,
    }
    referral = {
        INPATIENT_UNIT: ("intake-assessment", "Admission for medically monitored withdrawal (ASAM 3.7)", "urgent"),
        OUTPATIENT_CLINIC: ("outpatient-sud-counseling", "Step-down to ASAM level 1 outpatient counseling", "routine"),
        PEER_PROGRAM: ("peer-support", "Recovery coaching and peer support after IOP", "routine"),
    }.get(stay.partner or "")
    if referral is not None:
        service, why, priority = referral
        discharge["referral"] = {"partner": stay.partner, "service": service, "reason": why, "priority": priority}
    return discharge


def _continuing(service: str, name: str | None, frequency: int, unit: str) -> dict[str, Any]:
    """A continuing-care service, ``frequency`` times a ``unit``."""
    found: dict[str, Any] = {"service": service, "frequency": frequency, "period": 1, "period_unit": unit}
    return {**found, "name": name} if name else found
