"""Undo the disguises that walk around the guard's rules tier, before its patterns and words are matched.

:func:`fold` is the clean view (NFKC, casefold, no invisible or control characters, no accents, homoglyphs to
ASCII Latin, one space between words); :func:`unleet` and :func:`join_split` undo leetspeak and split words on a
folded text; :func:`squeeze` keeps letters and digits only; :func:`decoded` finds texts hidden by base64, hex,
percent-encoding and rot13; :func:`views` is every distinct text the rules should be matched against.
Pure standard library; the tables are built once at import and the decoding is bounded in characters and spans.
"""

from __future__ import annotations

import binascii
import re
import unicodedata
import urllib.parse
from collections import Counter

__all__ = ["decoded", "fold", "join_split", "squeeze", "unleet", "views"]

_HOMOGLYPHS: dict[str, str] = dict(  # look-alikes to ASCII Latin; capitals are mapped before casefolding: Μ m, μ u
    zip(
        "аАвВьЬсСԁԀеЕгһҺнНіІјЈкКӏӀмМпоОрРԛԚѕЅтТуУүҮхХԝԜ"  # Cyrillic
        "αΑβΒγεΕΖηΗιΙκΚμΜνΝοΟρΡτΤυΥχΧωϲϹϳͿ"  # Greek
        "ıȷɑɡɩɨøØđĐħłŁƀŧօսհոց"  # Latin without a decomposition, Armenian
        "ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ",  # small capitals
        "aabbbbccddeerhhhhiijjkkllmmnooppqqssttyyyyxxww"
        "aabbyeeznhiikkumvnooppttuyxxwccjj"
        "ijagiiooddhllbtouhng"
        "abcdefghijklmnoprstuvwyz", strict=True)
)
for _start in (0x1F150, 0x1F170, 0x1F1E6):  # negative circled, negative squared, regional indicator letters
    _HOMOGLYPHS.update((chr(_start + i), chr(ord("a") + i)) for i in range(26))

_HIDDEN_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")  # Hangul fillers: letters that render as nothing
_DROPPED_CATEGORIES = frozenset({"Mn", "Me", "Cf", "Cs", "Co", "Cn"})
_CACHE_LIMIT = 1 << 16


def _fold_char(code: int) -> str | None:
    char = chr(code)
    if char in _HOMOGLYPHS:
        return _HOMOGLYPHS[char]
    category = unicodedata.category(char)
    if char in _HIDDEN_LETTERS or category in _DROPPED_CATEGORIES:
        return None
    if category == "Cc":
        return char if char in "\n\t" else (" " if char.isspace() else None)
    if category[0] == "Z" or char == "\u2800":  # separators (those NFKD leaves), braille blank
        return " "
    return char


class _FoldTable(dict[int, str | None]):
    """``str.translate`` table for NFKD text: filled lazily, one entry per distinct character (bounded)."""

    def __missing__(self, code: int) -> str | None:
        value = _fold_char(code)
        if len(self) < _CACHE_LIMIT:
            self[code] = value
        return value


_FOLD_TABLE = _FoldTable({code: _fold_char(code) for code in range(128)})
_FOLD_TABLE.update({ord(char): latin for char, latin in _HOMOGLYPHS.items()})


def _fold_raw(text: str) -> str:
    """:func:`fold` without collapsing whitespace (the spacing of letter-spaced words is kept)."""
    if text.isascii():
        return text.translate(_FOLD_TABLE).lower()
    folded = unicodedata.normalize("NFKD", text).translate(_FOLD_TABLE).casefold()
    return folded if folded.isascii() else unicodedata.normalize("NFC", folded)


def fold(text: str) -> str:
    """The clean view: NFKC, homoglyphs to ASCII Latin, casefolded, without zero-width, bidi, format or control
    characters and combining marks, every run of whitespace one space."""
    return " ".join(_fold_raw(text).split())


# unleet: one reading per character (1 is i, | is l, 2 is z, 6 and 9 are g). A run of these is read as letters when
# a letter follows it, and up to its last digit when only a letter precedes it ("ki11!" is "kiii!", "bomb!" stays).
_LEET = str.maketrans("0123456789@$!|+€", "oizeasgtbgasilte")
_LEET_RUN = re.compile(r"[0-9@$!|+€]+")
_LEET_SYMBOLS = "@$!|+€"


