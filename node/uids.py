"""Short UIDs: what people read in tables and logs, and paste back into commands.

DICOM UIDs from one device or site share their root (``1.2.826.0.1.3680043.8.498.``) and
differ at the end, so the short form is the UID's tail. The CLI lengthens a tail until it is
unique among the UIDs it knows, and accepts any unique prefix or suffix back (with or without
the ``…`` it prints in front).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

#: Characters of a UID's tail shown in tables and logs (a 64-character UID does not fit 80 columns).
SHORT_LENGTH = 12
ELLIPSIS = "…"


def short_uid(uid: str | None, length: int = SHORT_LENGTH) -> str:
    """The UID's last ``length`` characters after ``…``; a UID that short stays whole."""
    if not uid:
        return ""
    return uid if len(uid) <= length + 1 else ELLIPSIS + uid[-length:]


def unique_short_uids(shown: Iterable[str], known: Iterable[str], length: int = SHORT_LENGTH) -> dict[str, str]:
    """A short form for each UID in ``shown`` that is a suffix of no other UID in ``known``."""
    others = set(known)
    tails = Counter(uid[-length:] for uid in others)
    result = {}
    for uid in shown:
        size = length
        # Only a tail shared with another UID (rare) needs the slow look at every UID.
        if tails[uid[-length:]] > (uid in others):
            while size < len(uid) - 1 and any(o != uid and o.endswith(uid[-size:]) for o in others):
                size += 4
        result[uid] = short_uid(uid, size)
    return result


def strip_short(text: str) -> str:
    """What a person pasted, without the leading ``…`` (or ``...``) of a short form."""
    text = text.strip()
    for mark in (ELLIPSIS, "..."):
        if text.startswith(mark):
            return text[len(mark):]
    return text


def matching_uids(fragment: str, known: Iterable[str]) -> list[str]:
    """UIDs in ``known`` equal to ``fragment``, else those it is a prefix or suffix of."""
    fragment = strip_short(fragment)
    known = list(known)
    if fragment in known:
        return [fragment]
    if not fragment:
        return []
    return sorted(uid for uid in known if uid.startswith(fragment) or uid.endswith(fragment))
