"""Backend URLs ``scheme://location?option=value``: from the argument, environment or default."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from riverbed.errors import InvalidUrlError

LOG_URL_ENV = "RIVERBED_URL"
DEFAULT_LOG_URL = "sqlite:///.riverbed/log.db"
# libpq connects a URL of no host to the local socket (or the one ``?host=`` names).
HOSTLESS_SCHEMES = frozenset({"postgresql", "postgres"})


@dataclass(frozen=True)
class BackendUrl:
    """A parsed backend URL. ``location`` is a file path for sqlite, ``host:port,...`` otherwise."""

    raw: str
    scheme: str
    location: str
    options: dict[str, str] = field(default_factory=dict)

    def pop_options(self, allowed: dict[str, str]) -> dict[str, str]:
        """The options with defaults filled in; an unknown option is an error naming the known."""
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidUrlError(
                f"unknown option {unknown[0]!r} in {self.shown!r}; {self.scheme}:// accepts: "
                f"{known}"
            )
        return {**allowed, **self.options}

    @property
    def shown(self) -> str:
        """The URL for messages: any password replaced by ``***``."""
        return redacted(self.raw)


def redacted(url: str) -> str:
    """``url`` with the password of ``user:password@`` and of ``?password=`` (libpq's,
    ``sslpassword=`` too) replaced by ``***``."""
    url = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"([?&](?:ssl)?password=)[^&#]*", r"\1***", url)


def resolve_url(url: str | None, env: str = LOG_URL_ENV, default: str = DEFAULT_LOG_URL) -> str:
    return url or os.environ.get(env) or default


def parse_url(url: str, schemes: tuple[str, ...]) -> BackendUrl:
    expected = " or ".join(f"{s}://" for s in schemes)
    if "://" not in url:
        raise InvalidUrlError(f"invalid URL {url!r}: expected {expected}...")
    try:
        parts = urlsplit(url)
    except ValueError as error:  # "Invalid IPv6 URL"
        raise InvalidUrlError(f"invalid URL {redacted(url)!r}: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise InvalidUrlError(
            f"unsupported URL scheme {scheme!r} in {redacted(url)!r}; use {expected}"
        )
    # A "+" is a plus, as libpq and librdkafka read URIs; HTML forms' space is "%20" here.
    pairs = parse_qsl(parts.query.replace("+", "%2B"), keep_blank_values=True)
    options = dict(pairs)
    if len(options) < len(pairs):
        twice = next(name for name, count in Counter(name for name, _ in pairs).items()
                     if count > 1)  # fmt: skip
        raise InvalidUrlError(
            f"option {twice!r} is given twice in {redacted(url)!r}; give each option once"
        )
    if scheme == "sqlite":
        # sqlite:///relative/path and sqlite:////absolute/path, as SQLAlchemy spells them.
        if parts.netloc:
            raise InvalidUrlError(
                f"invalid URL {url!r}: a sqlite URL has no host; "
                "write sqlite:///relative.db or sqlite:////absolute.db"
            )
        location = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not location:
            raise InvalidUrlError(f"invalid URL {url!r}: it names no database file")
    else:
        location = parts.netloc
        if not location and scheme not in HOSTLESS_SCHEMES:
            raise InvalidUrlError(
                f"invalid URL {url!r}: it names no host, e.g. {scheme}://host:port"
            )
    return BackendUrl(raw=url, scheme=scheme, location=location, options=options)
