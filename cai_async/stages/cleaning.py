"""Strip the wrapper text small models put around a revision ("Sure, here is the revised response:", the
revision request quoted back, surrounding quotes). The caller records that it happened; nothing is silent."""

from __future__ import annotations

import re

__all__ = ["NO_ISSUES_PATTERN", "clean_revision"]

_LEAD_INS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^(?:sure|certainly|of course|okay|ok|absolutely)\b[,.!]*\s*(?=here|below|this is|i(?:'ve| have) )",
        r"^i(?:'ve| have) (?:revised|rewritten|edited|updated|amended)\b[^:\n]{0,80}:\s*",
        r"^(?:here(?:'s| is)|below is|this is)\s+(?:a|an|the|my)?\s*(?:revised|rewritten|new|updated|improved|"
        r"edited|amended|modified|safer|better)\b[^:\n]{0,80}:\s*",
        r"^(?:revised|rewritten|new|updated|improved|edited|amended)\s+(?:response|answer|version|reply|text)"
        r"\s*:\s*",
        r"^(?:revision|response|answer|assistant)\s*:\s*",
        r"^[^\n]{0,200}?\b(?:revised|rewritten|updated|improved|amended|edited) (?:version|response|answer|reply)"
        r"\b[^\n:]{0,40}:\s*",
    )
]
_QUOTES = {'"': '"', "“": "”", "'": "'"}

NO_ISSUES_PATTERN = (
    r"\b(?:no (?:further )?(?:changes?|revisions?|edits?|issues?|problems?|concerns?) (?:are |is )?"
    r"(?:needed|required|necessary|found)|nothing (?:to (?:fix|change|revise|improve)|harmful)|"
    r"(?:does not|doesn't) (?:contain|include) anything (?:harmful|inappropriate|problematic))"
)
"""Default early-stop rule: the critique says the response needs no change."""


def _strip_request(text: str, request: str) -> tuple[str, bool]:
    """Drop a first line that repeats the revision request (possibly prefixed "Revision request:")."""
    first, _, rest = text.partition("\n")
    label = re.sub(r"^(?:revision request|request)\s*:\s*", "", first.strip(), flags=re.IGNORECASE)
    if rest.strip() and label and (label.lower() in request.lower() or request.lower() in label.lower()):
        return rest.lstrip(), True
    return text, False


def clean_revision(text: str, revision_request: str) -> tuple[str, bool]:
    """The revision without wrapper text, and whether anything was removed."""
    original = text
    text = text.strip()
    text, _ = _strip_request(text, revision_request)
    changed = True
    while changed:
        changed = False
        for pattern in _LEAD_INS:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped.lstrip(), True
    if len(text) >= 2 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]) and text.count(text[0]) <= 2:
        text = text[1:-1].strip()
    return text, text != original.strip()
