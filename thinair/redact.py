"""Keep credentials out of log output: a logging filter that masks the values of secret-looking environment
variables (tokens, API keys, passwords, auth strings) and the password of any ``scheme://user:password@`` URL in
any variable (proxies, API URLs) in every record before any handler writes it.

thinair itself never logs the environment, but with ``THINAIR_LOG_LEVEL=DEBUG`` third-party loggers do log
what they send: websockets, for one, logs the ``Authorization`` header and the auth frame of Prefect's event
stream. :func:`install` puts the filter on every handler configured so far (the root handler of
``logging.basicConfig``, Prefect's console and API handlers), so none of them prints or sends a secret.
Reads environment variables only.
"""
from __future__ import annotations

import base64
import logging
import os
import re

MASK = "***"
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|AUTH_STRING|CREDENTIAL|PRIVATE", re.IGNORECASE)
MIN_LENGTH = 8  # shorter values ("1", "true") would mask ordinary words
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:([^/\s@]+)@", re.IGNORECASE)


def secret_values(environ=None) -> list[str]:
    """The values to mask: each secret-looking variable's value, the password of a ``user:password`` value,
    and their base64 forms (an HTTP Basic ``Authorization`` header); longest first."""
    env = os.environ if environ is None else environ
    found = set()
    for name in filter(SECRET_NAME.search, list(env)):
        value = env.get(name) or ""
        for v in (value, value.partition(":")[2]):
            if len(v) >= MIN_LENGTH:
                found |= {v, base64.b64encode(v.encode()).decode()}
    for value in list(env.values()):  # any variable: the password in a URL's user:password@ (proxies, API URLs)
        for password in URL_PASSWORD.findall(value or ""):
            if len(password) >= 4:
                found |= {password, base64.b64encode(password.encode()).decode()}
    return sorted(found, key=len, reverse=True)


class RedactSecrets(logging.Filter):
    """Masks the given values in a record's message and traceback text; never drops a record."""

    def __init__(self, values: list[str]):
        super().__init__()
        self.values = values

    def _mask(self, text: str) -> str:
        for v in self.values:
            text = text.replace(v, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.values:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: leave it to the handler's own error path
            return True
        masked = self._mask(message)
        if masked != message:
            record.msg, record.args = masked, ()
        text = record.exc_text or (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        if text and self._mask(text) != text:
            record.exc_text = self._mask(text)  # what formatters print instead of formatting exc_info again
        if record.stack_info:
            record.stack_info = self._mask(record.stack_info)
        return True


def install() -> RedactSecrets:
    """Add the filter (for the environment as it is now) to every handler of every logger configured so far."""
    filt = RedactSecrets(secret_values())
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    for handler in {h for lg in loggers for h in lg.handlers}:
        for old in [f for f in handler.filters if isinstance(f, RedactSecrets)]:
            handler.removeFilter(old)
        handler.addFilter(filt)
    return filt
