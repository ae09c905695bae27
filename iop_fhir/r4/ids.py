"""The ids the server gives what it creates: UUIDs whose first 48 bits are the millisecond of their creation (the
layout of RFC 9562's version 7), the other 74 random. They are FHIR ids (https://hl7.org/fhir/R4/datatypes.html#id)
as unguessable as a version 4 UUID for anyone who does not know the millisecond, and they sort about as they were
made, so that a new row lands at the end of every index that leads with the id (the resources' and history's keys,
each search index's resource index, and after the value in each value index) rather than on a random page of it:
the pages a write dirties stay few however large the tables grow."""

from __future__ import annotations

import os

from iop_fhir.r4.instants import now_us


def time_ordered_id(at: int | None = None) -> str:
    """A new version 7 UUID for the microsecond ``at`` (now when None)."""
    millisecond = (now_us() if at is None else at) // 1000
    random = int.from_bytes(os.urandom(10), "big")
    value = (millisecond & (1 << 48) - 1) << 80 | 0x7 << 76 | (random >> 62 & 0xFFF) << 64 | 0b10 << 62
    text = f"{value | random & (1 << 62) - 1:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
