"""Credentials out of URLs: the one redaction every shown or stored URL goes through.

A URL may carry secrets in its userinfo (``https://user:password@host``, or a
bare token ``https://TOKEN@host``) and in its query (``?token=...``). Whatever
lapse prints, logs or writes (summaries, the ledger, error lines, MLflow
params) holds :func:`redact_url` of a URL, never the URL itself, and a text
that may quote a secret URL (a driver's error message) passes :func:`redact`.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact", "redact_url"]

MASK = "***"
_MIN_SECRET = 4


def _secrets(url: str) -> list[str]:
    """The secret parts of ``url``: its password (else a bare userinfo token) and query values."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found.append(password if password is not None else userinfo)
    for pair in parts.query.split("&"):
        value = pair.partition("=")[2] if "=" in pair else pair
        found.append(value)
    return [s for s in found if s]


def redact_url(url: str) -> str:
    """``url`` with its password (or a bare userinfo token) and query values masked.

    Anything that is not a URL with a host comes back unchanged.

    >>> redact_url("https://user:s3cret@hooks.example.com/lapse?token=abc&v=2")
    'https://user:***@hooks.example.com/lapse?token=***&v=***'
    >>> redact_url("https://tok_123@hooks.example.com/lapse")
    'https://***@hooks.example.com/lapse'
    >>> redact_url("sqlite:///mlflow.db")
    'sqlite:///mlflow.db'
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] if password is not None else ""
        netloc = f"{user}:{MASK}@{host}" if user else f"{MASK}@{host}"
    query = "&".join(
        f"{pair.partition('=')[0]}={MASK}" if "=" in pair else MASK
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact(text: str, *urls: str | None) -> str:
    """``text`` with each of ``urls`` shown redacted and their secret parts masked
    wherever else they appear (a driver may quote a password on its own).

    >>> redact("cannot connect to https://u:pw1234@h/x (pw1234 refused)", "https://u:pw1234@h/x")
    'cannot connect to https://u:***@h/x (*** refused)'
    """
    for url in urls:
        if not url:
            continue
        text = text.replace(url, redact_url(url))
        # a string this short is no secret worth the name, and masking it would garble the text
        for secret in (s for s in _secrets(url) if len(s) >= _MIN_SECRET):
            text = text.replace(secret, MASK)
    return text
