"""Scrubbing of secrets and contact data from text before it can become training data.

The scrubber is deliberately greedy: a false positive costs a few tokens of style, a false
negative can teach the model to recite somebody's key or phone number. Each pattern is replaced
by a short bracketed tag so the model still learns that "something went here".
"""

from __future__ import annotations

import re

# Order matters: whole secrets (keys, tokens, URLs) first, then the looser contact patterns, so a
# phone-number rule never chews half of an API key and leaves the rest behind.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S)
_KNOWN_KEYS = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"sk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_\-]{16,}"  # OpenAI / Anthropic style
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|glpat-[A-Za-z0-9_\-]{16,}"  # GitLab
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}"  # AWS access key ids
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API keys
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
    r")")
# Discord bot tokens: base64(user id) . timestamp . hmac; also catches other dotted tokens.
_DOTTED_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_\-.])[A-Za-z0-9_\-]{20,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{20,}")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@:]+:[^\s/@]+@")
_SECRET_PARAM_NAMES = (r"(?:[a-z_\-]*(?:key|token|secret|passw(?:or)?d|pwd|signature|sig|auth"
                       r"|session|sid|code|credential)[a-z_\-]*)")
_URL_QUERY_SECRET = re.compile(r"(?i)([?&;#]" + _SECRET_PARAM_NAMES + r"=)[^&\s#\"'<>]+")
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b((?:api[_\-]?key|access[_\-]?key|secret(?:[_\-]?key)?|token|passw(?:or)?d|pwd"
    r"|bearer|authorization)\s*(?:[:=]|\s)\s*[\"']?)(?=[^\s\"']*[0-9_\-/+])[^\s\"']{8,}")
_EMAIL = re.compile(
    r"(?i)(?<![\w.+\-])[\w.+\-]+\s*(?:@|\[at\]|\(at\)|\{at\})\s*[a-z0-9\-]+"
    r"(?:\s*(?:\.|\[dot\]|\(dot\)|\{dot\})\s*[a-z0-9\-]+)*\s*(?:\.|\[dot\]|\(dot\)|\{dot\})\s*"
    r"[a-z]{2,24}\b")
_CARD = re.compile(r"(?<!\d)(?:\d{4}[ \-]){3}\d{4}(?!\d)")
_PHONE_CANDIDATE = re.compile(r"(?<![\w.])\+?\(?\d[\d\s().\-]{6,}\d(?![\w.]*\d)")
_DATE_LIKE = re.compile(r"^\d{4}-\d{2}-\d{2}|^\d{1,2}[./-]\d{1,2}[./-]\d{2,4}$")
_DOTTED_NUMBERS = re.compile(r"^\d+(?:\.\d+)+$")  # versions and IPv4 addresses


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = sum(ch.isdigit() for ch in text)
    stripped = text.strip()
    if _DATE_LIKE.search(stripped) or _DOTTED_NUMBERS.match(stripped):
        return text
    has_sep = any(ch in " ().-" for ch in stripped)
    if stripped.startswith("+") and 8 <= digits <= 15:
        return "[phone]"
    if has_sep and 9 <= digits <= 15:
        return "[phone]"
    # A bare run of 10-13 digits reads like a phone number.
    if not has_sep and 10 <= digits <= 13:
        return "[phone]"
    return text


# Discord ids (snowflakes, 17-20 digits), raw or in mention markup: a member's id must never
# become a training target.
_DISCORD_ID = re.compile(r"<(?:@[!&]?|#)\d{15,21}>|(?<!\d)\d{17,20}(?!\d)")


def scrub(text: str) -> str:
    """Replace secrets (API keys, Discord/JWT tokens, private keys, credentials in URLs and
    assignments), contact data (emails, phone numbers, card numbers) and Discord ids with
    tags."""
    if not text:
        return text
    text = _PRIVATE_KEY.sub("[private key]", text)
    text = _URL_USERINFO.sub(r"\1[credentials]@", text)
    text = _URL_QUERY_SECRET.sub(r"\1[secret]", text)
    text = _KNOWN_KEYS.sub("[token]", text)
    text = _DOTTED_TOKEN.sub("[token]", text)
    text = _ASSIGNED_SECRET.sub(r"\1[secret]", text)
    text = _EMAIL.sub("[email]", text)
    text = _CARD.sub("[card]", text)
    text = _DISCORD_ID.sub("[id]", text)
    text = _PHONE_CANDIDATE.sub(_phone, text)
    return text
