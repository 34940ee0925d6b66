"""Random ids for tasks and events: version-4 UUIDs in their 32-hex-digit form."""

from __future__ import annotations

import os


def random_ids(count: int) -> list[str]:
    """``count`` random version-4 UUIDs in their 32-hex-digit form, from one ``urandom`` call
    (``uuid.uuid4`` costs several microseconds each)."""
    raw = os.urandom(16 * count).hex()
    return [
        f"{raw[i : i + 12]}4{raw[i + 13 : i + 16]}{_VARIANT[raw[i + 16]]}{raw[i + 17 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


# The RFC 4122 variant: the top two bits of the 17th hex digit are 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def random_id() -> str:
    return random_ids(1)[0]