def _leet_edits(text: str) -> list[tuple[int, int, str]]:
    """Where :func:`unleet` changes ``text``: (start, end, letters), the same length as what they replace."""
    edits = []
    for match in _LEET_RUN.finditer(text):
        (start, end), run = match.span(), match.group()
        if end < len(text) and "a" <= text[end] <= "z":
            edits.append((start, end, run.translate(_LEET)))
        elif start and "a" <= text[start - 1] <= "z" and (head := run.rstrip(_LEET_SYMBOLS)):
            edits.append((start, end, head.translate(_LEET) + run[len(head) :]))
    return edits


def _edited(text: str, edits: list[tuple[int, int, str]]) -> str:
    parts: list[str] = []
    last = 0
    for start, end, letters in edits:
        parts += (text[last:start], letters)
        last = end
    return "".join(parts) + text[last:] if edits else text


def unleet(text: str) -> str:
    """Leetspeak read as letters on a folded text: 0 o, 1 i, 2 z, 3 e, 4 a, 5 s, 6 g, 7 t, 8 b, 9 g, @ a, $ s,
    ! i, | l, + t, € e, for runs touching a letter ("m4k3 a b0mb" is "make a bomb"; "2024" and "bomb!" stay)."""
    return _edited(text, _leet_edits(text))


_ALNUM = r"[^\W_]"
_SEP = r"[-_.*/\\|~·•+^\u2010-\u2015\u2212]"
_SEP_RUN = re.compile(rf"{_SEP}{{1,4}}+(?={_ALNUM})")  # bounded: no rescans of long runs
_GAP = rf"(?:[ \t]?{_SEP}+[ \t]?|\r\n|\s)"
_SPACED = re.compile(rf"(?<!{_ALNUM}){_ALNUM}(?:{_GAP}{_ALNUM}){{2,}}(?!{_ALNUM})")
_SPACED_HINTS = tuple(re.compile(rf"{gap}{_ALNUM}{_GAP}{_ALNUM}(?!{_ALNUM})") for gap in (" ", "\n", "\t"))
_GAP_SPLIT = re.compile(f"({_GAP})")
_NOT_ALNUM = re.compile(r"[\W_]+")


def _drop_separator(match: re.Match[str]) -> str:
    text, start, end = match.string, match.start(), match.end()
    if start and end < len(text):
        before, after = text[start - 1], text[end]
        if before.isalnum() and after.isalnum() and (before.isalpha() or after.isalpha()):
            return ""
    return match.group()


def _join_match(match: re.Match[str]) -> str:
    """A letter-spaced run joined where its commonest gap is ("a b-o-m-b" is "a bomb")."""
    parts = _GAP_SPLIT.split(match.group())
    gaps = parts[1::2]
    common = Counter(gaps).most_common(1)[0][0]
    pairs = zip(gaps, parts[2::2], strict=True)
    return parts[0] + "".join(("" if gap == common else " ") + char for gap, char in pairs)


def join_split(text: str) -> str:
    """Words split to dodge the rules joined again on a folded text: separators between two letters, or a letter
    and a digit, go ("b-o-m-b", "bo-mb", "b.o.m.b", "b*o*m*b" are "bomb"; "2.4" stays), runs of three or more
    single characters one space apart are joined ("b o m b" is "bomb"; with two spaces between words,
    "m a k e  a  b o m b" is "make a bomb"), and every run of whitespace becomes one space."""
    return " ".join(_joined(text).split())


def _joined(text: str) -> str:
    """:func:`join_split` without collapsing whitespace."""
    text = _SEP_RUN.sub(_drop_separator, text)
    return _SPACED.sub(_join_match, text) if any(hint.search(text) for hint in _SPACED_HINTS) else text


_SQUEEZE_KEEP = re.compile(r"[^\w@$!|+€]+|_+")


