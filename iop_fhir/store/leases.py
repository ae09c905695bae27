"""Who holds a lease: outbox rows (exchange/worker.py) and export jobs (fhir/export.py) are leased to a named holder,
so that a row or job is never worked on by two processes at once and passes to another when its holder dies."""

from __future__ import annotations

import os
import socket
import uuid


def holder_name() -> str:
    """A name unique to this process and call: host, process id and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
