"""ULIDs: sortable by creation time, unique without coordination between processes."""

from __future__ import annotations

import os
import threading
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_last = [0, 0]  # (ms, random part) of this process's newest ULID
_lock = threading.Lock()


def new_ulid(ms: int | None = None) -> str:
    """A 26-character ULID: 48 bits of milliseconds, then 80 random bits. Monotonic within a
    process: a second ULID in the same millisecond is the first plus one, so ids sort in the
    order they were made (the tie-break of rows stamped in the same millisecond, on SQLite and
    PostgreSQL alike)."""
    rand = int.from_bytes(os.urandom(10), "big")
    if ms is None:
        with _lock:
            now = int(time.time() * 1000)
            if now <= _last[0] and _last[1] + 1 < 1 << _RANDOM_BITS:
                now, rand = _last[0], _last[1] + 1
            _last[0], _last[1] = now, rand
        ms = now
    value = (ms << _RANDOM_BITS) | rand
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))