def squeeze(text: str) -> str:
    """Letters and digits only, after :func:`fold` and :func:`unleet`: "How do I ma ke a bo\\nmb?" is
    "howdoimakeabomb" (leetspeak is read once the separators are gone, so "m.4.k.3" is "make")."""
    return _NOT_ALNUM.sub("", unleet(_SQUEEZE_KEEP.sub("", fold(text))))


_MAX_SPANS = 64
_MAX_ATTEMPTS = 256
_ROT13 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                         b"NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm")


def _rot13(text: str) -> str:
    """rot13 of the ASCII letters (on UTF-8 bytes: ``str.translate`` is slow on non-ASCII text)."""
    return text.encode("utf-8", "surrogatepass").translate(_ROT13).decode("utf-8", "surrogatepass")


_B64_CANDIDATE = re.compile(r"[A-Za-z0-9+/_-]{12,16384}={0,2}")  # longer runs: 16K chunks, bounded work
_URLSAFE = str.maketrans("-_", "+/")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_HEX_HINTS = (re.compile(r" [0-9A-Fa-f]{2} [0-9A-Fa-f]{2} "), re.compile(r":[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}:"))
_HEX_CANDIDATE = re.compile(r"[0-9A-Fa-f]{2}(?:(?:[ :,]{1,2})?(?:\\x|0x)?[0-9A-Fa-f]{2}){7,4095}")
_HEX_PAIR = re.compile(r"(?:0x|\\x)?([0-9A-Fa-f]{2})")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff]")


class _Budget:
    """What one :func:`decoded` call may still spend: characters decoded, decodings tried, spans kept."""

    __slots__ = ("attempts", "chars", "spans")

    def __init__(self, chars: int) -> None:
        self.chars, self.attempts, self.spans = chars, _MAX_ATTEMPTS, _MAX_SPANS - 1  # one left for rot13

    def take(self, wanted: int) -> int:
        """Characters granted out of ``wanted`` (0 once the budget is spent); one attempt used."""
        if self.attempts <= 0 or self.spans <= 0 or self.chars <= 0:
            return 0
        self.attempts -= 1
        granted = min(wanted, self.chars)
        self.chars -= granted
        return granted


