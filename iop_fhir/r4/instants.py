"""Server time in the three shapes the API uses: integer microseconds (stored), FHIR instants, HTTP dates."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_us() -> int:
    return time.time_ns() // 1000


def instant(us: int) -> str:
    """A FHIR instant (https://hl7.org/fhir/R4/datatypes.html#instant) in UTC with microseconds."""
    # Integer arithmetic: a float timestamp would round some microseconds away.
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(us: int) -> str:
    """An RFC 9110 IMF-fixdate (``Sun, 22 Nov 2026 10:09:40 GMT``), independent of the locale."""
    t = time.gmtime(us // 1_000_000)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )
