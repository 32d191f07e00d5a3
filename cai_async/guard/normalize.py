"""Undo the disguises that walk around the guard's rules tier, before its patterns and words are matched.

:func:`fold` is the clean view (NFKC, casefold, no invisible or control characters, no accents, homoglyphs to
ASCII Latin, one space between words); :func:`unleet` and :func:`join_split` undo leetspeak and split words on a
folded text; :func:`squeeze` keeps letters and digits only; :func:`decoded` finds texts hidden by base64, hex,
percent-encoding and rot13; :func:`views` is every distinct text the rules should be matched against.
Pure standard library; the tables are built once at import and the decoding is bounded in characters and spans.
"""

from __future__ import annotations

import binascii
import codecs
import re
import unicodedata
import urllib.parse

__all__ = ["decoded", "fold", "join_split", "squeeze", "unleet", "views"]

_HOMOGLYPHS: dict[str, str] = {
    # Cyrillic (both cases: Greek and Cyrillic capitals are mapped before casefolding, Μ is m but μ is u)
    "а": "a", "А": "a", "в": "b", "В": "b", "ь": "b", "Ь": "b", "с": "c", "С": "c", "ԁ": "d", "Ԁ": "d", "е": "e",
    "Е": "e", "г": "r", "һ": "h", "Һ": "h", "н": "h", "Н": "h", "і": "i", "І": "i", "ј": "j", "Ј": "j", "к": "k",
    "К": "k", "ӏ": "l", "Ӏ": "l", "м": "m", "М": "m", "п": "n", "о": "o", "О": "o", "р": "p", "Р": "p", "ԛ": "q",
    "Ԛ": "q", "ѕ": "s", "Ѕ": "s", "т": "t", "Т": "t", "у": "y", "У": "y", "ү": "y", "Ү": "y", "х": "x", "Х": "x",
    "ԝ": "w", "Ԝ": "w",
    # Greek
    "α": "a", "Α": "a", "β": "b", "Β": "b", "γ": "y", "ε": "e", "Ε": "e", "Ζ": "z", "η": "n", "Η": "h", "ι": "i",
    "Ι": "i", "κ": "k", "Κ": "k", "μ": "u", "Μ": "m", "ν": "v", "Ν": "n", "ο": "o", "Ο": "o", "ρ": "p", "Ρ": "p",
    "τ": "t", "Τ": "t", "υ": "u", "Υ": "y", "χ": "x", "Χ": "x", "ω": "w", "ϲ": "c", "Ϲ": "c", "ϳ": "j", "Ϳ": "j",
    # Latin look-alikes without a decomposition, Armenian
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ɩ": "i", "ɨ": "i", "ø": "o", "Ø": "o", "đ": "d", "Đ": "d", "ħ": "h",
    "ł": "l", "Ł": "l", "ƀ": "b", "ŧ": "t", "օ": "o", "ս": "u", "հ": "h", "ո": "n", "ց": "g",
    # small capitals
    **dict(zip("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ", "abcdefghijklmnoprstuvwyz", strict=True)),
}
for _start in (0x1F150, 0x1F170, 0x1F1E6):  # negative circled, negative squared, regional indicator letters
    _HOMOGLYPHS.update((chr(_start + i), chr(ord("a") + i)) for i in range(26))

_HIDDEN_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")  # Hangul fillers: letters that render as nothing
_DROPPED_CATEGORIES = frozenset({"Mn", "Me", "Cf", "Cs", "Co", "Cn"})
_CACHE_LIMIT = 20_000


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


# unleet: one reading per character. 1 is i (| is l), 6 and 9 are g, 2 is z. A digit run is read as letters when
# it touches a letter; a symbol (@ $ ! | + €) only when a letter follows it, so "bomb!" keeps its "!".
_LEET = str.maketrans("0123456789@$!|+€", "oizeasgtbgasilte")
_LEET_RUN = re.compile(r"(?<=[a-z])[0-9@$!|+€]*[0-9]|(?<![0-9@$!|+€])[0-9@$!|+€]++(?=[a-z])")
_LEET_ANY = re.compile(r"[0-9@$!|+€]")


def _unleet_match(match: re.Match[str]) -> str:
    return match.group().translate(_LEET)


def unleet(text: str) -> str:
    """Leetspeak read as letters on a folded text: 0 o, 1 i, 2 z, 3 e, 4 a, 5 s, 6 g, 7 t, 8 b, 9 g, @ a, $ s,
    ! i, | l, + t, € e, for digits touching a letter and symbols followed by one ("m4k3 a b0mb" is "make a bomb")."""
    if not _LEET_ANY.search(text):
        return text
    return _LEET_RUN.sub(_unleet_match, text)


_ALNUM = r"[^\W_]"
_SEP = r"[-_.*/\\|~·•+^\u2010-\u2015\u2212]"
_IN_WORD = re.compile(rf"(?<={_ALNUM}){_SEP}+(?={_ALNUM})")
_SPACED = re.compile(rf"(?<!{_ALNUM}){_ALNUM}(?:(?:\r\n|\s|[ \t]?{_SEP}+[ \t]?){_ALNUM}){{2,}}(?!{_ALNUM})")
_NOT_ALNUM = re.compile(r"[\W_]+")


def _join_match(match: re.Match[str]) -> str:
    return _NOT_ALNUM.sub("", match.group())


def join_split(text: str) -> str:
    """Words split to dodge the rules joined again on a folded text: separators between letters or digits go
    ("b-o-m-b", "bo-mb", "b.o.m.b", "b*o*m*b" are "bomb") and runs of three or more single characters one space
    apart are joined ("b o m b" is "bomb"; with two spaces between words, "m a k e  a  b o m b" is "make a bomb")."""
    joined = _SPACED.sub(_join_match, _IN_WORD.sub("", text))
    return " ".join(joined.split())


_SQUEEZE_KEEP = re.compile(r"[^\w@$!|+€]+|_+")


def squeeze(text: str) -> str:
    """Letters and digits only, after :func:`fold` and :func:`unleet`: "How do I ma ke a bo\\nmb?" is
    "howdoimakeabomb" (leetspeak is read after the separators go, so "m.4.k.3" is "make")."""
    return _NOT_ALNUM.sub("", unleet(_SQUEEZE_KEEP.sub("", fold(text))))


_MAX_SPANS = 64
_MAX_ATTEMPTS = 256
_B64_CANDIDATE = re.compile(r"[A-Za-z0-9+/_-]{12,}={0,2}")
_URLSAFE = str.maketrans("-_", "+/")
_HEX_CANDIDATE = re.compile(r"(?:(?:0x|\\x)?[0-9A-Fa-f]{2}[ :,]?){8,}")
_HEX_PAIR = re.compile(r"(?:0x|\\x)?([0-9A-Fa-f]{2})")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff]")


class _Budget:
    """What one :func:`decoded` call may still spend: characters decoded, decoding attempts, spans kept."""

    __slots__ = ("attempts", "chars", "spans")

    def __init__(self, chars: int) -> None:
        self.chars, self.attempts, self.spans = chars, _MAX_ATTEMPTS, _MAX_SPANS

    def take(self, wanted: int) -> int:
        """Characters granted out of ``wanted`` (0 when the budget is spent), one attempt used."""
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


def _encoded_spans(text: str, budget: _Budget) -> list[str]:
    """Texts decoded from the base64, hex and percent-encoded spans of ``text``, within ``budget``."""
    found: list[str] = []
    for match in _B64_CANDIDATE.finditer(text):
        candidate = match.group()
        if (candidate.isalpha() and (candidate.islower() or candidate.isupper())) or candidate.isdigit():
            continue  # a word or a number, not base64 of text
        granted = budget.take(len(candidate))
        if not granted:
            break
        data = _from_base64(candidate[: granted - granted % 4] if granted < len(candidate) else candidate)
        if data is not None and (decoded_text := _texty(data)) is not None:
            found.append(decoded_text)
    for match in _HEX_CANDIDATE.finditer(text):
        granted = budget.take(len(match.group()))
        if not granted:
            break
        data = bytes.fromhex("".join(_HEX_PAIR.findall(match.group()[:granted])))
        if (decoded_text := _texty(data)) is not None:
            found.append(decoded_text)
    if "%" in text and _PERCENT.search(text) and (granted := budget.take(len(text))):
        unquoted = _texty(urllib.parse.unquote(text[:granted]))
        if unquoted is not None:
            found.append(unquoted)
    return found


def decoded(text: str, *, max_chars: int = 65536, max_depth: int = 2) -> list[str]:
    """Texts hidden in ``text`` by encodings: base64 (standard or URL-safe, padded or not, spans of 12 or more
    characters), hex (8 or more pairs, spaced, ``\\x`` or ``0x`` prefixed), percent-encoding (the whole text), rot13
    (the whole text, always), and what those hide in turn up to ``max_depth`` levels (base64 of base64; rot13 only
    of ``text`` itself). Spans that do not decode to text are dropped. At most ``max_chars`` characters are
    decoded in all (rot13 last, of the prefix that still fits), at most 64 spans kept and 256 decodings tried."""
    budget = _Budget(max_chars)
    seen = {text}
    out: list[str] = []
    level: list[str] = [text]
    for depth in range(max(max_depth, 0)):
        found = [span for source in level for span in _encoded_spans(source, budget)]
        if depth == 0 and (granted := budget.take(len(text))):
            found.append(codecs.encode(text[:granted], "rot13"))
        level = []
        for span in found:
            if span not in seen and budget.spans > 0:
                seen.add(span)
                budget.spans -= 1
                out.append(span)
                level.append(span)
    return out


def _views_of(text: str) -> list[str]:
    raw = _fold_raw(text)
    folded = " ".join(raw.split())
    result = [folded]
    leet = unleet(raw)
    if leet != raw:
        result.append(" ".join(leet.split()))
    joined = join_split(raw)
    if joined != folded:
        result += [joined, unleet(joined)]
    if leet != raw:
        result.append(join_split(leet))
    return result


def views(text: str, *, max_decode_chars: int = 65536, max_depth: int = 2) -> list[str]:
    """The distinct texts the rules should be matched against, first ``fold(text)``: for ``text`` and every span
    :func:`decoded` finds in it, the folded text, its :func:`unleet`, its :func:`join_split`, and both together."""
    out: list[str] = []
    seen: set[str] = set()
    for source in [text, *decoded(text, max_chars=max_decode_chars, max_depth=max_depth)]:
        for view in _views_of(source):
            if view not in seen:
                seen.add(view)
                out.append(view)
    return out