def _texty(data: bytes | str) -> str | None:
    """``data`` as text when it reads as text: valid UTF-8, at most 5% odd characters, half letters or spaces."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not data or not any(char.isalpha() for char in data[:256]):
        return None
    odd = len(_BAD_CHARS.findall(data))
    words = len(_NOT_ALNUM.sub("", data)) + data.count(" ")
    return data if odd * 20 <= len(data) and words * 2 >= len(data) else None


def _from_base64(candidate: str) -> bytes | None:
    body = candidate.rstrip("=")
    if "-" in body or "_" in body:
        if "+" in body or "/" in body:
            return None
        body = body.translate(_URLSAFE)
    body = body[: len(body) - (len(body) % 4 == 1)]
    try:
        return binascii.a2b_base64(body + "=" * (-len(body) % 4), strict_mode=True)
    except binascii.Error:
        return None


def _from_hex(candidate: str) -> str | None:
    pairs = _HEX_PAIR.findall(candidate)
    return _texty(bytes.fromhex("".join(pairs))) if len(pairs) >= 8 else None


def _encoded_spans(text: str, budget: _Budget, rot13: bool) -> list[str]:
    """Texts decoded from the base64, hex and percent-encoded spans of ``text``, within ``budget``; with ``rot13``,
    also base64 spans that read as text once rot13 is undone."""
    found: list[str] = []
    for match in _B64_CANDIDATE.finditer(text):
        candidate = match.group()
        if candidate.isalpha() and (candidate.islower() or candidate.isupper()):
            continue  # a word, not base64 of text
        span = None
        for index, variant in enumerate((candidate, _rot13(candidate)) if rot13 else (candidate,)):
            if not (granted := budget.take(len(variant))):
                return found
            if granted < len(variant):
                variant = variant[: granted - granted % 4]
            if index == 0 and len(variant) >= 16 and _HEX_DIGITS.issuperset(variant):
                span = _from_hex(variant)
            if span is None and (data := _from_base64(variant)) is not None:
                span = _texty(data)
            if span is not None:
                found.append(span)
                break
    if "\\x" in text or "0x" in text or any(hint.search(text) for hint in _HEX_HINTS):
        for match in _HEX_CANDIDATE.finditer(text):
            if not (granted := budget.take(len(match.group()))):
                return found
            if (span := _from_hex(match.group()[:granted])) is not None:
                found.append(span)
    if "%" in text and _PERCENT.search(text) and (granted := budget.take(len(text))):
        if (span := _texty(urllib.parse.unquote(text[:granted]))) is not None:
            found.append(span)
    return found


def _decode(text: str, max_chars: int, max_depth: int) -> tuple[list[str], int]:
    """The encoded spans :func:`decoded` finds, and how many leading characters of ``text`` rot13 reads: half the
    budget is kept for rot13 (so junk spans cannot crowd it out), plus whatever the spans leave."""
    if max_depth <= 0:
        return [], 0
    reserved = min(len(text), max(max_chars, 0) // 2)
    budget = _Budget(max_chars - reserved)
    seen = {text}
    spans: list[str] = []
    level = [text]
    for depth in range(max_depth):
        found = [span for source in level for span in _encoded_spans(source, budget, depth == 0 and max_depth > 1)]
        level = []
        for span in found:
            if span not in seen and budget.spans > 0:
                seen.add(span)
                budget.spans -= 1
                spans.append(span)
                level.append(span)
    return spans, min(len(text), reserved + max(budget.chars, 0))


def decoded(text: str, *, max_chars: int = 65536, max_depth: int = 2) -> list[str]:
    """Texts hidden in ``text`` by encodings: base64 (standard or URL-safe, padded or not, spans of 12 or more
    characters), hex (8 or more pairs, contiguous, spaced, ``\\x`` or ``0x`` prefixed), percent-encoding (the whole
    text), rot13 (the whole text, always, last), and what those hide in turn, up to ``max_depth`` levels (base64 of
    base64, base64 under rot13). Spans that do not read as text are dropped. Bounded: at most ``max_chars``
    characters decoded in all (half kept for rot13, which reads a prefix of a longer text), at most 256 decodings
    tried and 64 texts returned."""
    spans, rot_chars = _decode(text, max_chars, max_depth)
    rot = _rot13(text[:rot_chars])
    return [*spans, rot] if rot_chars and rot not in spans and rot != text else spans


def _views_of(raw: str, rotated: bool) -> list[str]:
    """The views of one text folded but for its whitespace (see :func:`views`); with ``rotated``, also those of its
    rot13, from the same scans (rot13 keeps letters letters, so leetspeak and split words sit in the same places)."""
    folded, joined_raw, leet_edits = " ".join(raw.split()), _joined(raw), _leet_edits(raw)
    joined = folded if joined_raw == raw else " ".join(joined_raw.split())
    joined_edits = _leet_edits(joined) if joined != folded else []
    result: list[str] = []
    for turn in (str, _rot13) if rotated else (str,):
        result.append(turn(folded))
        leet = _edited(turn(raw), leet_edits)
        if leet_edits:
            result.append(" ".join(leet.split()))
        if joined != folded:
            result += [turn(joined), _edited(turn(joined), joined_edits)]
            if leet_edits:
                result.append(join_split(leet))
    return result


def views(text: str, *, max_decode_chars: int = 65536, max_depth: int = 2) -> list[str]:
    """The distinct texts the rules should be matched against, ``fold(text)`` first: for ``text``, its rot13 and
    every span :func:`decoded` finds in it, the folded text, its :func:`unleet`, its :func:`join_split`, and the two
    together (both orders). The rot13 views are rot13 of the folded text, so homoglyphs under rot13 are undone."""
    spans, rot_chars = _decode(text, max_decode_chars, max_depth)
    raw = _fold_raw(text)
    if 0 < rot_chars < len(text):  # the budget reads only a prefix: its rot13 is a source of its own
        sources = [(raw, False), (_rot13(raw[:rot_chars]), False)]
    else:
        sources = [(raw, rot_chars > 0)]
    out: list[str] = []
    seen: set[str] = set()
    for source, rotated in [*sources, *((_fold_raw(span), False) for span in spans)]:
        for view in _views_of(source, rotated):
            if view not in seen:
                seen.add(view)
                out.append(view)
    return out
