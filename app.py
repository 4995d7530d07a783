#!/usr/bin/env python3
"""Order lookup service.

Turns a shop's nightly orders export (CSV or XLSX) into the order-tracking
endpoint that a chat agent calls with an order number and an email address.
The wording of every answer lives in contexts.toml.

The file reads top to bottom in the order data flows; each section uses only
what stands above it. Contents (the banners below, in order):
   1. Errors
   2. Settings: the environment and the command line
   3. Words: text folded to compare it, days written as people read them
   4. Shipped data: vocabulary, layouts, carriers, earlier releases
   5. Configuration: contexts.toml
   6. Reading files: formats, encodings, delimiters, workbooks
   7. Cells: dates, damaged numbers, field shapes, matching keys
   8. Columns: header words and cell content
   9. The plan: the columns chosen, checked against the templates
  10. Orders from rows: grouping, follow-on rows, what is not an order
  11. Packing orders into memory
  12. Rendering answers
  13. The index: the snapshot, building it, surveying it
  14. Warnings: what `check` and an upload say about an export
  15. Guards: the record of accepted exports, refusals of a smaller one
  16. Webhook events: from a signed body to an event
  17. Webhook events: the store and the overlay
  18. Webhook events: the shared database, its schema and connections
  19. Webhook events: shared by replicas in PostgreSQL
  20. Webhook events: receiving deliveries
  21. Sources: the data folder, a URL, uploads
  22. Request log, insights, metrics
  23. Serving state: loads, reloads, freshness
  24. Status page
  25. HTTP routes
  26. The server: waitress and its limits
  27. Command line
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import codecs
import copy
import csv
import ctypes
import hashlib
import hmac
import html
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
import tomllib
import unicodedata
import urllib.error
import urllib.request
from array import array
from collections import Counter, OrderedDict, deque
from contextlib import closing, contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from http import HTTPStatus
from importlib.util import find_spec
from itertools import accumulate, chain, groupby, islice, zip_longest
from json.encoder import encode_basestring
from operator import itemgetter, lt
from pathlib import Path
from string import Formatter
from typing import NamedTuple
from urllib.parse import quote, unquote_plus, unquote_to_bytes, urlsplit

try:
    import bottle
except ModuleNotFoundError as missing:  # `python3 app.py` outside the virtual environment
    if __name__ != "__main__":
        raise
    sys.exit(
        f"error: the package {missing.name!r} is not installed for {sys.executable}. Run the service with "
        ".venv/bin/python app.py, after setting it up once with: "
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
    )

__version__ = "1.0.0"

HERE = Path(__file__).resolve().parent
log = logging.getLogger("orders")
access_log = logging.getLogger("orders.access")  # one line per request


###############################################################################
# Errors ######################################################################
###############################################################################
#
# One small class per kind of mistake a person can make; its message is what they read,
# naming the file, the row or key, and the fix. Uses nothing but the imports.


class UserError(Exception):
    """A problem the user can fix; the message is exactly what they read."""


class ConfigError(UserError):
    """contexts.toml cannot be used."""


class ExportError(UserError):
    """The orders export cannot be used; `file` is its name as shown to people.

    detail is for the operator at a terminal (`check`), never for a log or /healthz:
    such as the file's column names, which in a file without a header row are a customer's data.
    """

    def __init__(self, message, file="", detail=""):
        super().__init__(message)
        self.file, self.detail = file, detail


class SettingsError(UserError):
    """A command-line option or environment variable is wrong."""


class StoreError(UserError):
    """The webhook store cannot be used (a corrupt file, a full disk)."""


class FetchError(UserError):
    """A fetch of ORDERS_URL failed; the message never holds the URL's path or query."""


class UploadRefused(UserError):
    """An upload is refused before it is checked (busy, too large); the message is what the sender reads."""


def config_error(path, where, problem, fix=""):
    """Raise a ConfigError shaped like every other one: file, key, problem, fix."""
    raise ConfigError(f"{shown_name(path)}: {where}: {problem}" + (f" {fix}" if fix else ""))


def export_error(path, problem):
    """Raise an ExportError shaped like every other one: the file, what is wrong, the fix."""
    raise ExportError(f"{shown_name(path)}: {problem}", file=shown_name(path))


def shown_name(path):
    """A file's name as logs and pages show it (see printable)."""
    return printable(Path(path).name)[:120]


def plural(count, noun, verbs=None):
    """'1 order', '3 orders': a count with its noun; with verbs ("has", "have"), the one that agrees after it."""
    said = f"{count:,} {noun}{'' if count == 1 else 's'}"
    return said if verbs is None else f"{said} {verbs[0] if count == 1 else verbs[1]}"


def printable(text):
    """Text without what could forge a log line (a line break) or break a UTF-8 page (a lone surrogate)."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


###############################################################################
# Settings: the environment and the command line ##############################
###############################################################################
#
# What the process is told at start (environment variables, flags): Settings, read and
# checked once, with the reason for each refusal. Uses the errors above.

# Words of the placeholders that people copy from documentation instead of making a key.
WEAK_KEY_WORDS = (
    "changeme",
    "yourapikey",
    "apikey",
    "example",
    "password",
    "placeholder",
    "secret",
    "replaceme",
    "paste",
    "yourkey",
    "keyhere",
    "qwerty",
    "asdf",
    "12345",
    "abcdef",
)


@dataclass(frozen=True)
class Settings:
    """Where things are and how to serve; from options, then env, then defaults."""

    data: Path
    contexts: Path
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    state_dir: Path | None = None
    threads: int = 8
    connection_limit: int = 1000
    channel_timeout: int = 10
    settle_seconds: float = 1.0
    poll_seconds: float = 30.0
    trusted_proxy: str | None = None
    trusted_proxy_headers: str = "x-forwarded-for"
    log_format: str = "text"
    key_failures_per_minute: int = 10
    one_cpu: bool = True
    cpu: int | None = None  # the CPU to keep to; None: one no other instance holds
    metrics: bool = True  # lookups counted for /metrics and the status page
    follow_symlinks: bool = False
    memory_limit_mb: float | None = None
    allow_weak_key: bool = False
    request_seconds: float = 3.0
    webhook_secrets: dict = None  # platform -> secrets (several, for rotation); a platform without is 404
    webhook_max_orders: int = 100_000
    webhook_days: float = 30.0  # days an order from webhook events is kept at most, even if no export catches up
    orders_url: str = ""  # fetched into the data folder every fetch_seconds
    fetch_seconds: float = 900.0
    max_export_mb: float = 1024.0  # the largest export fetched or uploaded
    upload_keys: tuple = ()  # x-upload-key for PUT /export; none: 404
    shop_domains: frozenset = frozenset()  # the shop's own host names: webhook events of any other are refused
    orders_url_auth: str = ""  # the Authorization header sent to ORDERS_URL's own host
    database_url: str = ""  # PostgreSQL shared by a shop's replicas (see SharedStore); "": SQLite in STATE_DIR
    database_password: str = ""  # read from DATABASE_PASSWORD_FILE, never from the URL

    @property
    def state(self):
        """Folder for the copy of the last accepted export."""
        if self.state_dir:
            return self.state_dir
        base = self.data if self.data.is_dir() else self.data.parent
        return base / ".last-good"


def env_number(env, name, default, example=None, most=1_000_000):
    """A numeric environment variable (of default's type), or a SettingsError that names it."""
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        number = type(default)(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or not 0 < number <= most:
        raise SettingsError(
            f"{name}={value!r} is not a {'whole ' if isinstance(default, int) else ''}number "
            f"above 0 and up to {most:,}; set it to e.g. {example or default}."
        )
    return number


def env_switch(env, name, default):
    """A yes/no environment variable, or a SettingsError that names it."""
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise SettingsError(f"{name}={value!r}: use yes or no.")


def env_cpu(env):
    """CPU: the number of the CPU to keep to (0, 1, ...), or None to choose one no other instance holds."""
    value = env.get("CPU", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) > 4095:
        raise SettingsError(
            f"CPU={value!r} is not a CPU number; set it to e.g. 0 or 1, or leave it unset to let "
            "the service choose one no other instance holds."
        )
    return int(value)


def parse_keys(raw):
    """API_KEY may hold several comma-separated keys so that one can be rotated."""
    return tuple(k.strip() for k in (raw or "").split(",") if k.strip())


def settings_from(options=None, env=None):
    """Settings from command-line options (a dict) over environment variables."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    env = os.environ if env is None else env
    port = options.get("port") or env_number(env, "PORT", 8080)
    if not 0 < port < 65536:
        raise SettingsError(f"port {port} is out of range; use a number from 1 to 65535.")
    state = options.get("state_dir") or env.get("STATE_DIR")
    log_format = env.get("LOG_FORMAT", "text").strip().lower() or "text"
    if log_format not in ("text", "json"):
        raise SettingsError(f"LOG_FORMAT={log_format!r}: use text or json.")
    settings = Settings(
        data=Path(options.get("data") or env.get("ORDERS_FILE") or HERE / "data").absolute(),
        contexts=Path(options.get("contexts") or env.get("CONTEXTS_FILE") or HERE / "contexts.toml").absolute(),
        host=options.get("host") or env.get("HOST") or "127.0.0.1",
        port=port,
        api_keys=parse_keys(env.get("API_KEY")),
        state_dir=Path(state).absolute() if state else None,
        threads=env_number(env, "THREADS", 8),
        connection_limit=env_number(env, "CONNECTION_LIMIT", 1000),
        channel_timeout=env_number(env, "CHANNEL_TIMEOUT", 10),
        settle_seconds=env_number(env, "SETTLE_SECONDS", 1.0),
        poll_seconds=env_number(env, "POLL_SECONDS", 30.0),
        trusted_proxy=env.get("TRUSTED_PROXY") or None,
        # Either "x-forwarded-for x-forwarded-proto" or with commas; waitress wants spaces.
        trusted_proxy_headers=" ".join(re.split(r"[\s,]+", env.get("TRUSTED_PROXY_HEADERS", "").strip()))
        or "x-forwarded-for",
        log_format=log_format,
        key_failures_per_minute=env_number(env, "KEY_FAILURES_PER_MINUTE", 10),
        one_cpu=env_switch(env, "ONE_CPU", True),
        cpu=env_cpu(env),
        metrics=env_switch(env, "METRICS", True),
        follow_symlinks=env_switch(env, "FOLLOW_SYMLINKS", False),
        memory_limit_mb=env_number(env, "MEMORY_LIMIT_MB", 0.0, example=800) or default_memory_limit_mb(),
        allow_weak_key=env_switch(env, "ALLOW_WEAK_KEY", False),
        # 3 s: the sweep then runs every second, so a lookup stuck behind clients sending a byte at a time
        # still gets its answer within the chat platform's 5 s; a real request arrives in milliseconds.
        request_seconds=env_number(env, "REQUEST_SECONDS", 3.0),
        webhook_secrets={
            platform: parse_keys(env.get(name))
            for platform, name in WEBHOOK_SECRETS.items()
            if parse_keys(env.get(name))
        },
        webhook_max_orders=env_number(env, "WEBHOOK_MAX_ORDERS", 100_000, most=10_000_000),
        webhook_days=env_number(env, "WEBHOOK_DAYS", 30.0, most=3650),
        orders_url=check_orders_url(env.get("ORDERS_URL", "").strip()),
        fetch_seconds=env_number(env, "FETCH_SECONDS", 900.0, most=7 * 86400),
        max_export_mb=env_number(env, "MAX_EXPORT_MB", 1024.0, most=100_000),
        upload_keys=parse_keys(env.get("UPLOAD_KEY")),
        shop_domains=frozenset(host_of(name) for name in parse_keys(env.get("SHOP_DOMAIN"))),
        orders_url_auth=authorization(env.get("ORDERS_URL_AUTH", "").strip()),
        database_url=check_database_url(env.get("DATABASE_URL", "").strip()),
        database_password=read_password_file(env.get("DATABASE_PASSWORD_FILE", "").strip()),
    )
    if settings.database_url and not settings.shop_domains:
        raise SettingsError(
            "DATABASE_URL needs SHOP_DOMAIN: the database belongs to one shop, known by its domain "
            "(shop.example.com), so that an instance of another shop never shares it."
        )
    return settings


def check_database_url(url):
    """DATABASE_URL: a postgresql:// URL with no password in it (logs, `ps` and shell history would show it)."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise SettingsError(
            "DATABASE_URL: give a PostgreSQL URL such as postgresql://orders@db.example.com/shop?sslmode=verify-full."
        )
    if parts.password is not None or "password" in conninfo_keys(url):
        raise SettingsError(
            "DATABASE_URL holds a password, which logs, `ps` and shell history can show: take it out of the URL "
            "and put it in a file only the service can read (chmod 600), named by DATABASE_PASSWORD_FILE."
        )
    if find_spec("psycopg") is None:
        raise SettingsError(
            "DATABASE_URL needs the psycopg package: .venv/bin/pip install -r requirements.txt, then start again."
        )
    return url


def conninfo_keys(url):
    """The parameters libpq reads from a URL (a percent-encoded name too); nothing when psycopg is missing."""
    if find_spec("psycopg") is None:
        return {}
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(url)
    except Exception as e:  # psycopg.ProgrammingError: a URL libpq cannot read
        raise SettingsError(f"DATABASE_URL cannot be read as a PostgreSQL URL ({type(e).__name__}).") from None


def read_password_file(name):
    """DATABASE_PASSWORD_FILE's first line: the database password, kept out of the URL and the environment."""
    if not name:
        return ""
    try:
        return Path(name).read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as e:
        raise SettingsError(
            f"DATABASE_PASSWORD_FILE={printable(name)}: cannot be read "
            f"({getattr(e, 'strerror', None) or 'it is empty or not text'}). Give a file holding the password "
            "on its first line, readable by the service's user."
        ) from None


def host_of(name):
    """A host name as SHOP_DOMAIN gives it: shop.myshopify.com, or a URL whose host is taken."""
    return ((urlsplit(name).hostname or "") if "//" in name else name.strip().rstrip("/")).lower()


def authorization(value):
    """ORDERS_URL_AUTH as an Authorization header: "user:password" for HTTP Basic, or "Bearer TOKEN" as it is."""
    import base64

    if not value or " " in value.split(":", 1)[0]:
        return value
    if ":" not in value:
        raise SettingsError(
            "ORDERS_URL_AUTH: give user:password (sent as HTTP Basic auth) or a whole header "
            'value such as "Bearer TOKEN".'
        )
    return "Basic " + base64.b64encode(value.encode()).decode()


def check_orders_url(url):
    """ORDERS_URL: https, or plain http to this machine only; the SettingsError never shows the URL's secrets."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here, not at the first fetch
    except ValueError:
        raise SettingsError("ORDERS_URL is not a URL that can be read (check its brackets and port).") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise SettingsError(
            f"ORDERS_URL ({shown_url(url)}) is not an https:// URL. Give the export's link, e.g. a "
            "Google Sheets 'Publish to web' CSV link."
        )
    if parts.username is not None or parts.password is not None:
        raise SettingsError(
            f"ORDERS_URL ({shown_url(url)}) holds a user name or password (user:pass@), which is "
            "not supported: it would be sent to every host a redirect leads to. Put them in "
            "ORDERS_URL_AUTH=user:password instead (sent as HTTP Basic auth, to that host only)."
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise SettingsError(
            f"ORDERS_URL ({shown_url(url)}) is plain http://: the export and any token in the link "
            "would cross the internet readable. Use its https:// link."
        )
    return url


def shown_url(url):
    """A URL as logs and pages show it: scheme and host only. The path and query often carry its token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/…" if parts.scheme else "(not a URL)"


WEBHOOK_SECRETS = {"shopify": "SHOPIFY_WEBHOOK_SECRET", "woocommerce": "WOOCOMMERCE_WEBHOOK_SECRET"}
PLATFORM_NAMES = {"shopify": "Shopify", "woocommerce": "WooCommerce"}


def default_memory_limit_mb():
    """Nine tenths of the memory this process may have: its cgroup's limit (systemd's MemoryMax), else the machine's."""
    try:
        group = Path("/sys/fs/cgroup") / Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip().lstrip("/")
        while True:  # the limit may be set on the service or on a slice above it
            limit = (group / "memory.max").read_text().strip() if (group / "memory.max").exists() else "max"
            if limit != "max":
                return int(limit) * 0.9 / 1e6
            if group == group.parent or group == Path("/sys/fs/cgroup"):
                break
            group = group.parent
    except (OSError, IndexError, ValueError):
        pass
    try:
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
        return int(total.split()[1]) * 1024 * 0.9 / 1e6
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def weak_key_warnings(keys, role="API key"):
    """Why each key of a role is too easy to guess (never the key itself)."""
    for number, key in enumerate(keys, 1):
        letters = re.sub(r"[\W_]+", "", key.casefold())
        if len(key) < 16:
            yield f"{role} {number} of {len(keys)} is shorter than 16 characters"
        elif any(word in letters for word in WEAK_KEY_WORDS) or len(set(key)) < 10 or key.isdigit():
            # A random key of 16 characters or more has a dozen different ones, nearly always.
            yield f"{role} {number} of {len(keys)} is a well-known placeholder or repeats one character"


def key_roles(settings):
    """(role, variable, keys) of every key and secret set: each lets its holder do something else."""
    roles = [("API key", "API_KEY", settings.api_keys), ("upload key", "UPLOAD_KEY", settings.upload_keys)]
    roles += [
        (f"{PLATFORM_NAMES[platform]} webhook secret", variable, (settings.webhook_secrets or {}).get(platform, ()))
        for platform, variable in WEBHOOK_SECRETS.items()
    ]
    return [(role, variable, keys) for role, variable, keys in roles if keys]


def shared_key_errors(settings):
    """Where one role's key is also another's: the chat platform's key must never change data, nor sign events."""
    roles = key_roles(settings)
    for at, (role, variable, keys) in enumerate(roles):
        for other_role, other_variable, other_keys in roles[at + 1 :]:
            if set(keys) & set(other_keys):
                yield (
                    f"{variable} and {other_variable} share a key: the {role} would also work as the "
                    f"{other_role}. Give each its own"
                )


def is_loopback(host):
    """True for an address only this machine can reach."""
    if host == "localhost":
        return True
    with suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


###############################################################################
# Words: text folded to compare it, days written as people read them ##########
###############################################################################
#
# How headers, status words and TOML values are compared (case, accents, separators,
# camelCase folded), how a TOML value is checked against the type it should have, and how an
# ISO day is written in a shop's language. Uses the errors above.


def status_word(value):
    """Status words compare loosely: 'On-Hold', 'on hold' and 'ON_HOLD' are one, and 'Expédiée' is 'expediee'."""
    return " ".join(re.split(r"[\s_\-]+", unaccented(value.strip().casefold()))).strip()


def unaccented(text):
    """Text without accents ('Numéro' -> 'Numero', 'wysłane' -> 'wyslane'); ASCII text is returned at once."""
    if text.isascii():
        return text
    return "".join(c for c in unicodedata.normalize("NFKD", text.translate(FOLDS)) if not unicodedata.combining(c))


# Letters that carry no combining accent, so NFKD keeps them: folded by hand. "°" is the "o" of "N°".
FOLDS = str.maketrans(
    {
        "ł": "l",
        "Ł": "L",
        "ø": "o",
        "Ø": "O",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "ß": "ss",
        "đ": "d",
        "Đ": "D",
        "ı": "i",
        "°": "o",
    }
)


def snake_case(header):
    """The placeholder name of a column: 'Financial Status' -> financial_status."""
    return re.sub(r"[^0-9a-z]+", "_", header.casefold()).strip("_")


def header_key(header):
    """Headers compare loosely: without case, and "_", "-", ":" and runs of spaces as one space.

    So order_number is Order Number, Customer: Email is Customer Email, and Numéro de suivi is
    Numero de suivi.
    """
    return " ".join(unaccented(str(header).casefold()).replace("_", " ").replace("-", " ").replace(":", " ").split())


def read_toml(path):
    """A TOML file as a dict; ConfigError naming the file and the line for any problem."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{printable(path)}: file not found. Copy it from the project or set CONTEXTS_FILE."
        ) from None
    except OSError as e:
        raise ConfigError(f"{printable(path)}: cannot be read ({e.strerror}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{shown_name(path)}: is not UTF-8 text. Save it as UTF-8.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"{shown_name(path)}: {e}. Fix the TOML syntax there; text values need quotes, "
            'e.g. processing = "Order {order_id} was found."'
        ) from None
    except (RecursionError, MemoryError):  # e.g. an array nested thousands deep
        raise ConfigError(
            f"{shown_name(path)}: is nested too deeply to read. contexts.toml needs only "
            "tables, texts and lists of texts; copy the shipped one and edit that."
        ) from None


def toml_value(path, where, value, kind, example):
    """Check a value's TOML type; the error shows a correct example."""
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        config_error(path, where, f"should be {example}, not {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):  # TOML allows nan and inf
        config_error(path, where, f"should be {example}, not {value!r}.", "Write a plain number.")
    return value


def toml_table(path, name, value):
    """A section must be a table, e.g. [columns]."""
    return toml_value(path, f"[{name}]", value, dict, f"a table such as [{name}]")


def braced(names):
    """Placeholder names as a template writes them: '{order_id}, {email}'."""
    return ", ".join(f"{{{name}}}" for name in names)


def nearest(name, known):
    """' (did you mean {order_id}?)' for a name close to a known one, else ''."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {{{close[0]}}}?)" if close else ""


def placeholders(path, where, text, allowed=None):
    """The {names} in a template; only plain names, only allowed ones if given."""
    try:
        parsed = list(Formatter().parse(text))
    except ValueError as e:
        config_error(path, where, f"has a stray brace ({e}).", "Write {{ or }} for a literal brace.")
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or spec or conversion:
            config_error(
                path,
                where,
                f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is not a placeholder.",
                "Placeholders are plain names such as {order_id}.",
            )
        names.append(name)
    if allowed is not None and (unknown := [n for n in dict.fromkeys(names) if n not in allowed]):
        config_error(
            path,
            where,
            f"uses the unknown placeholder{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"{{{n}}}{nearest(n, allowed)}" for n in unknown)
            + ".",
            f"Available here: {braced(sorted(allowed)) or 'none'}.",
        )
    return tuple(dict.fromkeys(names))


def toml_texts(path, where, value, example):
    """A list of texts (a single text counts as a list of one)."""
    value = [value] if isinstance(value, str) else value
    for text in toml_value(path, where, value, list, f"a list of texts such as {example}"):
        toml_value(path, where, text, str, f"a list of texts such as {example}")
    return tuple(value)


# Small words a header may hold besides the ones that say its field ("Número de orden").
FILLER = frozenset(
    "de del la el los las do da dos das du des le les of the a an di della dell van het der die den "
    "y e et und and per por para pour zum zur von al au aux in en z w na do by".split()
)
CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
NUMBER_SIGN = re.compile(r"#|\bn\s*\.?\s*o\b(?=\s*[^a-z]|\s+de\b|\s+di\b|$)")  # "#", "N°", "Nº", "N.º" (after folding)
WORD_SPLIT = re.compile(r"[^0-9a-z]+")


def header_words(header):
    """A header's words as the vocabulary reads them: 'N° de suivi' -> ('number', 'de', 'suivi')."""
    text = unaccented(CAMEL.sub(" ", str(header))).casefold().replace("_", " ")  # "Order_No" is "Order No"
    text = NUMBER_SIGN.sub(" number ", text).replace("e-mail", "email").replace("e mail", "email")
    return tuple(word for word in WORD_SPLIT.split(text) if word)


def folded_phrase(text):
    """A vocabulary entry as header_words reads it, its words joined by one space."""
    return " ".join(header_words(text))


@dataclass(frozen=True)
class Saying:
    """One way a header says a field: a word of each group, in any order ("tracking + number"), or, when only,
    nothing but them (a few small words aside: "= status")."""

    groups: tuple[str, ...]
    only: bool
    text: str  # as vocabulary.toml writes it


def phrases(words):
    """(phrase, its word positions) of every run of one to three words, for entries such as "track trace"."""
    for size in (1, 2, 3):
        for at in range(len(words) - size + 1):
            yield " ".join(words[at : at + size]), set(range(at, at + size))


ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?\s*(?:Z|[+-]\d{2}:?\d{2}|UTC)?")


ENGLISH = ("{day} {month} {year}", ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"))


def readable(value, style=ENGLISH):
    """ISO dates read as people write them: '2026-11-28 10:00 -0400' -> '28 Nov 2026' (style: vocabulary.toml's)."""
    # The pattern only where a date can start: most values ('#1001', '1 x Hat') skip it.
    match = ISO_DATE.fullmatch(value) if value[4:5] == "-" and value[:4].isdigit() else None
    if match is None and " and " in value and value[4:5] == "-":  # the days of an order's parcels (Packer.agreed)
        return " and ".join(readable(part, style) for part in value.split(" and "))
    return day_text(value[:10], style) or value if match else value


@lru_cache(maxsize=4096)  # a shop's answers show a few hundred days, each many times over
def day_text(iso_day, style=ENGLISH):
    """'2026-11-28' -> '28 Nov 2026' as style writes it, or "" when it is no real day."""
    try:
        return written_day((int(iso_day[:4]), int(iso_day[5:7]), int(iso_day[8:10])), style)
    except ValueError:
        return ""


def written_day(parts, style):
    """(year, month, day) as a language writes it: '28 Nov 2026', '28. Nov. 2026'; ValueError for no real day."""
    year, month, day = parts
    date(year, month, day)  # raises for 2026-02-30
    template, months = style
    return template.format(day=day, month=months[month - 1], year=year)


###############################################################################
# Shipped data: vocabulary, layouts, carriers, earlier releases ###############
###############################################################################
#
# The files shipped beside app.py that a merchant never needs to edit (vocabulary.toml,
# layouts.toml, carriers.toml, history.toml), and how a contexts.toml's own tables of the
# same name add to them. Uses the words and TOML checks above.

LAYOUTS_FILE = HERE / "layouts.toml"  # the export layouts shipped with the service; contexts.toml adds its own
VOCABULARY_FILE = HERE / "vocabulary.toml"  # header and status words of every language; contexts.toml adds its own
HISTORY_FILE = HERE / "history.toml"  # what earlier releases shipped in contexts.toml, word for word
CARRIERS_FILE = HERE / "carriers.toml"  # carriers' tracking pages; contexts.toml's [carriers] adds or changes some


VOCABULARY_SECTIONS = ("headers", "words", "fields", "statuses", "dates", "relays")


def parse_vocabulary(path, own, shipped):
    """[vocabulary] of contexts.toml over the shipped vocabulary.toml: headers, header words, meanings, dates.

    headers: field -> exact headers (contexts.toml's only, looked for like [columns]);
    words: a HeaderWords (contexts.toml's words added to the shipped groups, its ways of
    saying a field tried first); meanings: status word -> the word rules use (contexts.toml's
    win); dates: language -> (format, months); relays: a marketplace's relay domain -> its
    name. A file's own [columns] and rule words always come first.
    """
    sources = ((path, toml_table(path, "vocabulary", own), "vocabulary."), (VOCABULARY_FILE, shipped, ""))
    for source, doc, prefix in sources:
        for key in doc:
            if key not in VOCABULARY_SECTIONS:
                config_error(
                    source, f"[{prefix}{key}]", "is not a known section.", f"It holds {', '.join(VOCABULARY_SECTIONS)}."
                )
    headers, meanings, groups, sayings, never, dates, relays = {}, {}, {}, {}, {}, {}, {}
    for source, doc, prefix in reversed(sources):  # the shipped words first, the merchant's added
        for group, words in toml_table(source, f"{prefix}words", doc.get("words", {})).items():
            said = toml_texts(source, f"[{prefix}words] {group}", words, '["tracking", "suivi"]')
            groups[group] = groups.get(group, frozenset()) | frozenset(map(folded_phrase, said))
    for source, doc, prefix in sources:  # the merchant's ways of saying a field tried first
        for field_name, spec in toml_table(source, f"{prefix}fields", doc.get("fields", {})).items():
            where = f"[{prefix}fields.{field_name}]"
            spec = toml_value(source, where, spec, dict, '{ says = ["tracking + number"], never = ["url"] }')
            sayings[field_name] = (
                *sayings.get(field_name, ()),
                *(
                    parse_saying(source, where, text, groups)
                    for text in toml_texts(source, f"{where} says", spec.get("says", []), '["order + number"]')
                ),
            )
            never[field_name] = never.get(field_name, frozenset()) | frozenset(
                word
                for text in toml_texts(source, f"{where} never", spec.get("never", []), '["invoice"]')
                for word in groups.get(text, {folded_phrase(text)})
            )
        for field_name, names in parse_columns(source, doc.get("headers", {}), f"{prefix}headers").items():
            headers[field_name] = (*headers.get(field_name, ()), *names)
        for meaning, said in toml_table(source, f"{prefix}statuses", doc.get("statuses", {})).items():
            for word in toml_texts(source, f"[{prefix}statuses] {meaning}", said, '["versendet", "expediee"]'):
                meanings.setdefault(status_word(word), status_word(meaning))
        for language, style in toml_table(source, f"{prefix}dates", doc.get("dates", {})).items():
            dates.setdefault(language, parse_date_style(source, f"[{prefix}dates.{language}]", style))
        for domain, marketplace in toml_table(source, f"{prefix}relays", doc.get("relays", {})).items():
            relays.setdefault(
                domain.strip().lower().strip("@."),
                toml_value(source, f"[{prefix}relays] {domain}", marketplace, str, '"Amazon"'),
            )
    return {
        "headers": headers,
        "meanings": meanings,
        "words": HeaderWords(groups, sayings, never),
        "dates": dates,
        "relays": relays,
    }


def parse_saying(path, where, text, groups):
    """One way of saying a field, "tracking + number" or "= status", its groups checked against [words]."""
    only = text.strip().startswith("=")
    names = tuple(name.strip() for name in text.strip().lstrip("=").split("+"))
    for name in names:
        if name not in groups:
            config_error(
                path,
                f"{where} says",
                f"{text!r} names {name!r}, which is no group of [words].",
                f"Groups: {', '.join(sorted(groups))}.",
            )
    return Saying(names, only, text.strip())


def parse_date_style(path, where, raw):
    """[dates.LANGUAGE]: (format with {day} {month} {year}, the twelve month names)."""
    raw = toml_value(path, where, raw, dict, '{ format = "{day} {month} {year}", months = ["Jan", ...] }')
    months = toml_texts(path, f"{where} months", raw.get("months", []), '["Jan", "Feb", ...]')
    if len(months) != 12:
        config_error(path, f"{where} months", f"holds {len(months)} names.", "Give the twelve months, January first.")
    style = toml_value(
        path, f"{where} format", raw.get("format", "{day} {month} {year}"), str, '"{day} {month} {year}"'
    )
    placeholders(path, f"{where} format", style, {"day", "month", "year"})
    return style, tuple(months)


def retired_columns(columns, history):
    """(the [columns] that are the merchant's own, [(field, its list)] that a release once shipped as it is)."""
    own, retired = {}, []
    for field_name, names in columns.items():
        if list(names) in [list(shipped) for shipped in history.get(field_name, ())]:
            retired.append((field_name, names))
        else:
            own[field_name] = names
    return own, tuple(retired)


def parse_columns(path, raw, section="columns"):
    """[columns] (or a layout's columns): field -> the headers to look for, the first present wins."""
    columns = {}
    for name, headers in toml_table(path, section, raw).items():
        where = f"[{section}] {name}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            config_error(path, where, "field names are lower case letters, digits and _.", "e.g. tracking_number.")
        if isinstance(headers, str):
            headers = [headers]
        toml_value(path, where, headers, list, 'a list of headers such as ["Order Number", "Name"]')
        for header in headers:
            toml_value(path, where, header, str, 'a list of headers such as ["Order Number", "Name"]')
        columns[name] = tuple(headers)
    return columns


def parse_carriers(path, raw):
    """[carriers]: carrier name -> tracking page with {tracking_number}; longest name first."""
    carriers = []
    for name, url in toml_table(path, "carriers", raw).items():
        where = f"[carriers] {name}"
        toml_value(path, where, url, str, 'a URL such as "https://www.ups.com/track?tracknum={tracking_number}"')
        if url:  # "" names a carrier whose page no link from the number alone reaches: no link, not another's
            if not url.startswith("https://"):
                config_error(path, where, "must start with https://.", "The chat agent only shows secure links.")
            placeholders(path, where, url, {"tracking_number"})
        carriers.append((carrier_key(name), url))
    return tuple(sorted(carriers, key=lambda c: -len(c[0])))


def own_carrier_lines(path, own, shipped, history):
    """(the merchant's [carriers] as parsed, names of lines equal to a page the service ships or once shipped)."""
    own = toml_table(path, "carriers", own)
    shipped_pages = {carrier_key(name): {url} for name, url in shipped.items()}
    for name, urls in history.items():
        shipped_pages.setdefault(carrier_key(name), set()).update(urls if isinstance(urls, list) else ())
    retired = [name for name, url in own.items() if url in shipped_pages.get(carrier_key(name), ())]
    return parse_carriers(path, {name: url for name, url in own.items() if name not in retired}), tuple(retired)


def merged_carriers(shipped, own):
    """carriers.toml's pages with the merchant's own in place of (or beside) them; longest name first."""
    pages = dict(shipped)
    pages.update(own)
    return tuple(sorted(pages.items(), key=lambda c: -len(c[0])))


def carrier_key(name):
    """Carrier names compare on letters and digits only, without accents: 'DHL Express' -> dhlexpress."""
    return re.sub(r"[\W_]+", "", unaccented(name.casefold()))


@dataclass(frozen=True)
class Packed:
    """Cells that pack several entries (items, or tracking numbers) into one text."""

    columns: tuple[str, ...]  # headers; one ending in * stands for line_item_1, line_item_2, ...
    format: str  # "pairs" (name:Hat|quantity:2), "count" (2x Hat) or "json" (a list of objects)
    between: str  # between entries in one cell; "" = one entry a cell
    pairs: str  # between an entry's key/value pairs
    key: str  # between a key and its value
    escape: str  # makes the character after it plain text (\| \: \;)
    keys: tuple  # ((our name, (their keys, the first filled wins)), ...): name/quantity, or number/carrier/link


@dataclass(frozen=True)
class Layout:
    """One kind of export, as data: the headers that identify it, its own columns, its reading rules."""

    key: str
    name: str
    detect: tuple[str, ...]
    columns: dict  # field -> headers, looked for before [columns]
    row_type: str = ""  # the header of the column that says what each row is
    item_rows: frozenset = frozenset()  # status_word()s of the kinds of rows that are items
    tracking_rows: frozenset = frozenset()  # ... that carry tracking numbers
    other_rows: frozenset = frozenset()  # ... known to be neither
    ignore_rows: tuple = ()  # (header, status_word()s): rows whose cell says one of these are not read
    items: Packed | None = None
    tracking: Packed | None = None
    statuses: dict = None  # field -> {word as this export means it: the word rules use}
    ignore_leading_zeros: bool = False
    help: str = ""  # one line added when a required column is missing
    refuse: str = ""  # why an export of this kind cannot answer lookups, and what to export instead


LAYOUT_KEYS = (
    "name",
    "detect",
    "columns",
    "rows",
    "items",
    "tracking",
    "statuses",
    "ignore_leading_zeros",
    "help",
    "refuse",
)
PACKED_KEYS = {"items": ("name", "quantity", "option"), "tracking": ("number", "carrier", "link")}


def merged_layout(shipped, raw):
    """A contexts.toml layout over the shipped one of its name: its keys replace, its columns add."""
    if not isinstance(shipped, dict) or not isinstance(raw, dict):
        return raw
    columns = raw.get("columns")
    if isinstance(columns, dict) and isinstance(shipped.get("columns"), dict):
        columns = {**shipped["columns"], **columns}
    return {**shipped, **raw, **({"columns": columns} if columns is not None else {})}


def parse_layouts(path, raw):
    """[layouts.NAME] tables: name -> Layout, each checked as strictly as the rest of the file."""
    return {key: parse_layout(path, key, value) for key, value in toml_table(path, "layouts", raw).items()}


def parse_layout(path, key, raw):
    """One [layouts.NAME] table."""
    where = f"[layouts.{key}]"
    toml_value(path, where, raw, dict, "a table with name, detect and columns")
    for name in raw:
        if name not in LAYOUT_KEYS:
            config_error(path, f"{where} {name}", "is not a known key.", f"Known: {', '.join(LAYOUT_KEYS)}.")
    detect = toml_texts(path, f"{where} detect", raw.get("detect"), '["Name", "Line: Type"]')
    if not detect:
        config_error(path, f"{where} detect", "is empty.", "List the headers that only this kind of export has.")
    rows = toml_value(
        path, f"{where} rows", raw.get("rows", {}), dict, '{ type = "Line: Type", items = ["Line Item"] }'
    )
    words = lambda name: frozenset(
        map(status_word, toml_texts(path, f"{where} rows.{name}", rows.get(name, []), '["Line Item"]'))
    )
    if set(rows) - {"type", "items", "tracking", "other", "ignore"}:
        config_error(
            path,
            f"{where} rows",
            f"has the unknown key {sorted(set(rows) - {'type', 'items', 'tracking', 'other', 'ignore'})[0]!r}.",
            "It takes type, items, tracking, other and ignore.",
        )
    ignore = toml_value(
        path, f"{where} rows.ignore", rows.get("ignore", {}), dict, '{ "Fulfillment: Status" = ["cancelled", "error"] }'
    )
    if set(rows) - {"ignore"} and not isinstance(rows.get("type"), str):
        config_error(
            path,
            f"{where} rows.type",
            "should name the column that says what each row is.",
            'e.g. type = "Line: Type".',
        )
    statuses = toml_value(
        path, f"{where} statuses", raw.get("statuses", {}), dict, '{ status = { pending = "unfulfilled" } }'
    )
    return Layout(
        key=key,
        name=toml_value(path, f"{where} name", raw.get("name", key), str, '"Matrixify orders export"'),
        detect=detect,
        columns=parse_columns(path, raw.get("columns", {}), f"layouts.{key}.columns"),
        row_type=rows.get("type", ""),
        item_rows=words("items"),
        tracking_rows=words("tracking"),
        other_rows=words("other"),
        ignore_rows=tuple(
            (
                header,
                frozenset(map(status_word, toml_texts(path, f"{where} rows.ignore.{header}", said, '["cancelled"]'))),
            )
            for header, said in ignore.items()
        ),
        items=parse_packed(path, f"{where} items", raw.get("items"), PACKED_KEYS["items"]),
        tracking=parse_packed(path, f"{where} tracking", raw.get("tracking"), PACKED_KEYS["tracking"]),
        statuses={
            field: {
                status_word(k): status_word(toml_value(path, f"{where} statuses.{field}.{k}", v, str, '"unfulfilled"'))
                for k, v in toml_value(path, f"{where} statuses.{field}", words_of, dict, "a table of words").items()
            }
            for field, words_of in statuses.items()
        },
        ignore_leading_zeros=toml_value(
            path, f"{where} ignore_leading_zeros", raw.get("ignore_leading_zeros", False), bool, "true or false"
        ),
        help=toml_value(path, f"{where} help", raw.get("help", ""), str, "a sentence in quotes"),
        refuse=toml_value(path, f"{where} refuse", raw.get("refuse", ""), str, "a sentence in quotes"),
    )


def parse_packed(path, where, raw, names):
    """An items or tracking table of a layout: which cells pack entries, and how."""
    if raw is None:
        return None
    toml_value(path, where, raw, dict, '{ columns = ["line_item_*"], pairs = "|", key = ":", name = "name" }')
    known = ("columns", "format", "between", "pairs", "key", "escape", *names)
    for name in raw:
        if name not in known:
            config_error(path, f"{where} {name}", "is not a known key.", f"Known: {', '.join(known)}.")
    text = lambda name, default: toml_value(path, f"{where} {name}", raw.get(name, default), str, repr(default))
    packed = Packed(
        columns=toml_texts(path, f"{where} columns", raw.get("columns"), '["line_item_*"]'),
        format=text("format", "pairs"),
        between=text("between", ""),
        pairs=text("pairs", "|"),
        key=text("key", ":"),
        escape=text("escape", ""),
        keys=tuple((name, toml_texts(path, f"{where} {name}", raw.get(name, name), '"name"')) for name in names),
    )
    if packed.format not in ("pairs", "count", "json"):
        config_error(path, f"{where} format", f"is {packed.format!r}.", 'Use "pairs", "count" or "json".')
    if not packed.columns:
        config_error(path, f"{where} columns", "is empty.", 'Name the cells, e.g. columns = ["line_item_*"].')
    return packed


@dataclass(frozen=True)
class HeaderWords:
    """vocabulary.toml's header words: groups of words by meaning, and how each field's headers combine them."""

    groups: dict  # group -> frozenset of folded words and phrases
    sayings: dict  # field -> tuple of Sayings, best first
    never: dict  # field -> frozenset of folded words and phrases that keep a header away from it

    def reading(self, field_name, words):
        """(rank, words besides, evidence) of the best way words say the field, or None."""
        if self.rules_out(field_name, words):
            return None
        for rank, saying in enumerate(self.sayings.get(field_name, ())):
            used = self.covers(saying.groups, words)
            if used is None:
                continue
            rest = [w for at, w in enumerate(words) if at not in used[1] and w not in FILLER]
            if saying.only and rest:
                continue
            return rank, len(rest), "header words: " + " + ".join(f'"{term}"' for term in used[0])
        return None

    def rules_out(self, field_name, words):
        """True when the header holds a word (or phrase) that keeps it away from the field."""
        never = self.never.get(field_name, frozenset())
        return any(term in never for term, _ in phrases(words))

    def covers(self, groups, words):
        """(terms, word positions) where a term of each group is in words, or None.

        A word may stand for two groups next to each other in the saying: a German or Dutch
        compound made of a word of each ("Sendungsnummer", "Betaalstatus").
        """
        terms, used, at = [], set(), 0
        while at < len(groups):
            group = self.groups.get(groups[at], frozenset())
            found = next(((term, spot) for term, spot in phrases(words) if term in group and not spot & used), None)
            if found is None and at + 1 < len(groups):
                found = self.compound(groups[at], groups[at + 1], words, used)
                at += found is not None
            if found is None:
                return None
            terms.append(found[0])
            used |= found[1]
            at += 1
        return terms, used

    def compound(self, first, second, words, used):
        """(word, its position) of a word made of a word of first and one of second ('zahlungs'+'status'), or None."""
        heads, tails = self.groups.get(first, frozenset()), self.groups.get(second, frozenset())
        for at, word in enumerate(words):
            if at in used or len(word) < 6:
                continue
            for cut in range(3, len(word) - 1):
                head, tail = word[:cut], word[cut:]
                if (head in heads or head.endswith("s") and head[:-1] in heads) and tail in tails:
                    return word, {at}
        return None


###############################################################################
# Configuration: contexts.toml ################################################
###############################################################################
#
# The merchant's file: settings, templates, rules, items, their own columns and carriers,
# parsed into one Config with every key checked and every mistake named at once. Uses the
# shipped data above.

# Placeholders computed from an order rather than read from one column.
DERIVED = {
    "order_id": "the order number as written in the export, e.g. #1001",
    "items": "the line items, e.g. 1 x Hat, 2 x Socks (without a count where the export gives none), less what the "
    "export says was refunded",
    "refunded_items": "what of the items was refunded, as the lines' refunded quantities say",
    "refunds": "'all' when every line was refunded in full, 'some' when part of one was, as the lines' refunded "
    "quantities say; else empty",
    "no_shipping_items": "the lines that need no shipping (a download, a gift card), beside lines that do",
    "item_count": "how many items in all, where every line's count is known",
    "shipped_items": "what of the items has left, as the lines' statuses or shipped quantities say",
    "unshipped_items": "what of the items has not left and still needs to",
    "parcels": "each tracking number with the items on its row, where the export ties them",
    "needs_shipping": "'no' when every line needs no shipping (a download, a gift card), as the export says",
    "overdue": "'yes' when the order was placed more than [settings] overdue_days before the export",
    "tracking_number": "the first tracking number",
    "tracking_numbers": "every tracking number, comma-separated",
    "tracking_url": "the tracking link (from a column, or built from [carriers])",
    "records_updated": "until when the records hold orders: the export's time less [settings] export_lag_hours "
    "(or a later webhook event's), e.g. 27 Nov 2026, 02:15 UTC",
}
# Templates the service answers with before or without finding an order.
MESSAGES = {
    "not_found": {"order_id", "records_updated"},
    "missing": {"missing"},
    "invalid": set(),
    "not_an_email": set(),
    "unavailable": set(),
}
# Messages added after contexts.toml files were made: a file without one answers with this.
MESSAGE_DEFAULTS = {
    "not_an_email": "No order could be looked up: what was given as the e-mail address is not one. Please ask the "
    "customer again for the e-mail address used for the order.",
}
REQUIRED_FIELDS = ("order_id", "email")
# Fields read per line item; every other field is per order.
ITEM_FIELDS = (
    "item_name",
    "item_quantity",
    "item_status",
    "item_shipped_quantity",
    "item_refunded_quantity",
    "item_needs_shipping",
    "item_variant",
)
# Fields read from every row of an order: its items and any tracking numbers.
ROW_FIELDS = (*ITEM_FIELDS, "tracking_number")
# Fields that derived placeholders are made from: always read when present.
SOURCE_FIELDS = ("tracking_number", "carrier", "tracking_url")
CONTEXTS_SECTIONS = ("settings", "columns", "items", "rules", "templates", "carriers", "layouts", "vocabulary")


@dataclass(frozen=True)
class Template:
    """One answer text and the placeholders it names.

    A part in [square brackets] is left out when a placeholder in it has no value, so
    an answer says what the export shows only where it shows it: "has shipped[ on
    {shipped_at}]". parts holds ((text, placeholders, optional), ...) for such a template.
    """

    name: str
    text: str
    fields: tuple[str, ...]
    parts: tuple = ()
    gates: tuple = ()  # the placeholders of the optional parts
    written: str = dataclass_field(default="", compare=False)  # as contexts.toml writes it, [optional parts] and all
    # Per answer, which optional parts show is told by whether their placeholders are filled;
    # the text for each such combination is put together once, then only filled.
    composed: dict = dataclass_field(default_factory=dict, compare=False, repr=False)

    def fill(self, values):
        """The text filled from values (placeholder -> text); optional parts only where all of theirs are filled."""
        if not self.parts:
            return self.text.format_map(values)
        filled = tuple(map(bool, map(values.__getitem__, self.gates)))
        text = self.composed.get(filled)
        if text is None:
            text = self.composed[filled] = "".join(
                part for part, fields, optional in self.parts if not optional or all(map(values.__getitem__, fields))
            )
        return text.format_map(values)

    def render(self, values):
        """The text with each placeholder filled, dates made readable."""
        return self.fill({f: readable(values[f].strip()) for f in self.fields})


@dataclass(frozen=True)
class Rule:
    """`when` conditions that, when all hold for an order, pick `template`."""

    number: int
    conditions: tuple[tuple[str, frozenset | None], ...]
    template: str

    def allows(self, words):
        """True when every word condition holds for words (field -> status_word of its value)."""
        return all(words.get(name, "") in wanted for name, wanted in self.conditions if wanted is not None)

    @property
    def needs_filled(self):
        """The fields that the rule wants filled in ("*")."""
        return tuple(name for name, wanted in self.conditions if wanted is None)


def rule_words(rules, field_name=None):
    """The words the rules name for a field (for any field when None): what a status column is known by."""
    return {
        word
        for rule in rules
        for name, words in rule.conditions
        if words and field_name in (None, name)
        for word in words
    }


@dataclass(frozen=True)
class Config:
    """contexts.toml, checked: everything the service needs to word answers."""

    path: Path
    columns: dict
    rules: tuple
    templates: dict
    carriers: tuple
    default_template: str
    item_format: str
    item_part: str
    item_separator: str
    no_items: str
    shipped_item_statuses: frozenset
    max_age_hours: float
    overdue_days: float
    min_orders_ratio: float
    max_vanished_ratio: float
    export_lag_hours: float
    sheet: str
    timezone: object  # a zoneinfo.ZoneInfo: the merchant's, for the times answers show
    layouts: tuple = ()  # Layouts, contexts.toml's first, then the shipped ones
    headers: dict = None  # field -> exact headers of [vocabulary.headers], looked for after [columns]'
    meanings: dict = None  # status word in another language -> the word rules use (vocabulary.toml)
    words: object = None  # HeaderWords: how headers say each field (vocabulary.toml [words], [fields])
    dates: dict = None  # language -> (format, months) of the dates answers write (vocabulary.toml [dates])
    relays: dict = None  # a marketplace's relay e-mail domain -> its name (vocabulary.toml [relays])
    language: str = "en"  # [settings] language: the language of the templates, for their dates
    retired: tuple = ()  # (field, headers) of [columns] lines that are an earlier release's list, not the merchant's
    promising: tuple = ()  # (template, what it promises) of templates that are word for word an earlier release's
    earlier_rules: bool = False  # [[rules]] are word for word an earlier release's list (history.toml [rules])
    retired_carriers: tuple = ()  # [carriers] names whose page is one the service ships or once shipped

    @property
    def fields_used(self):
        """Every placeholder or rule field that some order answer needs."""
        # Not the email: it is the index's key, so an order keeps it only where an answer shows it.
        used = {"order_id"} | set(SOURCE_FIELDS) | set(ITEM_FIELDS)
        for name, template in self.templates.items():
            if name not in MESSAGES:
                used.update(template.fields)
        for rule in self.rules:
            used.update(name for name, _ in rule.conditions)
        return used


def load_config(path):
    """Read and check contexts.toml (and the shipped data files); raise ConfigError naming file, key and fix."""
    path = Path(path)
    shipped = {
        name: read_toml(file) if file.exists() else {}
        for name, file in (
            ("layouts", LAYOUTS_FILE),
            ("vocabulary", VOCABULARY_FILE),
            ("history", HISTORY_FILE),
            ("carriers", CARRIERS_FILE),
        )
    }
    return parse_config(
        path, read_toml(path), shipped["layouts"], shipped["vocabulary"], shipped["history"], shipped["carriers"]
    )


def parse_config(path, doc, shipped=None, words=None, history=None, carriers=None):
    """Turn a parsed contexts.toml (and the shipped layouts, vocabulary, history and carriers) into a Config,
    checking every key."""
    shipped = shipped or {}
    for key in doc:
        if key not in CONTEXTS_SECTIONS:
            config_error(
                path, f"[{key}]", "is not a known section.", f"Known sections: {', '.join(CONTEXTS_SECTIONS)}."
            )
    for key in shipped:
        if key not in ("layouts",):
            config_error(LAYOUTS_FILE, f"[{key}]", "is not a section this file holds.", "It holds [layouts.*].")
    for key in carriers or {}:
        if key != "carriers":
            config_error(CARRIERS_FILE, f"[{key}]", "is not a section this file holds.", "It holds [carriers].")
    settings = parse_settings(path, doc.get("settings", {}))
    vocabulary = parse_vocabulary(path, doc.get("vocabulary", {}), words or {})
    columns, retired = retired_columns(parse_columns(path, doc.get("columns", {})), (history or {}).get("columns", {}))
    # A layout in contexts.toml changes the shipped one of its name, key by key (its columns
    # field by field); the merchant's are tried first.
    own = toml_table(path, "layouts", doc.get("layouts", {}))
    ours = toml_table(LAYOUTS_FILE, "layouts", shipped.get("layouts", {}))
    layouts = {
        **parse_layouts(LAYOUTS_FILE, ours),
        **parse_layouts(path, {key: merged_layout(ours.get(key), raw) for key, raw in own.items()}),
    }
    items = parse_items(path, doc.get("items", {}))
    templates = parse_templates(path, doc.get("templates", {}))
    rules = parse_rules(path, doc.get("rules", []), templates)
    own_carriers, retired_carriers = own_carrier_lines(
        path, doc.get("carriers", {}), (carriers or {}).get("carriers", {}), (history or {}).get("carriers", {})
    )
    check_meanings(path, toml_table(path, "vocabulary", doc.get("vocabulary", {})).get("statuses", {}), rules)
    default = settings["default_template"] or ("found" if "found" in templates else "processing")
    if default not in templates:
        config_error(
            path,
            "[settings] default_template",
            f"names the template {default!r}, which does not exist.",
            f"Templates: {', '.join(templates)}.",
        )
    return Config(
        path=path,
        columns=columns,
        rules=rules,
        templates=templates,
        carriers=merged_carriers(parse_carriers(CARRIERS_FILE, (carriers or {}).get("carriers", {})), own_carriers),
        retired_carriers=retired_carriers,
        default_template=default,
        item_format=items["format"],
        item_part=items["part"],
        item_separator=items["separator"],
        no_items=items["none"],
        shipped_item_statuses=frozenset(status_word(s) for s in items["shipped"]),
        max_age_hours=settings["max_age_hours"],
        overdue_days=settings["overdue_days"],
        min_orders_ratio=settings["min_orders_ratio"],
        max_vanished_ratio=settings["max_vanished_ratio"],
        export_lag_hours=settings["export_lag_hours"],
        sheet=settings["sheet"],
        timezone=parse_timezone(path, settings["timezone"]),
        layouts=tuple(sorted(layouts.values(), key=lambda layout: layout.key not in own)),
        language=parse_language(path, settings["language"], vocabulary["dates"]),
        retired=retired,
        **vocabulary,
        promising=promising_templates(templates, (history or {}).get("templates", [])),
        earlier_rules=rules_digest(doc.get("rules", [])) in (history or {}).get("rules", {}).get("earlier", ()),
    )


def rules_digest(rules):
    """The SHA-256 of a [[rules]] list as TOML reads it (JSON, keys sorted): how history.toml names a release's."""
    return hashlib.sha256(json.dumps(rules, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


STATUS_MEANINGS = (
    "shipped",
    "processing",
    "delivered",
    "cancelled",
    "refunded",
    "on hold",
    "returned",
    "ready for pickup",
    "pending payment",
)


def check_meanings(path, statuses, rules):
    """Each meaning [vocabulary.statuses] gives a word must be a word some rule names, else the word changes nothing."""
    named = rule_words(rules)
    for meaning in statuses if isinstance(statuses, dict) else ():
        if status_word(meaning) not in named:
            config_error(
                path,
                f"[vocabulary.statuses] {meaning}",
                "is no word a rule names, so it would change no answer.",
                "Put the true meaning in its place, one of: " + ", ".join(STATUS_MEANINGS) + ".",
            )


def promising_templates(templates, shipped):
    """(name, promise) of each template that is word for word an earlier release's answer promising what no export
    holds (history.toml [[templates]])."""
    return tuple(
        (entry["name"], entry["promises"])
        for entry in shipped
        if isinstance(entry, dict)
        and entry.get("name") in templates
        and templates[entry["name"]].written == entry.get("text")
    )


def parse_language(path, name, dates):
    """[settings] language: one that vocabulary.toml [dates] (or contexts.toml's) knows how to write dates in."""
    if dates and name not in dates:
        config_error(
            path,
            "[settings] language",
            f"{name!r} is not a language whose dates the service can write.",
            f"Use one of {', '.join(sorted(dates))}, or add [vocabulary.dates.{name}].",
        )
    return name


def parse_timezone(path, name):
    """[settings] timezone: an IANA name such as Europe/Berlin, for the times that answers show."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        config_error(
            path,
            "[settings] timezone",
            f"{name!r} is not a time zone this machine knows.",
            'Use an IANA name such as "Europe/Berlin", "America/New_York" or "UTC".',
        )


SETTING_DEFAULTS = {
    "default_template": "",  # "found" where the templates have it, else "processing" (files made before it)
    "max_age_hours": 26.0,
    "min_orders_ratio": 0.5,
    "max_vanished_ratio": 0.2,
    "export_lag_hours": 1.0,
    "sheet": "",
    "timezone": "UTC",
    "language": "en",  # the templates': how their dates are written (vocabulary.toml [dates])
    "overdue_days": 30.0,  # an order not shipped this long after it was placed is not worded as if it ships soon
}


def parse_settings(path, raw):
    """[settings]: default template, freshness, shrink guards, XLSX sheet, time zone."""
    raw = toml_table(path, "settings", raw)
    out = dict(SETTING_DEFAULTS)
    for key, value in raw.items():
        if key not in SETTING_DEFAULTS:
            config_error(path, f"[settings] {key}", "is not a known setting.", f"Known: {', '.join(SETTING_DEFAULTS)}.")
        default = SETTING_DEFAULTS[key]
        kind = (int, float) if isinstance(default, float) else str
        out[key] = toml_value(path, f"[settings] {key}", value, kind, f"like {default!r}")
    if out["max_age_hours"] <= 0:
        config_error(path, "[settings] max_age_hours", "must be more than 0.", "A nightly export wants 26.")
    if not 0 <= out["min_orders_ratio"] <= 1:
        config_error(
            path, "[settings] min_orders_ratio", "must be between 0 and 1.", "0.5 refuses an export half the size."
        )
    if not 0 <= out["max_vanished_ratio"] <= 1:
        config_error(
            path,
            "[settings] max_vanished_ratio",
            "must be between 0 and 1.",
            "0.2 refuses an export that lacks a fifth of the orders being served.",
        )
    if not 0 <= out["export_lag_hours"] <= 48:
        config_error(
            path,
            "[settings] export_lag_hours",
            "must be between 0 and 48.",
            "1 suits an export that takes up to an hour to make.",
        )
    return out


ITEM_DEFAULTS = {
    "format": "{quantity} x {name}",
    "part": "part of {item}",  # a line the export says left in part, without saying how much
    "separator": ", ",
    "none": "the items ordered",
    "shipped": ["fulfilled", "shipped", "delivered"],
}


def parse_items(path, raw):
    """[items]: how line items are listed and which item statuses mean shipped."""
    out = dict(ITEM_DEFAULTS)
    for key, value in toml_table(path, "items", raw).items():
        if key not in ITEM_DEFAULTS:
            config_error(path, f"[items] {key}", "is not a known setting.", f"Known: {', '.join(ITEM_DEFAULTS)}.")
        kind = list if key == "shipped" else str
        out[key] = toml_value(path, f"[items] {key}", value, kind, f"like {ITEM_DEFAULTS[key]!r}")
        for word in out[key] if kind is list else ():
            toml_value(path, f"[items] {key}", word, str, f"a list of words like {ITEM_DEFAULTS[key]!r}")
    placeholders(path, "[items] format", out["format"], {"quantity", "name"})
    placeholders(path, "[items] part", out["part"], {"item"})
    return out


def parse_templates(path, raw):
    """[templates]: name -> text; the message templates must be present."""
    templates = {}
    for name, text in toml_table(path, "templates", raw).items():
        where = f"[templates] {name}"
        toml_value(path, where, text, str, 'a text in quotes, e.g. "Order {order_id} was found."')
        templates[name] = parse_template(path, where, name, text, MESSAGES.get(name))
    for name, text in MESSAGE_DEFAULTS.items():
        if name not in templates:
            templates[name] = parse_template(path, f"[templates] {name}", name, text, MESSAGES[name])
    for name, allowed in MESSAGES.items():
        if name not in templates:
            shown = f" It may use {braced(sorted(allowed))}." if allowed else ""
            config_error(
                path,
                f"[templates] {name}",
                "is missing; the service needs it to answer.",
                f'Add {name} = "...".{shown}',
            )
    return templates


def parse_template(path, where, name, text, allowed):
    """A Template from its text: placeholders checked, [optional] parts found."""
    split = optional_parts(path, where, text)
    parts = tuple((part, placeholders(path, where, part, allowed), optional) for part, optional in split)
    for part, fields, optional in parts:
        if optional and not fields:
            config_error(
                path,
                where,
                f"[{part}] has no placeholder, so it would always show.",
                "Write [[ and ]] for square brackets that are part of the text.",
            )
    fields = tuple(dict.fromkeys(f for _, names, _ in parts for f in names))
    plain = "".join(part for part, _ in split)
    if not any(optional for _, optional in split):
        return Template(name, plain, fields, written=text)
    gates = tuple(dict.fromkeys(f for _, names, optional in parts if optional for f in names))
    return Template(name, plain, fields, parts, gates, written=text)


def optional_parts(path, where, text):
    """text split at [ and ] into (part, optional) pairs; [[ and ]] stand for the brackets themselves."""
    parts, current, optional, i = [], "", False, 0
    while i < len(text):
        pair, char = text[i : i + 2], text[i]
        if pair in ("[[", "]]"):
            current, i = current + char, i + 2
            continue
        if char in "[]":
            if (char == "[") == optional:
                problem = "has a [ inside another [ ]" if optional else "has a ] without its ["
                config_error(
                    path, where, f"{problem}.", "Write [[ and ]] for square brackets that are part of the text."
                )
            parts.append((current, optional))
            current, optional = "", not optional
        else:
            current += char
        i += 1
    if optional:
        config_error(
            path, where, "has a [ without its ].", "Close the optional part with ], or write [[ for a bracket."
        )
    parts.append((current, False))
    return [(part, optional) for part, optional in parts if part]


def parse_rules(path, raw, templates):
    """[[rules]]: in order; each names a template and the conditions for it."""
    toml_value(path, "[[rules]]", raw, list, "a list of [[rules]] tables")
    rules = []
    for number, rule in enumerate(raw, 1):
        where = f"[[rules]] number {number}"
        toml_value(path, where, rule, dict, "a table with when and template")
        unknown = set(rule) - {"when", "template"}
        if unknown:
            config_error(
                path, where, f"has the unknown key {sorted(unknown)[0]!r}.", "A rule has only when and template."
            )
        name = toml_value(path, f"{where} template", rule.get("template"), str, 'a template name, e.g. "shipped"')
        if name not in templates or name in MESSAGES:
            config_error(
                path,
                f"{where} template",
                f"names the template {name!r}, which does not exist.",
                f"Templates: {', '.join(t for t in templates if t not in MESSAGES)}.",
            )
        conditions = []
        for field_name, wanted in toml_value(
            path, f"{where} when", rule.get("when", {}), dict, 'a table, e.g. { status = "shipped" }'
        ).items():
            conditions.append((field_name, condition(path, f"{where} when.{field_name}", wanted)))
        rules.append(Rule(number, tuple(conditions), name))
    return tuple(rules)


def condition(path, where, wanted):
    """'*' means any non-empty value; a text or a list means one of those words."""
    if wanted == "*":
        return None
    if isinstance(wanted, str):
        wanted = [wanted]
    toml_value(path, where, wanted, list, 'a word, a list of words, or "*" for any value')
    for word in wanted:
        toml_value(path, where, word, str, 'a word, a list of words, or "*" for any value')
    return frozenset(status_word(w) for w in wanted)


###############################################################################
# Reading files: formats, encodings, delimiters, workbooks ####################
###############################################################################
#
# From a file on disk to rows of text: which files are exports (by name and by content),
# CSV in any encoding and delimiter, XLSX read row by row, title lines, damaged bytes.
# Uses the settings and configuration above.

# A name that says "export" makes the file the merchant's export, whatever it holds (a
# failed download named orders.csv is refused, visibly); a .txt or a name without an
# extension (Amazon offers its reports only as .txt) is one when its content is a table.
NAMED_EXPORTS = (".csv", ".tsv", ".tab", ".xlsx", ".xlsm", ".xls", ".ods")
SNIFFED_EXPORTS = (".txt", "")
READ_BUFFER = 1 << 20
# An order is kept as one string (see Packer): these separate its cells, and its rows.
FIELD, RECORD = "\x1f", "\x1e"
DELIMITERS = ",;\t|"
SNIFF_BYTES = 65536

# Spreadsheet files recognised but not read, and what to do instead. Merchants meet .xls
# and .ods rarely (every platform here writes CSV or XLSX); reading them would take a
# library each (xlrd, odfpy) for what one "Save as" in Excel or LibreOffice does.
SAVE_AS = (
    "Open it in Excel or LibreOffice and save it as CSV (UTF-8) or Excel Workbook (.xlsx), "
    "or export the orders as CSV or XLSX."
)
NOT_READ = {
    "xls": f"is an old Excel workbook (.xls), which is not read here. {SAVE_AS}",
    "ods": f"is an OpenDocument spreadsheet (.ods), which is not read here. {SAVE_AS}",
    "zip": "is a zip archive, not an export. Unpack it and drop the export inside (CSV or XLSX) instead.",
}
OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # old Office files (.xls)


FUTURE_SLACK = 300  # seconds a file's time may run ahead of this clock (written by another machine)


def find_export(location, follow_links=False):
    """The file to serve: the location itself, or the newest export in a folder."""
    location = Path(location)
    if location.is_dir():
        found = [p for p in location.iterdir() if is_export_name(p.name) and p.is_file()]
        candidates = [p for p in found if follow_links or not links_out(p, location)]
        # Newest first: a stray text file is passed over, not refused in the export's place.
        for path in sorted(candidates, key=newness, reverse=True):
            if is_export(path):
                return path
        if not candidates:
            outside = len(found) - len(candidates)
            raise ExportError(
                f"{printable(location)}: no export (.csv, .tsv, .txt or .xlsx) in this folder"
                + (
                    f" ({outside} link(s) to files outside it are not followed; FOLLOW_SYMLINKS=yes allows them)"
                    if outside
                    else ""
                )
                + ". Drop the export there, or point ORDERS_FILE / --data at the file."
            )
        raise ExportError(
            f"{printable(location)}: no export in this folder: {', '.join(map(printable, passed_over(location)))} "
            "do not hold a table. Drop the export there (CSV, TSV or XLSX)."
        )
    if not location.exists():
        raise ExportError(f"{printable(location)}: no such file or folder. Check ORDERS_FILE / --data.")
    if location.suffix.lower() not in NAMED_EXPORTS and file_kind(location) != "table":
        export_error(location, "is not a table. Export the orders as CSV or XLSX.")
    return location


def newness(path):
    """How new a file is, for choosing the newest: one dated in the future ranks below every other, so it
    cannot win for good."""
    mtime = path.stat().st_mtime_ns
    return mtime <= (time.time() + FUTURE_SLACK) * 1e9, mtime, path.name


def is_export(path):
    """True for a file to serve: named as an export, or a .txt or extensionless file that holds a table."""
    return path.suffix.lower() in NAMED_EXPORTS or file_kind(path) == "table"


def passed_over(folder):
    """Files in folder that could have been the export by their name, but hold no table."""
    return sorted(p.name for p in folder.iterdir() if is_export_name(p.name) and p.is_file() and not is_export(p))


def file_kind(path):
    """What a file holds, by its first bytes: "xlsx", "xls", "ods", "zip", "table" (delimited text) or ""."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return zip_kind(path)
    if head.startswith(OLE2_MAGIC):
        return "xls"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = head[: len(head) & ~1].decode("utf-16", "replace")
    elif b"\0" in head:
        return ""
    else:
        text = head.decode("utf-8", "replace")
    return "table" if is_delimited(text, whole=len(head) < SNIFF_BYTES) else ""


def zip_kind(path):
    """What a zip file is: an XLSX workbook (or a damaged one: openpyxl says why), an ODS, or another archive."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "mimetype" in names and archive.read("mimetype").startswith(b"application/vnd.oasis.opendocument"):
                return "ods"
    except (zipfile.BadZipFile, OSError, ValueError):
        return "xlsx"  # cut off while written: openpyxl's refusal says so
    return "xlsx" if "[Content_Types].xml" in names else "zip"


def is_delimited(text, whole):
    """True when text reads as rows of two or more cells, most of them equally wide (a title line may stand above)."""
    lines = text.splitlines()
    if not whole:
        lines = lines[:-1]  # cut mid-line by the sample
    _, agreeing, _ = table_shape(lines)
    return agreeing >= 2 and agreeing * 2 >= len([line for line in lines[:SNIFF_LINES] if line.strip()])


SNIFF_LINES = 50  # lines of a file's start that its delimiter must agree with


def table_shape(lines):
    """(delimiter, lines agreeing, cells per line) of the delimiter that the most lines agree on, each cut into
    as many cells: a title line or a note does not count. (",", 0, 0) when none gives two cells."""
    lines = [line for line in lines[:SNIFF_LINES] if line.strip()]
    best = (",", 0, 0)
    for delimiter in DELIMITERS:
        widths = Counter(len(row) for row in csv.reader(lines, delimiter=delimiter) if len(row) > 1)
        if widths:
            width, agreeing = widths.most_common(1)[0]
            if (agreeing, width) > best[1:]:
                best = (delimiter, agreeing, width)
    return best


def links_out(path, folder):
    """True for a symbolic link to a file outside folder (it could expose any file the service may read)."""
    return path.is_symlink() and not path.resolve().is_relative_to(folder.resolve())


def is_export_name(name):
    """A name an export may have (see NAMED_EXPORTS); hidden files, Excel's ~$ lock files and backups~ are not."""
    return (
        Path(name).suffix.lower() in NAMED_EXPORTS + SNIFFED_EXPORTS
        and not name.startswith((".", "~$"))
        and not name.endswith("~")
    )


@dataclass
class Table:
    """An export opened for reading: its rows (lists of cell texts, header first), where reading
    is (line(), for error messages), and plain: True when no cell can hold FIELD or RECORD.

    cut_off(last row, header width) says why the file looks cut off, or "" (CSV only:
    a damaged workbook does not open at all).
    """

    rows: object
    line: object = lambda: None
    plain: bool = False
    marked: bool = True  # a cell may hold a spreadsheet's mark or damage (see count_marks); a workbook's may
    cut_off: object = lambda last, width: ""
    lost: list = dataclass_field(default_factory=lambda: [0])  # [count] of a workbook's numbers too long to be exact


@contextmanager
def open_table(path, sheet="", header_score=None, encoding=None):
    """The export at path as a Table, closed after; its content, not its name, says how it is read."""
    kind = file_kind(path)
    if kind in NOT_READ:
        export_error(path, NOT_READ[kind])
    if kind == "xlsx":
        with open_xlsx(path, sheet, header_score) as table:
            yield table
    else:
        with open_csv(path, encoding=encoding) as table:
            yield table


class NotUTF8(Exception):
    """The CSV is not UTF-8: read it again in a legacy encoding."""


def legacy_encoding(path):
    """Windows-1252 when the bytes decode as such (it leaves five undefined), else Latin-1."""
    try:
        with open(path, encoding="cp1252") as f:
            while f.read(READ_BUFFER):
                pass
        return "cp1252"
    except UnicodeDecodeError:
        return "latin-1"


@contextmanager
def open_csv(path, encoding=None):
    """A CSV's rows, whatever its delimiter and line ends; UTF-8 unless encoding says otherwise.

    UTF-8 is checked as the file is parsed, not in a pass of its own: a byte that is
    not UTF-8 raises NotUTF8, and the caller reads again in legacy_encoding().
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    wide = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))  # Excel's "Unicode Text" (.txt)
    if b"\0" in head and not wide:
        export_error(path, "is a binary file, not a CSV. Export the orders as CSV or XLSX.")
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<!doctype html", b"<html")):
        export_error(
            path,
            "is a web page (HTML), not an export: a shared link that needs signing in, or a "
            "preview page? Use the link that downloads the file itself.",
        )
    encoding = encoding or ("utf-16" if wide else "utf-8-sig" if head.startswith(codecs.BOM_UTF8) else "utf-8")
    with open(path, newline="", encoding=encoding, buffering=READ_BUFFER) as f, utf8_or_retry(encoding):
        # Read 1 MB at a time, not 8 KB: each read releases the GIL for a moment, and when
        # that happens every few dozen rows the request threads' claim to the GIL is reset
        # before it is due, so they starve: 700 ms stalls during a reload of 500,000 orders.
        # TextIOWrapper reads _CHUNK_SIZE bytes whatever the buffer; CPython lets us set it.
        with suppress(AttributeError):
            f._CHUNK_SIZE = READ_BUFFER
        # The same open file is scanned, then parsed, so a file replaced meanwhile cannot slip past.
        scan = scan_csv(f.buffer)
        if scan.long_line:
            export_error(
                path,
                f"has a line longer than {READ_BUFFER >> 20} MB, which no orders export has. "
                "Export the orders as CSV again.",
            )
        f.seek(0)
        first = f.readline(READ_BUFFER)
        offset = 0
        if re.fullmatch(r"sep=.\r?\n?", first, re.I | re.S):  # Excel's own hint, a line of its own
            delimiter, offset = first[4], 1
        else:
            f.seek(0)
            delimiter = sniff_delimiter(f.read(65536))
            f.seek(0)
        reader = csv.reader(f, delimiter=delimiter)

        def cut_off(last, width):
            """Why the file looks cut off mid-row, or "" (see README, "Refused exports")."""
            if not scan.ends_open:
                # A cut right after a line break inside a quoted cell (a note of several lines) ends
                # with a line end too: the open quote then swallowed it into the last cell.
                if last and last[-1].endswith(("\n", "\r")) and open_quote_at_end(f, delimiter):
                    return "a quoted cell is still open at the end of the file"
                return ""
            if last is not None and len(last) < width:
                return f"the last row has {len(last)} of {width} fields and no line end"
            if open_quote_at_end(f, delimiter):
                return "a quoted cell is still open at the end of the file"
            return ""

        # The scan's marks are single bytes apart; in UTF-16 they are not: look at every order.
        yield Table(reader, lambda: reader.line_num + offset, scan.plain, scan.marked or wide, cut_off)


@dataclass(frozen=True)
class Scan:
    """What one pass over a CSV's bytes found."""

    plain: bool  # no byte that separates packed cells (see Packer): orders need no check
    long_line: bool  # some line is longer than READ_BUFFER: refused before csv builds it in memory
    ends_open: bool  # the last byte is not a line end: the file may have been cut mid-row
    marked: bool = True  # bytes of a spreadsheet's mark or damage (=", E+, '): cells are looked at (see count_marks)


def scan_csv(binary):
    """Scan a CSV's bytes at C speed (memchr: 20 ms for 150 MB), 1 MB at a time in one buffer."""
    # A cell holding a separator of packed orders would shift its order's other cells, so
    # each order is checked unless the file has neither; every encoding read here writes
    # both characters (and '"', and line ends) as the same single byte. A full chunk without
    # a line end means a line longer than the chunk: a 500 MB file of one line would
    # otherwise be parsed into memory.
    needles = (FIELD.encode(), RECORD.encode())
    chunk = bytearray(READ_BUFFER)
    plain, long_line, marked, last = True, False, False, b"\n"
    while size := binary.readinto(chunk):
        if plain and any(chunk.find(needle, 0, size) >= 0 for needle in needles):
            plain = False
        # A mark could straddle two chunks: then it is one most exports never have anyway, and
        # an Excel guard is found again on the next row that has one.
        if not marked:
            marked = has_marks(chunk, size)
        if size == READ_BUFFER and chunk.find(b"\n") < 0 and chunk.find(b"\r") < 0:
            long_line = True
            break
        last = chunk[size - 1 : size]
    return Scan(plain, long_line, last not in (b"\n", b"\r"), marked)


def has_marks(chunk, size):
    """True when a CSV's bytes hold a spreadsheet's mark or damage: Excel's ="..." guard, a number in
    scientific notation, a cell guarded by a leading '. Each looked for the fast way: needles with a rare
    first byte, never a search that stops at every comma or point (a code given a .0 is looked for per order)."""
    # A two-byte needle is searched byte by byte (1 ms a MB); one byte with memchr (0.02 ms): most exports
    # hold no "=" or "+" at all, and then the two-byte search is not needed.
    if chunk.find(b"=", 0, size) >= 0 and chunk.find(b'="', 0, size) >= 0:
        return True
    if chunk.find(b"+", 0, size) >= 0 and chunk.find(b"E+", 0, size) >= 0:
        return True
    at = chunk.find(b"'", 0, size)
    while at >= 0:  # an apostrophe is rare, and most are inside names ("Women's"): one with a cell's start before it
        if at == 0 or chunk[at - 1] in b",;\t\n|":
            return True
        at = chunk.find(b"'", at + 1, size)
    return False


def open_quote_at_end(f, delimiter):
    """True when the file ends inside a quoted cell; asked only of a file without a final line end.

    An odd number of '"' is needed for that (50 ms for 150 MB); only then does a strict
    parse of the whole file tell an open quote from a stray inch mark ('27" wide').
    """
    f.buffer.seek(0)
    chunk, quotes = bytearray(READ_BUFFER), 0
    while size := f.buffer.readinto(chunk):
        quotes += chunk.count(b'"', 0, size)
    if quotes % 2 == 0:
        return False
    f.seek(0)
    try:
        for _ in csv.reader(f, delimiter=delimiter, strict=True):
            pass
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


@contextmanager
def utf8_or_retry(encoding):
    """Turn a decoding error while reading as UTF-8 into NotUTF8."""
    try:
        yield
    except UnicodeDecodeError:
        if encoding.startswith("utf-8"):
            raise NotUTF8() from None
        raise


def sniff_delimiter(sample):
    """The delimiter most of the sample's lines agree on (a title line above the header does not count), else ","."""
    return table_shape(sample.splitlines())[0]


@contextmanager
def open_xlsx(path, sheet, header_score):
    """The rows of a workbook's orders sheet, streamed; the workbook is closed after."""
    import openpyxl

    check_unpacked_size(path)
    # Handed over open: openpyxl judges a file by its name, and content decides here (see file_kind).
    with open(path, "rb") as source:
        try:
            book = openpyxl.load_workbook(source, read_only=True, data_only=True)
        except Exception as e:  # openpyxl raises many kinds on a damaged file; all mean the same here
            export_error(
                path,
                f"is not a readable XLSX workbook ({type(e).__name__}). "
                "Re-export it; it may have been cut off while being written.",
            )
        try:
            for worksheet in book.worksheets:
                # The declared size (<dimension ref="A1:XFD20000"/>) is the file's claim, not its
                # content: a 6 KB file declaring 16,384 columns would pad every row to that width.
                worksheet.reset_dimensions()
            # Line numbers are for CSV parse errors only; a workbook is not scanned, so each order is checked.
            lost = [0]
            yield Table(sheet_rows(pick_sheet(path, book, sheet, header_score), lost, path, header_score), lost=lost)
        finally:
            book.close()


MAX_UNPACKED_RATIO = 100  # a workbook's XML is 5 to 20 times its zip; a thousand times is a zip bomb


def check_unpacked_size(path):
    """Refuse a workbook whose parts unpack to far more than the file: one cell of 700 MB fits in 700 KB."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(item.file_size for item in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # openpyxl says it better: the workbook is damaged
    if unpacked > path.stat().st_size * MAX_UNPACKED_RATIO:
        export_error(
            path,
            f"unpacks to {unpacked / 1e6:,.0f} MB, over {MAX_UNPACKED_RATIO} times its own size: "
            "no spreadsheet program writes that. Export the orders again.",
        )


HEADER_GAP = 20  # empty header cells after which a stray value far to the right is not a column
HEADER_ROWS = 10  # rows looked at for the header: a title or a line of separators may stand before it


EXCEL_ROWS = 1_048_576  # the most rows a sheet can have in Excel, LibreOffice and every exporter


def sheet_rows(worksheet, lost=None, path=None, header_score=None):
    """The sheet's header row (the first non-empty one that header_score reads as one, else the first non-empty),
    with any rows above it, then every later row as wide as that header, empty rows left out."""
    rows, above = worksheet.iter_rows(values_only=True), []
    for number, row in enumerate(rows, 1):
        if number > EXCEL_ROWS:
            break
        cells = [cell_text(v, lost) for v in row]
        if not header_width(cells):
            continue
        above.append((number, cells))
        if header_score is None or header_score(cells) or len(above) == HEADER_ROWS:
            break
    else:
        if not above:
            return
    if header_score and not header_score(above[-1][1]):
        above = above[:1]  # no row reads as a header: the first is taken, as it always was
    header_number, header = above[-1]
    width = header_width(header)
    for _, cells in above:
        yield cells[:width]
    rows.close()
    empty = (None,) * width  # the row openpyxl makes up for every row missing from the file
    # openpyxl makes up every row missing before a row the file numbers: <row r="999999999999">
    # in a 6 KB file would be a day of made-up rows. No sheet has more than EXCEL_ROWS.
    following = worksheet.iter_rows(min_row=header_number + 1, max_col=width, values_only=True)
    for number, row in enumerate(following, header_number + 1):
        if number > EXCEL_ROWS:
            export_error(
                path or "the workbook",
                f"numbers a row past {EXCEL_ROWS:,}, the most a sheet can have: it is damaged or "
                "was not written by a spreadsheet program. Export the orders again.",
            )
        if row != empty:
            cells = [v if v.__class__ is str else cell_text(v, lost) for v in row]  # most cells are text already
            if any(cells):
                yield cells


def header_width(cells):
    """How many columns the header has: up to its last cell before a long run of empty ones."""
    width = gap = 0
    for position, cell in enumerate(cells, 1):
        if cell.strip():
            width, gap = position, 0
        elif width and (gap := gap + 1) > HEADER_GAP:
            break
    return width


def pick_sheet(path, book, sheet, header_score):
    """The sheet named in [settings] sheet, or the first whose header reads most surely as the orders'.

    A known layout's header beats a bare order-number column: Matrixify's workbook has a
    Customers sheet with "ID" (Magento's order number) before its Orders sheet.
    """
    if sheet:
        if sheet not in book.sheetnames:
            export_error(
                path,
                f"has no sheet {sheet!r}. Sheets: {', '.join(map(printable, book.sheetnames))}. "
                "Fix [settings] sheet in contexts.toml.",
            )
        return book[sheet]
    if not book.worksheets:
        export_error(
            path, "holds no worksheet: it is damaged, or was cut off while being written. Export the orders again."
        )
    if header_score is None or len(book.worksheets) == 1:
        return book.worksheets[0]
    best, best_score = book.worksheets[0], 0
    for worksheet in book.worksheets:
        for row in worksheet.iter_rows(values_only=True, max_row=20):
            cells = [cell_text(v) for v in row]
            if any(cells):
                if (score := header_score(cells)) > best_score:
                    best, best_score = worksheet, score
                break
        if best_score == 2:
            break
    return best


def cell_text(value, lost=None):
    """A spreadsheet cell as text: 1001.0 -> '1001', dates as ISO so they render readably.

    A number of 16 digits or more (a tracking number typed into a numeric cell) is kept by a
    spreadsheet to 15 only: 9400111899223197428490 comes back as 9400111899223200000000.
    Shown, it would send a customer to someone else's parcel; it reads as empty, and lost
    counts it for `check`.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        if not -1e15 < value < 1e15:
            if lost is not None:
                lost[0] += 1
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == datetime.min.time() else value.isoformat(" ", "minutes")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


###############################################################################
# Cells: dates, damaged numbers, field shapes, matching keys ##################
###############################################################################
#
# One cell at a time: the dates exports write and which way round a column writes them,
# numbers a spreadsheet damaged, the shapes of an email, an order number, a tracking number,
# and the normalised order number and email that lookups match on.

# Dates: every form exports write, read per column ############################
#
# '2026-11-28 10:00 -0400', '7/25/2018 21:06', '2/20/12 4:02 PM', '24/10/2025',
# '16-05-2018 07:21:32', '05.11.2025', 'Jan-18-16', '18 Jan 2016', an Excel serial day.
# A numeric date says the day first or the month first by its column: a value over 12
# settles it; else the file's language, where that language has one convention (every
# language but English writes the day first); else the date is shown as written, never
# guessed. Answers write it as contexts.toml's [settings] language does (vocabulary.toml
# [dates]).


def spreadsheet_text(value):
    """A cell without the marks spreadsheets and exporters add that change nothing: Excel's ="..." guard, a
    leading ', quotes around the whole value ('"SG101"')."""
    value = value.strip()
    if value[:2] == '="' and value[-1:] == '"':
        value = value[2:-1].replace('""', '"')
    elif value[:1] == "'":
        value = value[1:]
    elif value[:1] == '"' and value[-1:] == '"' and len(value) > 2:
        value = value[1:-1]
    return value.strip()


def damaged_number(value):
    """True for a number a spreadsheet damaged for good: scientific notation (3,60003E+14) or a .0 added to a code."""
    return bool(DAMAGED.fullmatch(value.strip()))


PRODUCT_ID = re.compile(r"(?:\d+\s*x\s*)?[0-9a-fA-F-]{16,}(?:\|.*)?")  # "1x 0193a1e0ee4f..." : an id, not a name
DAMAGED = re.compile(r"\d+(?:[.,]\d+)?[eE][+]\d{1,3}|\d{6,}\.0")
ADDED_ZERO = re.compile(r"(?<=\d)\.0+$")  # the .0 a spreadsheet adds to a number it took for a quantity


DATE_ISO = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ].*)?")
DATE_YMD = re.compile(r"(\d{4})[/.](\d{1,2})[/.](\d{1,2})(?:[T ,].*)?")
DATE_NUMERIC = re.compile(r"(\d{1,2})([/.\-])(\d{1,2})\2(\d{4}|\d{2})(?:[T ,].*)?")
DATE_NAMED = re.compile(
    r"([^\W\d_]{3,10})\.?[\s\-]+(\d{1,2}),?[\s\-]+(\d{4}|\d{2})(?:[T ,].*)?"  # Jan-18-16, Jan 18, 2016
    r"|(\d{1,2})[\s\-.]+([^\W\d_]{3,10})\.?[\s\-.]+(\d{4}|\d{2})(?:[T ,].*)?"
)  # 18-Jan-2016, 5. März 2025
DATE_SERIAL = re.compile(r"[3-7]\d{4}(?:\.\d+)?")  # Excel's day numbers of 1982 to 2173
MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("jan", "january", "janv", "ene", "enero", "gen", "janeiro", "januar", "styczen", "sty"),
            ("feb", "february", "fev", "fevr", "febrero", "fevereiro", "februar", "febbraio", "lut"),
            ("mar", "march", "mars", "marz", "maerz", "marzo", "marco", "maart", "mrt"),
            ("apr", "april", "avr", "avril", "abr", "abril", "aprile", "kwi"),
            ("may", "mai", "mayo", "maio", "mag", "maggio", "mei", "maj"),
            ("jun", "june", "juin", "junio", "junho", "juni", "giu", "giugno", "cze"),
            ("jul", "july", "juil", "juillet", "julio", "julho", "juli", "lug", "luglio", "lip"),
            ("aug", "august", "aout", "ago", "agosto", "augustus", "sie"),
            ("sep", "sept", "september", "septembre", "septiembre", "set", "setembro", "settembre", "wrz"),
            ("oct", "october", "octobre", "octubre", "out", "outubro", "okt", "oktober", "ott", "ottobre", "paz"),
            ("nov", "november", "novembre", "noviembre", "novembro", "lis"),
            ("dec", "december", "decembre", "dic", "diciembre", "dez", "dezembro", "dezember", "dicembre", "gru"),
        ),
        1,
    )
    for name in names
}


@lru_cache(maxsize=8192)  # an export's orders fall on a few hundred days, each written the same way
def date_parts(text, day_first=None):
    """(year, month, day) of a date in any form exports write, or None.

    day_first: how the column writes a numeric date such as 05/06/2025 (see day_order);
    None when it is not known, and then such a date is None: never guessed.
    """
    text = spreadsheet_text(text)
    if match := DATE_ISO.fullmatch(text) or DATE_YMD.fullmatch(text):
        parts = int(match[1]), int(match[2]), int(match[3])
    elif match := DATE_NUMERIC.fullmatch(text):
        first, second, year = int(match[1]), int(match[3]), full_year(match[4])
        if match[2] == "." or first > 12 or second > 12:  # 05.11.2025 is written so only day first
            day_first = match[2] == "." or first > 12
        if day_first is None:
            return None
        parts = (year, second, first) if day_first else (year, first, second)
    elif match := DATE_NAMED.fullmatch(text):
        name, day, year = (match[1], match[2], match[3]) if match[1] else (match[5], match[4], match[6])
        month = MONTHS.get(unaccented(name).casefold().rstrip("."))
        if month is None:
            return None
        parts = (full_year(year), month, int(day))
    else:
        return None
    return parts if valid_day(*parts) else None


def looks_like_date(text):
    """True for a cell that is a date in some form, even one whose day and month cannot be told apart yet."""
    text = spreadsheet_text(text)
    return bool(date_parts(text, day_first=False) or date_parts(text, day_first=True))


def full_year(text):
    """A year as written ('16', '2016') in full: two digits are 2000 to 2068, then 1969 to 1999, as Excel reads them."""
    year = int(text)
    return year if len(text) == 4 else year + (2000 if year < 69 else 1900)


def valid_day(year, month, day):
    """True for a real day from 1970 to 2199."""
    try:
        return 1970 <= year <= 2199 and bool(date(year, month, day))
    except ValueError:
        return False


def day_order(values):
    """True (day first), False (month first) or None (undecided) from a column's numeric dates.

    Only a part over 12 tells; a dot says day first. Dates in other forms say nothing.
    """
    for text in values:
        match = DATE_NUMERIC.fullmatch(spreadsheet_text(text))
        if match is None:
            continue
        if match[2] == "." or int(match[1]) > 12:
            return True
        if int(match[3]) > 12:
            return False
    return None


class DayOrder:
    """Whether each date column of an export writes the day or the month first, from its values (see day_order).

    Decided from the first rows where they tell; a column still undecided whose dates are
    numeric is watched as the export is read, until a value tells; then the file's language
    decides (every language but English puts the day first); else it stays None: such a
    date is shown as written, never guessed.
    """

    def __init__(self, plan, sample, day_first_language):
        self.decided, self.watched = {}, {}
        for place, field_name in enumerate(plan.order_fields):
            if FIELD_CONTENT.get(field_name) != "date":
                continue
            column = plan.order_columns[place]
            values = [row[column] for row in sample if column is not None and column < len(row)]
            self.decided[field_name] = day_order(values)
            if self.decided[field_name] is None and any(DATE_NUMERIC.fullmatch(spreadsheet_text(v)) for v in values):
                self.watched[field_name] = place
        self.fallback = True if day_first_language else None

    def see(self, values):
        """Look at one order's values of the columns still undecided."""
        for field_name, place in list(self.watched.items()):
            if (told := day_order((values[place],))) is not None:
                self.decided[field_name] = told
                del self.watched[field_name]

    def result(self):
        """{date field: True (day first), False (month first) or None (not known)}."""
        return {name: self.fallback if told is None else told for name, told in self.decided.items()}


def serial_day(text):
    """(year, month, day) of an Excel day number (45231 is 2023-11-01) in a date column, or None."""
    if not DATE_SERIAL.fullmatch(text):
        return None
    day = date(1899, 12, 30) + timedelta(days=int(float(text)))
    return day.year, day.month, day.day


# What the cells of each field must look like (see cells_fit).
FIELD_CONTENT = {
    "order_id": "id",
    "email": "email",
    "status": "status",
    "order_state": "status",
    "financial_status": "status",
    "shipment_status": "status",
    "item_status": "status",
    "cancelled_at": "date",
    "order_date": "date",
    "shipped_at": "date",
    "estimated_delivery": "date",
    "tracking_number": "tracking",
    "tracking_url": "link",
    "carrier": "word",
    "shipping_method": "word",
    "item_name": "text",
    "item_quantity": "quantity",
    "item_shipped_quantity": "quantity",
    "item_refunded_quantity": "quantity",
    "item_needs_shipping": "flag",
    "item_variant": "text",
}


# Cell content: the shapes of each field ######################################

EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# Short codes, with at most one inner space ("AB 10023", as some ERPs write them).
ID_SHAPE = re.compile(r"(?=.{1,40}$)#?[0-9A-Za-z][0-9A-Za-z#/_.\-]*(?: [0-9A-Za-z#/_.\-]+)?")
NOT_AN_ID = re.compile(r"\d+[.,]\d{1,2}|\d{1,4}[-./]\d{1,2}[-./]\d{1,4}.*|\d{1,2}:\d{2}.*")  # amounts, dates, times
TRACKING_SHAPE = re.compile(r"(?=\S*\d)[0-9A-Za-z][0-9A-Za-z.\-/]{1,45}")  # a parcel's number: a code with a digit
NUMBER_TEXT = re.compile(r"[-+]?\d{1,12}(?:[.,]\d+)?")
URL_SHAPE = re.compile(r"https?://\S+", re.I)


def cells_fit(kind, values, known=frozenset()):
    """(fits: True, False, or None when no cell is filled; evidence) of a column's sample values for a kind of field.

    known: status words the rules or the vocabulary know, for a status column's evidence.
    """
    filled = [v for v in (spreadsheet_text(v) for v in values) if v]
    if not filled:
        return None, "no cell filled in the first rows"
    share = lambda test: sum(1 for v in filled if test(v)) / len(filled)
    distinct = len(set(filled))
    example = printable(max(filled, key=len))[:24]
    if kind == "email":  # half: a shop's "n/a" or "-" for orders taken by phone does not make it another column
        ok = share(EMAIL_SHAPE.fullmatch) >= 0.5
        return ok, f"{sum(1 for v in filled if EMAIL_SHAPE.fullmatch(v))} of {len(filled)} are e-mail addresses"
    if kind == "id":
        ok = share(ID_SHAPE.fullmatch) >= 0.9 and share(NOT_AN_ID.fullmatch) <= 0.2
        return ok, f"{distinct} distinct values, shaped like {example!r}"
    if kind == "link":
        return share(
            URL_SHAPE.match
        ) >= 0.8, f"{sum(1 for v in filled if URL_SHAPE.match(v))} of {len(filled)} are links"
    if kind == "tracking":
        ok = (
            share(
                lambda v: bool(TRACKING_SHAPE.fullmatch(v.replace(" ", "")) or SEVERAL.search(v) or damaged_number(v))
            )
            >= 0.6
        )
        return ok, f"{distinct} codes like {example!r}"
    if kind == "quantity":
        ok = share(lambda v: quantity_value(v) is not None) >= 0.5
        return ok, f"numbers such as {example!r}"
    if kind == "flag":
        return share(lambda v: status_word(v) in FLAGS) >= 0.8, f"yes or no: {example!r}"
    if kind == "date":
        ok = share(lambda v: looks_like_date(v) or bool(DATE_SERIAL.fullmatch(v))) >= 0.8
        return ok, f"dates such as {example!r}"
    wordy = share(lambda v: not (NUMBER_TEXT.fullmatch(v) or EMAIL_SHAPE.fullmatch(v) or URL_SHAPE.match(v))) >= 0.8
    if kind == "status":
        words = {status_word(v) for v in filled}
        ok = wordy and distinct <= max(12, len(filled) // 2)
        return ok, f"{distinct} values, {len(words & known)} known"
    if kind == "word":
        return wordy and distinct <= max(20, len(filled) * 2 // 3), f"{distinct} values such as {example!r}"
    codes = share(lambda v: bool(NUMBER_TEXT.fullmatch(v) or PRODUCT_ID.fullmatch(v)))
    return codes <= 0.5, f"texts such as {example!r}"


@lru_cache(maxsize=1024)  # an export holds few distinct quantities ("1", "2", "3.0000"), read at every lookup
def quantity_value(text):
    """A quantity as a number: '3', '3.0000', '3,0' and '3.00' are 3; None when it is no small count."""
    text = spreadsheet_text(text)
    if not NUMBER_TEXT.fullmatch(text):
        return None
    try:
        number = float(text.replace(",", "."))
    except ValueError:
        return None
    return number if 0 <= number <= 1_000_000 else None


def normalise_order_id(value):
    """'#1001', ' # 1001 ', '1001' and the spreadsheet's '1001.0' are all '1001'."""
    key = value.lstrip("#")  # Shopify's #1001; then the usual cases, without a regex (run once an order):
    if key.isdigit():  # 1001
        return key
    if key.isalnum():  # SO12
        return key.casefold()
    value = value.strip()
    value = re.sub(r"^(#?\s*\d+)\.0+$", r"\1", value)
    return re.sub(r"[\W_]+", "", value).casefold()


def without_leading_zeros(value):
    """normalise_order_id, and an all-digit number without its leading zeros: 000000123 is 123."""
    key = normalise_order_id(value)
    return key.lstrip("0") or key if key.isdigit() else key


def normalise_email(value):
    """Emails compare trimmed and without case; a space inside is a "+" a caller left unencoded.

    An address has no spaces, but a query string turns an unencoded "+" (jo+shop@example.com,
    as many shoppers sign up) into one.
    """
    return value.strip().casefold().replace(" ", "+")


def index_key(order_key, email_key):
    """The index's key from a normalised order number and email: one probe finds both or neither.

    Bytes, not text: 16 bytes less per order for Python's object header (8 MB at 500,000).
    """
    return f"{order_key}\x1f{email_key}".encode()


# How exports write yes and no in a column such as "Lineitem requires shipping" or "Producto Físico".
FLAGS = {
    **dict.fromkeys(("true", "yes", "y", "1", "si", "sim", "ja", "oui", "wahr", "tak"), True),
    **dict.fromkeys(("false", "no", "n", "0", "nein", "non", "nao", "nee", "nie", "falsch"), False),
}


SEVERAL = re.compile(r"[,;|\n]+")  # several tracking numbers in one cell


###############################################################################
# Columns: header words and cell content ######################################
###############################################################################
#
# Which column feeds which field. A layout (layouts.toml) or [columns] of contexts.toml may
# name the header exactly; every other field is found by the words of the headers
# (vocabulary.toml [words] and [fields]), then confirmed by what the cells hold. Uses the
# configuration, the words and the cells above.

# Fields in the order they take a column: the specific before the general, so that
# "Item Qty Shipped" is the shipped quantity before any quantity may take it.
FIELD_ORDER = (
    "order_id",
    "email",
    "item_shipped_quantity",
    "item_refunded_quantity",
    "item_quantity",
    "item_needs_shipping",
    "item_variant",
    "tracking_url",
    "tracking_number",
    "carrier",
    "status",
    "order_state",
    "financial_status",
    "shipment_status",
    "item_status",
    "cancelled_at",
    "shipped_at",
    "estimated_delivery",
    "order_date",
    "shipping_method",
    "item_name",
)


@dataclass(frozen=True)
class Fit:
    """A column whose values fit a field, and why: what `check` shows and the log names."""

    column: int
    evidence: str
    rank: tuple = ()  # higher is likelier


def found_by_content(config, header, sample, chosen, layout=None):
    """{field: [Fit, best first]} for the order number, email and status columns not found by header.

    Read from the values of the first rows: e-mail addresses; values shaped like order
    numbers whose repeats lie together (an order's item rows); known status words.
    """
    wanted = [f for f in ("order_id", "email", "status") if f not in chosen]
    rows = [row for row in sample if any(cell.strip() for cell in row)]
    if not wanted or len(rows) < 2:
        return {}
    taken = set(chosen.values())
    values = {i: [row[i].strip() if i < len(row) else "" for row in rows] for i in range(len(header)) if i not in taken}
    found = {}
    if "email" in wanted:
        found["email"] = email_fits(values, len(rows))
    if "order_id" in wanted:
        emails = [f.column for f in found.get("email", ())] or [chosen.get("email")]
        found["order_id"] = order_fits(values, len(rows), set(emails))
    if "status" in wanted:
        found["status"] = status_fits(config, values, len(rows), layout)
    return {field: found[field] for field in ("order_id", "email", "status") if found.get(field)}


def email_fits(values, count):
    """Columns whose filled cells are nearly all e-mail addresses, on at least half the rows."""
    fits = []
    for column, cells in values.items():
        filled = [c for c in cells if c]
        emails = sum(1 for c in filled if EMAIL_SHAPE.fullmatch(c))
        if filled and emails >= 0.9 * len(filled) and len(filled) >= 0.5 * count:
            fits.append(Fit(column, f"{emails} of {count} rows hold an e-mail address", (emails,)))
    return sorted(fits, key=lambda f: f.rank, reverse=True)


def order_fits(values, count, emails):
    """Columns filled on nearly every row with short codes holding a digit, each code's rows together."""
    fits = []
    for column, cells in values.items():
        if column in emails:
            continue
        filled = [c for c in cells if c]
        if len(filled) < 0.9 * count or not all(ID_SHAPE.fullmatch(c) for c in filled):
            continue
        if sum(any(ch.isdigit() for ch in c) for c in filled) < 0.8 * len(filled) or sum(
            bool(NOT_AN_ID.fullmatch(c)) for c in filled
        ) > 0.2 * len(filled):
            continue
        if counts_rows(cells):
            continue
        runs = [value for value, _ in groupby(cells) if value]
        distinct = len(set(filled))
        if distinct < 2 or len(runs) != distinct:  # a value seen again after others: not an order's rows
            continue
        repeats = distinct < len(filled)  # item rows of one order: the likeliest sign of an order number
        example = max(filled, key=len)
        fits.append(
            Fit(
                column,
                f"{distinct} distinct values over {count} rows, shaped like {printable(example)[:20]!r}",
                (repeats, -len(example) // 8, -column),
            )
        )
    return sorted(fits, key=lambda f: f.rank, reverse=True)


def counts_rows(cells):
    """True for a column that numbers the rows (1, 2, 3, ... from the first): a row counter, not orders."""
    return (
        len(cells) > 2
        and all(c.isdecimal() for c in cells)
        and [int(c) for c in cells] == list(range(int(cells[0]), int(cells[0]) + len(cells)))
        and int(cells[0]) <= 1
    )


def status_fits(config, values, count, layout):
    """Columns whose filled cells are mostly status words the rules or the vocabulary know."""
    # The words the rules read in the status field, and the words that mean one of them: a
    # payment column ("bezahlt") is not taken for the order's state.
    known = rule_words(config.rules, "status")
    known |= {word for word, meaning in (config.meanings or {}).items() if meaning in known}
    known |= set((layout.statuses if layout else {}).get("status", {}))
    fits = []
    for column, cells in values.items():
        filled = [c for c in cells if c]
        words = [status_word(c) for c in filled]
        hits = sum(w in known for w in words)
        if (
            filled
            and hits >= 0.8 * len(filled)
            and len(filled) >= 0.5 * count
            and len(set(words)) <= 0.5 * len(words) + 1
        ):
            seen = ", ".join(dict.fromkeys(printable(c)[:20] for c in filled))
            fits.append(Fit(column, f"{hits} of {len(filled)} values are status words ({seen[:60]})", (hits,)))
    return sorted(fits, key=lambda f: f.rank, reverse=True)


def proposal_text(config, header, found):
    """The [columns] lines `check` prints for columns found by their content: each one's header first."""
    if not found:
        return ""
    # No "[columns]" line of its own: pasted below the file's own table, a second one is an error.
    lines = [
        "",
        "Found by their content; in contexts.toml, under [columns], add these lines (in place of "
        "any lines of the same fields):",
    ]
    for field_name, fits in found.items():
        names = [header[fits[0].column].strip(), *config.columns.get(field_name, ())]
        others = f"; also fits: {', '.join(repr(header[f.column].strip()) for f in fits[1:3])}" if fits[1:] else ""
        lines.append(
            f"{field_name} = {json.dumps(list(dict.fromkeys(names)), ensure_ascii=False)}  # {fits[0].evidence}{others}"
        )
    return "\n".join(lines)


def header_positions(header):
    """({loose header key: its first column}, {key: the headers that read alike}) of a file's header."""
    positions, alike_headers = {}, {}
    for index, text in enumerate(header):
        key = header_key(text)
        if key in positions:
            alike_headers.setdefault(key, [header[positions[key]].strip()]).append(text.strip())
        else:
            positions[key] = index
    return positions, alike_headers


@dataclass(frozen=True)
class Choice:
    """What feeds each field and why: (field -> column), (field -> evidence), and what else fitted."""

    chosen: dict
    evidence: dict
    others: dict  # field -> columns that fit too, best first (a second order number, another email column)
    contradicted: tuple = ()  # (field, header, why) of [columns] choices whose cells do not fit: kept, check warns
    found: dict = (
        None  # field -> [Fit]: columns whose content alone fits a field no header says (order_id, email, status)
    )


def data_rows(sample, header=()):
    """The sample's rows that look like data: as filled as most, not a footer, a separator, a lone note or the
    header row again (two exports pasted one under the other)."""
    again = [h.strip().casefold() for h in header]
    sample = [row for row in sample if [c.strip().casefold() for c in row[: len(again)]] != again] if again else sample
    filled = [sum(1 for cell in row if cell.strip()) for row in sample]
    if not filled:
        return sample
    typical = sorted(filled)[len(filled) // 2]
    return [row for row, count in zip(sample, filled) if count * 2 >= typical and count]


def choose_columns(config, layout, header, sample, previous=None, reserved=()):
    """Choose a column for each field: a layout's or [columns]' exact header, else the header words, cells agreeing.

    A field the layout names is read from its columns alone. previous: {field: header} of the
    choice accepted last time for this same header row, kept as it was (see Service): a
    column's content varies from night to night, the choice must not. reserved: columns the
    layout reads by its own rules (packed items, row types), which no field takes.
    """
    positions, _ = header_positions(header)
    sample = data_rows(sample, header)
    values = lambda column: [row[column] if column < len(row) else "" for row in sample]
    chosen, evidence, others, contradicted, taken = {}, {}, {}, [], set(reserved)

    def take(field_name, column, why):
        chosen[field_name], evidence[field_name] = column, why
        taken.add(column)

    for field_name, names in exact_columns(config, layout):
        present = [positions[k] for k in dict.fromkeys(map(header_key, names)) if k in positions]
        present = [c for c in present if c not in taken]
        if field_name == "order_id" and sample:  # a number column left empty gives way to the next
            present.sort(key=lambda c: not any(v.strip() for v in values(c)))
        if not present:
            continue
        source = (
            "[columns]"
            if field_name in config.columns
            else f"[layouts.{layout.key}]"
            if layout and field_name in layout.columns
            else "[vocabulary.headers]"
        )
        take(field_name, present[0], f"named in {source}")
        others[field_name] = tuple(present[1:])
        kind = FIELD_CONTENT.get(field_name)
        if kind and source == "[columns]" and cells_fit(kind, values(present[0]))[0] is False:
            contradicted.append((field_name, header[present[0]].strip(), cells_fit(kind, values(present[0]))[1]))
    if previous:
        for field_name, name in previous.items():
            column = positions.get(header_key(name))
            if field_name not in chosen and column is not None and column not in taken:
                take(field_name, column, "as chosen for this header before")
    firsts = set(positions.values())  # of headers that read alike, the first is the one read
    words = [header_words(h) if column in firsts else () for column, h in enumerate(header)]
    known = known_statuses(config, layout)
    for field_name in FIELD_ORDER:
        if field_name in chosen or layout and field_name in layout.columns:
            continue
        fitting = []
        for column, column_words in enumerate(words):
            reading = None if column in taken else config.words.reading(field_name, column_words)
            if reading is None:
                continue
            fits, why = cells_fit(FIELD_CONTENT[field_name], values(column), known)
            if fits is False:
                continue  # its cells say it is something else
            filled = sum(1 for v in values(column) if spreadsheet_text(v))
            fitting.append(((reading[0], fits is None, -filled, reading[1], column), column, f"{reading[2]}; {why}"))
        if fitting:
            fitting.sort()
            take(field_name, fitting[0][1], fitting[0][2])
            # Other columns said the first way (a marketplace's order number beside the shop's): kept aside.
            others[field_name] = tuple(
                column for rank, column, _ in fitting[1:] if column not in taken and rank[0] == 0 and rank[1] is False
            )
    found = found_by_content(config, header, sample, chosen, layout)
    for field_name, fits in found.items():
        if field_name not in chosen and len(fits) == 1:  # content alone, and only one column: never a guess
            take(field_name, fits[0].column, f"found by its content: {fits[0].evidence}")
    return Choice(chosen, evidence, others, tuple(contradicted), found)


def relay_domain(address, relays):
    """The marketplace whose relay address this is (x@marketplace.amazon.de -> "Amazon"), or None."""
    domain = address.rpartition("@")[2].strip().strip(">").lower()
    return next((name for relay, name in relays.items() if domain == relay or domain.startswith(relay + ".")), None)


def relay_addresses(config, plan, sample):
    """{"marketplace", "addresses", "of"} when the sample's e-mails are a marketplace's relay addresses, else None.

    Known by their domain (vocabulary.toml [relays]), or by a header that calls them so
    ("Virtual email", "Anonymised e-mail"): then the export's platform is the marketplace.
    """
    emails = [row[plan.email_column].strip() for row in data_rows(sample) if plan.email_column < len(row)]
    emails = [e for e in emails if "@" in e]
    if not emails:
        return None
    by_domain = Counter(relay_domain(e, config.relays or {}) for e in emails)
    by_domain.pop(None, None)
    header = plan.header[plan.email_column] if plan.email_column < len(plan.header) else ""
    if not by_domain and set(header_words(header)) & config.words.groups.get("relay", frozenset()):
        by_domain[plan.rules.name if plan.rules else "the marketplace"] = len(emails)
    if not by_domain:
        return None
    marketplace, count = by_domain.most_common(1)[0]
    return {"marketplace": marketplace, "addresses": count, "of": len(emails)}


def exact_columns(config, layout):
    """(field, headers) that contexts.toml's [columns], the layout or [vocabulary.headers] name exactly, in that order.

    The merchant's [columns] line wins over everything; a field the layout names is read from
    its columns alone, because a general name may mean another thing in a known export:
    Matrixify's "Fulfillment: Status" (a parcel's success or cancelled) reads as
    "Fulfillment Status", which is not the order's.
    """
    own = layout.columns if layout else {}
    fields = dict.fromkeys((*config.columns, *own, *(config.headers or {})))
    for field_name in fields:
        names = config.columns.get(field_name) or own.get(field_name) or (config.headers or {}).get(field_name, ())
        if names:
            yield field_name, names


def known_statuses(config, layout):
    """The status words the rules name, the vocabulary's words for them, and the layout's own."""
    known = rule_words(config.rules)
    known |= {word for word, meaning in (config.meanings or {}).items() if meaning in known}
    return known | {w for words in ((layout.statuses or {}) if layout else {}).values() for w in words}


###############################################################################
# The plan: the columns chosen, checked against the templates #################
###############################################################################
#
# A Plan says, for one export's header, where each field is read and what the templates may
# show; refusals name the missing column and the headers the file does have. Uses the
# columns above.


@dataclass(frozen=True)
class Plan:
    """Which column feeds which field, and how rows are read, worked out once from the header row."""

    chosen: dict  # field -> header text
    order_fields: tuple[str, ...]  # per-order fields, in the order they are packed
    order_columns: tuple[int, ...]
    row_fields: tuple[str, ...]  # per-row fields (items, tracking numbers): the columns', then packed ones'
    row_columns: tuple[int, ...]  # the columns of the first len(row_columns) row fields
    layout: str  # its name, for check and /healthz
    email_column: int  # read for the index's key; packed only when an answer shows {email}
    email_fallback: tuple[int, ...] = ()  # other email columns, read where the first is empty (Customer: Email)
    rules: Layout | None = None  # the layout recognised, if any: its rows, packed cells and statuses
    type_column: int | None = None
    item_columns: tuple[int, ...] = ()  # cells that pack items
    tracking_columns: tuple[int, ...] = ()  # cells that pack tracking entries
    competing: tuple = ()  # (field, header chosen, other headers that fit), for check
    headers_alike: tuple = ()  # (header, header, ...) of columns whose headers read alike, for check
    ignore_leading_zeros: bool = False
    ignore_rows: tuple = ()  # (column, status_word()s): rows left out, e.g. a cancelled parcel's
    senses: dict = None  # the layout's statuses: field -> {its word: the word rules use}
    header: tuple = ()  # the file's headers, for check
    detected: tuple = ()  # (field, header, evidence) of columns served because their content fits
    found: dict = None  # field -> [Fit]: columns whose content fits a field no header named, for check
    other_ids: tuple[int, ...] = ()  # columns of other order numbers a customer may hold (a marketplace's)
    evidence: dict = None  # field -> why its column was chosen ("header words: ...; 3 values, 2 known"), for check
    contradicted: tuple = ()  # (field, header, why) of [columns] choices whose cells do not fit, for check

    @property
    def rich(self):
        """True when rows are read by the layout's rules, not only cell by cell."""
        return self.type_column is not None or bool(self.item_columns or self.tracking_columns)


def make_plan(config, header, name, sample=(), layout=None, previous=None):
    """Match the layout's, the mapping's and the vocabulary's words to the file's headers; ExportError names what is
    missing.

    sample: the first rows, whose cells confirm each column (see choose_columns).
    layout: given for webhook events (EVENT_LAYOUT), whose orders lack the export's other
    columns: a placeholder that names one reads empty there. previous: the columns chosen
    for this header row last time (see OrderReader): kept, whatever tonight's cells say.
    """
    forced = layout
    positions, alike_headers = header_positions(header)
    layout = forced or detect_layout(config.layouts, positions)
    if layout and layout.refuse:
        raise ExportError(f"{name}: this is the {layout.name}, which cannot answer lookups. {layout.refuse}", file=name)
    packed_items = packed_columns(header, layout.items if layout else None)
    packed_tracking = packed_columns(header, layout.tracking if layout else None)
    type_column = positions.get(header_key(layout.row_type)) if layout and layout.row_type else None
    reserved = (*packed_items, *packed_tracking, *(() if type_column is None else (type_column,)))
    choice = choose_columns(config, layout, header, sample, previous, reserved)
    chosen = choice.chosen
    for field_name in REQUIRED_FIELDS:
        if field_name not in chosen:
            raise missing_column(config, layout, header, name, field_name, choice.found or {})
    detected = tuple(
        (f, header[c].strip(), choice.evidence[f].partition(": ")[2])
        for f, c in chosen.items()
        if choice.evidence[f].startswith("found by its content")
    )
    by_snake = {}
    for index, text in enumerate(header):
        by_snake.setdefault(snake_case(text), index)
    if not forced:
        check_placeholders(config, by_snake, name, layout)
    # Per order, beside its number: every field used that a column feeds. Derived names
    # (items, tracking_url, ...) are computed, unless mapped to a column of their own.
    per_row = {"order_id", *ROW_FIELDS}
    # Packed tracking entries bring their carrier and link: those fields exist without a column.
    from_entries = {"carrier", "tracking_url"} if packed_tracking else set()
    order_fields = [
        f
        for f in sorted(config.fields_used - per_row)
        if f in chosen or f in from_entries or (f not in DERIVED and f in by_snake)
    ]
    row_fields = [f for f in ROW_FIELDS if f in chosen]
    extra = [
        f
        for f in (("item_name", "item_quantity") if packed_items else ())
        + (("tracking_number",) if packed_tracking else ())
        if f not in row_fields
    ]
    plan = Plan(
        chosen={f: header[i].strip() for f, i in chosen.items()},
        order_fields=("order_id", *order_fields),
        order_columns=(
            chosen["order_id"],
            *(chosen.get(f, None if f in from_entries else by_snake.get(f)) for f in order_fields),
        ),
        row_fields=(*row_fields, *extra),
        row_columns=tuple(chosen[f] for f in row_fields),
        layout=layout.name if layout else "generic export",
        email_column=chosen["email"],
        email_fallback=choice.others.get("email", ()),
        other_ids=choice.others.get("order_id", ()),
        rules=layout,
        type_column=type_column,
        item_columns=packed_items,
        tracking_columns=packed_tracking,
        competing=tuple((f, chosen[f], others) for f, others in choice.others.items() if others and f in chosen),
        headers_alike=tuple(map(tuple, alike_headers.values())),
        evidence={f: choice.evidence[f] for f in chosen},
        contradicted=choice.contradicted,
        ignore_leading_zeros=bool(layout and layout.ignore_leading_zeros),
        senses=layout.statuses if layout else {},
        ignore_rows=tuple(
            (positions[header_key(h)], words)
            for h, words in (layout.ignore_rows if layout else ())
            if header_key(h) in positions
        ),
        header=tuple(h.strip() for h in header),
        detected=detected,
        found=choice.found,
    )
    return plan


REQUIRED_EXAMPLES = {
    "order_id": '"Order Number", "Número de orden", "Bestellnummer"',
    "email": '"Email", "Buyer Email", "Correo electrónico"',
}


def missing_column(config, layout, header, name, field_name, found):
    """The ExportError for a required column found neither by its header nor, unambiguously, by its content.

    A layout recognised for an export that carries no such column says which export of
    its platform does (its help), before the general fix.
    """
    fits = found.get(field_name, ())
    if layout and layout.help:
        return ExportError(
            f"{name}: {layout.name} carries no {FIELD_NAMES[field_name]}. {layout.help}",
            file=name,
            detail=shown_headers(header),
        )
    if fits:
        hint = (
            f" By their content, {' or '.join(repr(printable(header[f.column].strip())) for f in fits[:3])} could "
            f"be it ({fits[0].evidence}); which, the service does not guess."
        )
    else:
        hint = ""
    return ExportError(
        f"{name}: no column for {field_name}: no header says it (such as "
        f"{REQUIRED_EXAMPLES[field_name]}), and no column's cells alone tell it.{hint} Add your export's "
        f"header to {columns_key(layout, field_name)} in contexts.toml; `python app.py check` shows the "
        "file's columns" + (" and a [columns] block to paste." if fits else "."),
        file=name,
        detail=shown_headers(header) + proposal_text(config, header, found),
    )


FIELD_NAMES = {"order_id": "order number", "email": "buyer's e-mail address"}


def columns_key(layout, field_name):
    """Where in contexts.toml a field's headers are given: the layout's columns where it names the field."""
    return (
        f"[layouts.{layout.key}.columns] {field_name}"
        if layout and field_name in layout.columns
        else f"[columns] {field_name}"
    )


def packed_columns(header, spec):
    """The positions of the cells a Packed spec names, its * standing for any text."""
    if not spec:
        return ()
    from fnmatch import fnmatchcase

    patterns = [header_key(p) for p in spec.columns]
    return tuple(i for i, text in enumerate(header) if any(fnmatchcase(header_key(text), p) for p in patterns))


def shown_headers(header, limit=40):
    """A sentence on the file's headers for an error message; never a row that is not plausibly a header."""
    texts = [h.strip()[:40] for h in header if h and h.strip()]
    if not texts:
        return "Its first row is empty."
    if len(texts) == 1:  # a file that is not a CSV at all (or a link to one) must not be quoted
        return "Its first row has one column only (not shown): is it an orders export, with , or ; between columns?"
    if not all(map(plausible_header, texts)):
        return "Its first row does not look like column names (not shown): export the orders with a header row."
    more = f" and {len(texts) - limit} more" if len(texts) > limit else ""
    return "The file's columns are: " + ", ".join(f'"{t}"' for t in texts[:limit]) + more + "."


def plausible_header(text):
    """True when a cell reads like a column name: words, with at most a little punctuation ('Line: Type')."""
    letters = sum(c.isalpha() for c in text)
    odd = sum(not (c.isalnum() or c in " _-.#()&°'") for c in text)
    return (
        text.isprintable()
        and letters > 0
        and sum(c.isdigit() for c in text) <= letters
        and odd <= 2
        and "@" not in text
    )


def check_placeholders(config, by_snake, name, layout=None):
    """Every placeholder and rule field must be derived, mapped, or a column of this file.

    One that is none of these is a column this export lacks (or a typo in contexts.toml):
    an ExportError, so that the data being served, or the last good copy, stays served.
    """
    fields = set(DERIVED) | set(config.columns) | set(config.words.sayings)  # a field no column says reads empty
    known = fields | set(by_snake) | set(layout.columns if layout else ())
    examples = [c for c in by_snake if c not in fields and not PERSONAL & set(c.split("_"))][:3]
    available = (
        f"Available: {braced(sorted(fields))}, "
        "or any column of the export in snake_case" + (f", e.g. {braced(examples)}" if examples else "") + "."
    )
    wanted = [
        (f"[templates] {template}", placeholder)
        for template, t in config.templates.items()
        if template not in MESSAGES
        for placeholder in t.fields
    ]
    wanted += [
        (f"[[rules]] number {rule.number} when", field_name)
        for rule in config.rules
        for field_name, _ in rule.conditions
    ]
    # Every one at once, each with the nearest known name: a merchant fixes them in one edit.
    unknown = [(where, field_name) for where, field_name in wanted if field_name not in known]
    if unknown:
        said = "; ".join(
            f"{{{field_name}}}, which {shown_name(config.path)} {where} uses{nearest(field_name, known)}"
            for where, field_name in unknown
        )
        wheres = " and ".join(dict.fromkeys(where for where, _ in unknown))
        raise ExportError(
            f"{name}: has no column for {said}. {available} Fix {wheres} in contexts.toml, or export "
            f"the column{'s' if len(unknown) > 1 else ''}.",
            file=name,
        )


# Words of columns that hold a person's data: never offered as an example placeholder.
PERSONAL = {
    "name",
    "street",
    "address",
    "address1",
    "address2",
    "phone",
    "city",
    "zip",
    "postal",
    "postcode",
    "province",
    "country",
    "company",
    "mail",
    "email",
    "first",
    "last",
    "billing",
    "birth",
    "ip",
    "customer",
    "note",
    "notes",
}


def detect_layout(layouts, positions):
    """The layout whose telltale headers the file has (the most specific, when several do), or None."""
    found = [layout for layout in layouts if all(header_key(h) in positions for h in layout.detect)]
    return max(found, key=lambda layout: len(layout.detect), default=None)


def writes_day_first(config, header):
    """True when the header's words are of a language that writes the day first (German, French, ...): a word of
    vocabulary.toml's day_first group, alone or ending a compound ("Bestelldatum", "Besteldatum")."""
    marks = config.words.groups.get("day_first", frozenset())
    endings = tuple(mark for mark in marks if len(mark) >= 5)
    return any(
        word in marks or len(word) >= 8 and word.endswith(endings) for text in header for word in header_words(text)
    )


def columns_changed(before, now):
    """(field, header before, header now) of each field whose column changed with the header row; "" for none."""
    return tuple(
        (f, before.get(f, ""), now.get(f, "")) for f in dict.fromkeys((*before, *now)) if before.get(f) != now.get(f)
    )


###############################################################################
# Orders from rows: grouping, follow-on rows, what is not an order ############
###############################################################################
#
# Rows become orders: an order's rows are grouped by its number (and item rows without one
# attached to the order above them), footers, totals and repeated headers are skipped, and
# progress is logged for a large file. Uses the plan and the cells above.


class Irregular(Exception):
    """Rows of one order lie apart, or a row is shorter than the header: read again, carefully."""


def getter(columns):
    """A C-speed function from a row to the tuple of its cells at columns."""
    if len(columns) == 1:
        return lambda row, i=columns[0]: (row[i],)
    return itemgetter(*columns) if columns else (lambda row: ())


class OrderReader:
    """Reads an export into orders: per order, its rows; the plan says which cells matter."""

    def __init__(self, config, path, encoding=None, memory_limit_mb=None, previous=None):
        self.config, self.path, self.encoding = config, path, encoding
        self.plan = None
        self.rows = self.skipped = 0
        self.line = lambda: 0
        self.plain = False  # True once open_table finds no cell can hold a packing separator
        self.lost = [0]  # how many workbook numbers were too long to be exact (see cell_text)
        self.progress = Progress(shown_name(path), memory_limit_mb)
        self.last_row = None  # the file's last row with a cell, as read: is it whole?
        self.previous = (
            previous  # {"header": [...], "chosen": {field: header}} of the export accepted last (see choice_of)
        )
        self.changed = ()  # (field, header chosen before, header chosen now) when the header row changed
        self.relay = None  # a marketplace's relay addresses in the sample (see relay_addresses)
        self.sample, self.day_first_language = (
            [],
            False,
        )  # the first rows, and whether the header's words write the day first
        self.marked = True  # cells may hold a spreadsheet's marks: open_table's scan says when they cannot
        self.preamble = []  # lines before the header (a title, a line of separators), for check
        self.attached = 0  # item rows without an order number, taken as the order above's (see follow_on)
        self.untied = 0  # item rows without an order number that follow no order of theirs: left out, check warns
        self.item_at = None  # the column of an item's name, once the plan is made (see unnumbered)
        self.not_orders = Counter()  # rows that are no order (a footer, a totals line), by why

    def header_score(self, cells):
        """How surely a row is the orders' header: 2 for a known layout's, 1 for an order-number header, else 0."""
        keys = {header_key(c) for c in cells if c}
        if detect_layout(self.config.layouts, keys):
            return 2
        named = {
            header_key(h)
            for h in (
                *self.config.columns.get("order_id", ()),
                *(h for layout in self.config.layouts for h in layout.columns.get("order_id", ())),
            )
        }
        says = any(self.config.words.reading("order_id", header_words(c)) for c in cells if c and len(c) < 80)
        return 1 if keys & named or says else 0

    def orders(self, careful=False):
        """Yield (order number key, rows) per order.

        Exports list an order's rows together and every row as wide as the header, so
        rows are grouped as they stream by, at C speed, and memory holds one order. If
        that does not hold, Irregular is raised: read again with careful=True, which
        pads short rows and holds the needed cells of every order until the end of the file.
        Rows with no order number (blank ones among them) are counted and let go at once,
        but for an item row right after an order's, which belongs to it (see follows); rows
        that are no order at all (a footer, a totals line, a repeated header) are counted
        in not_orders and let go.
        """
        with open_table(self.path, self.config.sheet, self.header_score, self.encoding) as table:
            self.line, self.plain, self.lost, self.marked = table.line, table.plain, table.lost, table.marked
            rows = iter(table.rows)
            header, self.preamble, read_past = header_row(rows, self.header_score)
            if header is None:
                export_error(self.path, "is empty. Re-export the orders; the last good data stays served.")
            # The rows read past the header all go into the sample: every further row passes one chain, not two.
            sample = self.sample = list(islice(chain(read_past, rows), max(SAMPLE_ROWS, len(read_past))))
            rows = chain(sample, rows)
            self.day_first_language = writes_day_first(self.config, header)
            same_header = bool(self.previous) and self.previous["header"] == [h.strip() for h in header]
            self.plan = make_plan(
                self.config,
                header,
                shown_name(self.path),
                sample,
                previous=self.previous["chosen"] if same_header else None,
            )
            if self.previous and not same_header:
                self.changed = columns_changed(self.previous["chosen"], self.plan.chosen)
            self.relay = relay_addresses(self.config, self.plan, sample)
            self.normalise = without_leading_zeros if self.plan.ignore_leading_zeros else normalise_order_id
            self.follows = follow_on(self.plan)
            fields = self.plan.row_fields[: len(self.plan.row_columns)]
            self.item_at = self.plan.row_columns[fields.index("item_name")] if "item_name" in fields else None
            yield from self.admitted(self.gathered(rows)) if careful else self.adjacent(rows)
            if why := table.cut_off(self.last_row, len(header)):
                export_error(
                    self.path,
                    f"looks cut off: {why}. It was probably still being written or "
                    "uploaded; the data being served stays. Export or upload it again.",
                )

    def let_go(self, rows):
        """How many of rows have a cell filled; none is kept but the last (see cut_off)."""
        count = 0
        for row in rows:
            if any(row):
                count += 1
                self.last_row = row
        return count

    def unnumbered(self, rows):
        """Count and let go rows without an order number; an item among them is one no order took (check warns)."""
        self.skipped += self.let_go(rows)
        if (item_at := self.item_at) is not None:  # an item with no order: the order it belongs to may look whole
            self.untied += sum(1 for row in rows if item_at < len(row) and row[item_at].strip())

    def admitted(self, groups):
        """The orders among groups of (key, rows) read carefully: the others are counted and let go, as in adjacent.

        A group's rows without a number are item rows gathered below its first (see gathered): an order's
        are attached to it; below a line that is no order (a totals line), they are no order's either.
        """
        at = self.plan.order_columns[0]
        for key, group in groups:
            if not key:
                self.unnumbered(group)
                continue
            own_rows = [row for row in group if row[at].strip()]
            if why := not_an_order(group[0][at], key):
                self.not_orders[why] += self.let_go(own_rows)
                if len(own_rows) < len(group):
                    self.unnumbered([row for row in group if not row[at].strip()])
            else:
                self.attached += len(group) - len(own_rows)
                self.rows += len(group)
                yield key, group

    def adjacent(self, rows):
        """(key, rows) of each order whose rows are adjacent, as most exports write them: grouped at C speed.

        Rows with no order number (blank ones among them) are counted and let go, but for
        item rows right after an order's, which belong to it (see follow_on); rows that are
        no order at all (a footer, a totals line, a repeated header) are counted in
        not_orders and let go. Memory holds one order, and one loop does it all: it runs for
        every order of a file of hundreds of thousands.
        A row too short for a needed cell makes itemgetter raise IndexError, here or when
        the order is packed: both mean Irregular. An order number seen again after others
        is found at the end, by one set() over all of them rather than a check per order.
        Numbers are compared as written: '#1001' and '1001' are two orders that may
        belong to two customers (index keys keep them apart; Packer.pack tells two
        customers' orders under one number).
        """
        # The numbers seen, as hashes in one flat array: a list of the numbers' own strings would
        # keep 500,000 small objects alive among the orders being packed, and leave that many
        # holes when freed. Two numbers of one hash (1 in 10^8 at 500,000) only cost a careful read.
        written, key, normalise, follows, not_orders = array("q"), "", self.normalise, self.follows, self.not_orders
        progress, next_tick, read = self.progress, PROGRESS_ROWS, 0
        held = None  # the order before, until the rows after it show whether item rows follow it
        for value, group in groupby(filter(None, rows), itemgetter(self.plan.order_columns[0])):
            key = normalise(value)
            written.append(hash(value))
            if len(group := list(islice(group, MAX_ORDER_ROWS + 1))) > MAX_ORDER_ROWS and key:
                too_many_rows(self.path, value)
            if held is not None:
                if not key and follows:
                    group = self.attach(held, group)
                yield held
                held = None
            if not key:
                if group:
                    self.unnumbered(group)
            # A quick look first: "1001" and "#1001" are orders (normalised, "#1001" loses its "#" only).
            elif (
                (value.isalnum() or value[:1] == "#" and len(value) - len(key) == 1) and key not in NOT_ORDER_WORDS
            ) or not (why := not_an_order(value, key)):
                held = key, group
                read += len(group)
                if read >= next_tick:
                    progress.tick(read)
                    next_tick += PROGRESS_ROWS
            else:
                not_orders[why] += self.let_go(group)
        if held is not None:
            yield held
        self.rows = read + self.attached  # an order's item rows below it count as it takes them (see attach)
        if key:  # else the last rows had no number, and let_go() saw them
            self.last_row = group[-1]
        if len(set(written)) != len(written):
            raise Irregular("rows of one order are apart")

    def attach(self, held, rows):
        """Add to the order held the item rows among rows that follow it; return the rest (no order's)."""
        order_rows, follows = held[1], self.follows
        taken = [row for row in rows if follows(row, order_rows[0])]
        if taken:
            order_rows.extend(taken)
            self.attached += len(taken)
            rows = [row for row in rows if not follows(row, order_rows[0])]
        return rows

    def gathered(self, rows):
        """Every order's rows wherever they are in the file, each cut to the cells the plan needs.

        The plan is then the projected one: whole rows of every order would take ten
        times the memory, and this reading is for files that are already unusual.
        """
        plan = self.plan
        needed = sorted(
            {
                *plan.order_columns,
                *plan.row_columns,
                plan.email_column,
                *plan.email_fallback,
                *plan.item_columns,
                *plan.tracking_columns,
                *(() if plan.type_column is None else (plan.type_column,)),
                *(column for column, _ in plan.ignore_rows),
                *plan.other_ids,
            }
        )
        take, width, at = getter(needed), needed[-1] + 1, plan.order_columns[0]
        groups, progress, next_tick, follows, last = {}, self.progress, PROGRESS_ROWS, self.follows, None
        for count, row in enumerate(rows, 1):
            if any(row):
                self.last_row = row
                row = row + [""] * (width - len(row)) if len(row) < width else row
                value = row[at].strip()
                if not value and follows and last is not None and follows(row, last[0]):
                    last[1].append(take(row))  # an item row of the order right above (counted in admitted)
                    continue
                groups.setdefault(value, []).append(take(row))
                last = (row, groups[value]) if value else None
            if count >= next_tick:
                progress.tick(count)
                next_tick += PROGRESS_ROWS
        for value, group in groups.items():
            if len(group) > MAX_ORDER_ROWS:
                too_many_rows(self.path, value)
        place = {column: i for i, column in enumerate(needed)}
        self.plan = replace(
            plan,
            order_columns=tuple(place[c] for c in plan.order_columns),
            row_columns=tuple(place[c] for c in plan.row_columns),
            email_column=place[plan.email_column],
            email_fallback=tuple(place[c] for c in plan.email_fallback),
            other_ids=tuple(place[c] for c in plan.other_ids),
            item_columns=tuple(place[c] for c in plan.item_columns),
            tracking_columns=tuple(place[c] for c in plan.tracking_columns),
            type_column=None if plan.type_column is None else place[plan.type_column],
            ignore_rows=tuple((place[c], words) for c, words in plan.ignore_rows),
        )
        return ((self.normalise(value), group) for value, group in groups.items())


MAX_ORDER_ROWS = 10_000  # rows of one order; more means the order-number column is not one


def header_row(rows, score):
    """(the header, the lines before it, rows read past it): the first of the first rows with cells that reads as an
    orders header (score).

    A title ("Orders 1 Dec - 2 Dec") may stand before it; rows of empty cells are passed
    over. Where none of the first rows reads as a header, the first row with cells is
    the header, and the rows read after it are given back to be read as data.
    """
    seen = []
    for row in rows:
        if not any(c.strip() for c in row):
            continue
        seen.append(row)
        if score(row):
            return row, [printable(" ".join(c.strip() for c in r if c.strip()))[:60] for r in seen[:-1]], []
        if len(seen) == HEADER_ROWS:
            break
    return (seen[0], [], seen[1:]) if seen else (None, [], [])


# Order numbers that are the words of a totals or footer line, not an order's.
NOT_ORDER_WORDS = frozenset(
    "total totals summe gesamt gesamtsumme sum subtotal totaal suma somme totale razem grand".split()
)


def not_an_order(value, key):
    """Why a row whose order-number cell holds value is no order (a footer, a totals line), or "" when it is one."""
    text = spreadsheet_text(value)
    if key in NOT_ORDER_WORDS or not any(c.isdigit() for c in text) and NOT_ORDER_WORDS & set(text.casefold().split()):
        return "totals lines"  # "Total", "Grand Total", "Total general", "Summe gesamt"
    if not ID_SHAPE.fullmatch(text) and not damaged_number(text):  # 1.00012E+8 is an order whose number was lost
        return "lines that are no order (a footer, a note, a repeated header)"
    return ""


def follow_on(plan):
    """A test of whether a row without an order number is an item row of the order above it, or None.

    ERPs (Odoo among them) write an order's further lines below its first with the order's
    cells empty: a row with an item and no e-mail of another customer is one of those.
    """
    if "item_name" not in plan.row_fields[: len(plan.row_columns)]:
        return None
    item_at = plan.row_columns[plan.row_fields.index("item_name")]
    email_at = plan.email_column

    def follows(row, first):
        email = row[email_at].strip() if email_at < len(row) else ""
        return bool(row[item_at].strip()) and (not email or normalise_email(email) == normalise_email(first[email_at]))

    return follows


def too_many_rows(path, value):
    """Refuse an export with an order of more than MAX_ORDER_ROWS rows, before it fills memory."""
    export_error(
        path,
        f"has an order with more than {MAX_ORDER_ROWS:,} rows (number {printable(value)[:20]!r}): "
        "is the order-number column really the order number? Check [columns] order_id.",
    )


class SeveralCustomers(Exception):
    """Rows of one order number name two emails: two customers' orders (two stores' 1001), never one."""


def by_email(rows, email_of):
    """Rows of one number split by customer: each email's rows, wherever they lie, are one order.

    A row without an email (a continuation row) belongs to the order of the row above it.
    """
    orders, current = {}, None
    for row in rows:
        current = normalise_email(email_of(row)) or current
        orders.setdefault(current, []).append(row)
    return list(orders.values())


SAMPLE_ROWS = 50  # rows read before the plan is made (see make_plan)
PROGRESS_ROWS = 10_000
PROGRESS_SECONDS = 5.0


class Progress:
    """Every PROGRESS_ROWS rows: logs a long load's progress, and stops a load that outgrows memory."""

    def __init__(self, name, memory_limit_mb=None):
        self.name, self.every, self.memory_limit_mb = name, PROGRESS_SECONDS, memory_limit_mb
        self.started = self.last = time.monotonic()

    def tick(self, rows):
        """Log when `every` seconds have passed; raise ExportError past the memory limit."""
        if self.memory_limit_mb and resident_mb() > self.memory_limit_mb:
            raise ExportError(
                f"{self.name}: reading it took the service past {self.memory_limit_mb:,.0f} MB of "
                f"memory at row {rows:,} (MEMORY_LIMIT_MB), so it was stopped. The export is far "
                "larger than the one served, or not an orders export; if it is right, raise "
                "MEMORY_LIMIT_MB on a machine that has the memory.",
                file=self.name,
            )
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info("reading %s: %d rows so far (%.0fs)", self.name, rows, now - self.started)


def resident_mb():
    """This process's resident memory in MB (Linux), or 0 where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


###############################################################################
# Packing orders into memory ##################################################
###############################################################################
#
# An order is kept as one string (Packer): its order cells once, its items and parcels after
# them, with the fields that must agree across rows (status, dates, carrier) reconciled
# honestly. Half a million orders fit in about 200 MB. Uses the plan above.

# Fields that say what state the whole order is in: where its rows differ (one parcel
# delivered, one on its way), the answer must not take one row's word for the order's.
# All are given: "fulfilled / unfulfilled"; dates "on 26 Nov 2026 and 27 Nov 2026".
# The carrier too: two parcels with DHL and Hermes were not both sent "with DHL".
AGREED_FIELDS = frozenset(
    {"status", "financial_status", "shipment_status", "shipped_at", "estimated_delivery", "carrier"}
)
BETWEEN = " / "  # between the words of rows that differ (see Packer.agreed)
AGREED_DATES = frozenset({"shipped_at", "estimated_delivery"})


class Packer:
    """Packs an order's rows into one compact string, and unpacks it for rendering."""

    def __init__(self, plan, plain=False):
        self.plan = plan
        self.plain = plain  # no cell holds FIELD or RECORD: open_table looked
        # The email is read with the order's cells; unless an answer shows it, it is left out of
        # the packed order (a fifth of its size): it is in the index's key already.
        self.email_apart = "email" not in plan.order_fields
        columns = (*plan.order_columns, plan.email_column) if self.email_apart else plan.order_columns
        # A field fed only by packed entries has no column (None): its cell starts empty.
        self.order_cells = (
            getter(columns)
            if None not in columns
            else (lambda row: tuple(row[c] if c is not None else "" for c in columns))
        )
        self.email_at = len(plan.order_fields) if self.email_apart else plan.order_fields.index("email")
        self.email_of = (
            itemgetter(plan.email_column)
            if not plan.email_fallback
            else (
                lambda row, at=plan.email_column, fallback=plan.email_fallback: (
                    row[at] if row[at].strip() else next((row[c] for c in fallback if row[c].strip()), "")
                )
            )
        )
        self.row_cells = getter(plan.row_columns)
        self.extra = ("",) * (len(plan.row_fields) - len(plan.row_columns))  # packed fields' places in a row
        self.rich, self.email_fallback = plan.rich, plan.email_fallback
        self.unread = {}  # "items" or "tracking" -> [packed entries that did not read as the layout says, the first]
        self.kinds = Counter()  # kinds of typed rows the layout does not know (check warns)
        self.agree_at = tuple(i for i, f in enumerate(plan.order_fields) if f in AGREED_FIELDS)
        self.agreeing, self.unsaid = getter(self.agree_at), ("",) * len(self.agree_at)
        ignore = plan.ignore_rows
        self.ignored = (lambda row: any(status_word(row[c]) in words for c, words in ignore)) if ignore else None
        self.disagreed = Counter()  # field -> orders whose rows gave it different words (check warns)
        fields = plan.row_fields
        self.row_positions = tuple(fields.index(f) if f in fields else None for f in ROW_FIELDS)
        # What pack() may skip for an order of one row: no rows to leave out, no other email column,
        # no layout rules, no cell holding a separator.
        self.simple = not ignore and not plan.email_fallback and not plan.rich and plain
        # How many FIELD separators a packed order holds: its head, and each row.
        self.fields_per_head, self.fields_per_row = len(plan.order_fields) - 1, max(0, len(fields) - 1)

    def pack(self, rows):
        """(order values, packed string); each order value from the first row that has it.

        Raises SeveralCustomers when a row names another email than the order's. The rows
        are walked anyway to fill the order's values, so the check costs one comparison.
        Rows the layout ignores (a cancelled parcel) are left out; an order keeps its first.
        """
        if self.simple and len(rows) == 1:  # most orders of most exports: one row, read as it stands
            values = self.order_cells(rows[0])
            head = FIELD.join(values[:-1] if self.email_apart else values)
            return values, f"{head}{RECORD}{FIELD.join(self.row_cells(rows[0]))}".encode()
        if self.ignored:
            rows = [row for row in rows if not self.ignored(row)] or rows[:1]
        if self.email_fallback and len({normalise_email(self.email_of(row)) for row in rows} - {""}) > 1:
            raise SeveralCustomers()  # told apart by the other email column
        values = self.order_cells(rows[0])
        if len(rows) > 1:
            at = self.email_at
            email = values[at]
            others = [*map(self.order_cells, rows[1:])]
            agreeing, unsaid, said, differ = self.agreeing, self.unsaid, self.agreeing(values), False
            for other in others:
                if (theirs := other[at]) and theirs != email:
                    if email and normalise_email(theirs) != normalise_email(email):
                        raise SeveralCustomers()
                    email = email or theirs
                # "" sorts before any text: where no cell of other sorts after its cell in values, other fills
                # none of values' empty cells. One C-speed look, as an order's further rows seldom fill any.
                if "" in values and any(map(lt, values, other)):
                    values = filled_from(values, other)
                if (state := agreeing(other)) != unsaid and state != said:  # one compare where rows agree
                    differ = True
            if differ:
                for place in self.agree_at:
                    values = self.agreed(values, place, others)
        if not values[self.email_at] and self.email_fallback:  # an order whose email is in another column
            values = [*values]
            values[self.email_at] = next((row[c] for row in rows for c in self.email_fallback if row[c].strip()), "")
        if self.rich:
            values, rows = self.read_by_rules(rows, list(values))
        else:
            rows = map(self.row_cells, rows)
        records = [values[:-1] if self.email_apart else values, *rows]
        packed = RECORD.join(map(FIELD.join, records))
        if not self.plain:
            # One count says whether a cell held a separator (never in real data, but a cell must
            # not be able to shift the others); only then is every cell cleaned.
            expected = self.fields_per_head + (len(records) - 1) * self.fields_per_row
            if packed.count(FIELD) != expected or packed.count(RECORD) != len(records) - 1:
                packed = RECORD.join(FIELD.join(clean_cell(c) for c in record) for record in records)
        # Kept as UTF-8 bytes: a smaller header than text, and one byte for an accent where text
        # with one character past Latin-1 would take two or four for every character.
        return values, packed.encode()

    def agreed(self, values, place, others):
        """values with a status the rows disagree on given as all of its words, 'fulfilled / unfulfilled';
        dates as all of them, '2026-11-26 and 2026-11-27'.

        The first row's word alone would be a guess: one parcel delivered is not the order
        delivered. No rule names the combined words, so the answer claims only what all say.
        """
        words = {}
        for cell in (values[place], *(other[place] for other in others)):
            words.setdefault(status_word(cell), cell.strip())
        words.pop("", None)
        if len(words) > 1:
            field_name = self.plan.order_fields[place]
            self.disagreed[field_name] += 1
            values = [*values]
            values[place] = (" and " if field_name in AGREED_DATES else BETWEEN).join(words.values())
        return values

    def read_by_rules(self, rows, values):
        """(values, records) of rows read by the layout's rules: typed rows, packed items and tracking.

        A row of a kind that is neither items nor tracking gives no record; a packed cell
        gives one record an entry; a tracking entry's carrier and link fill the order's
        when empty. Only exports of such layouts pay for this.
        """
        plan, rules, fields = self.plan, self.plan.rules, self.plan.row_fields
        item_places = [fields.index(f) for f in ITEM_FIELDS if f in fields]
        tracking_place = fields.index("tracking_number") if "tracking_number" in fields else None
        records = []
        for row in rows:
            record = [*self.row_cells(row), *self.extra]
            if plan.type_column is not None:
                kind = status_word(row[plan.type_column])
                if kind not in rules.item_rows and kind not in rules.tracking_rows:
                    if kind not in rules.other_rows:
                        self.kinds[kind] += 1
                    continue
                for place in item_places if kind not in rules.item_rows else ():
                    record[place] = ""
                if tracking_place is not None and kind not in rules.tracking_rows:
                    record[tracking_place] = ""
            records.append(record)
            for column in plan.item_columns:
                for name, quantity in self.packed_items(row[column]):
                    records.append(self.entry_record({"item_name": name, "item_quantity": quantity}))
            for column in plan.tracking_columns:
                for number, carrier, link in self.packed_tracking(row[column]):
                    records.append(self.entry_record({"tracking_number": number}))
                    for field_name, text in (("carrier", carrier), ("tracking_url", link)):
                        at = plan.order_fields.index(field_name) if field_name in plan.order_fields else None
                        if at is None or not text:
                            continue
                        if not values[at]:
                            values[at] = text
                        elif field_name == "carrier" and text not in values[at].split(BETWEEN):
                            values[at] += BETWEEN + text  # each parcel's carrier, as for rows
                            self.disagreed["carrier"] += values[at].count(BETWEEN) == 1
        return values, records

    def entry_record(self, cells):
        """A row's record holding only cells (field -> text): an entry of a packed cell."""
        return [cells.get(f, "") for f in self.plan.row_fields]

    def packed_items(self, text):
        """(name, quantity) of each item packed in a cell; one that does not read is shown as written."""
        spec = self.plan.rules.items
        found = []
        for entry in packed_entries(spec, text):
            name, quantity = entry_value(entry, spec, "name"), entry_value(entry, spec, "quantity")
            if name and (option := entry_value(entry, spec, "option")):
                name = f"{name} ({option})"  # Big Cartel's product_option_name: "Sour", "Mykonos"
            if not name:  # shown as written, with no quantity: one made up would be a wrong fact
                self.note_unread("items", entry.get("", text))
                name, quantity = entry.get("", text), ""
            found.append((name, quantity))
        return found

    def note_unread(self, kind, text):
        """Count a packed entry that did not read as the layout says, keeping the first for `check` to show."""
        seen = self.unread.setdefault(kind, [0, printable(one_line(str(text)))[:60]])
        seen[0] += 1

    def packed_tracking(self, text):
        """(number, carrier, link) of each tracking entry packed in a cell."""
        spec = self.plan.rules.tracking
        found = []
        for entry in packed_entries(spec, text):
            number = entry_value(entry, spec, "number")
            if number:
                found.append((number, entry_value(entry, spec, "carrier"), entry_value(entry, spec, "link")))
            elif any(str(value).strip() for value in entry.values()):  # text, or an entry without its number
                self.note_unread("tracking", entry.get("") or json.dumps(entry, ensure_ascii=False))
        return found

    def pack_each(self, rows):
        """[(values, packed)] of each customer's order among rows (see SeveralCustomers)."""
        try:
            return [self.pack(rows)]
        except SeveralCustomers:
            return [self.pack(part) for part in by_email(rows, self.email_of)]

    def unpack(self, packed):
        """(order cells in plan.order_fields' order, Items, tracking numbers) from a packed order.

        A quantity that does not read as one is None: the item is named without a count. A
        tracking number a spreadsheet damaged for good (3,6E+14) is withheld, never shown.
        """
        head, *lines = packed.decode().split(RECORD)
        items, tracking = [], []
        name_at, quantity_at, status_at, shipped_at, refunded_at, ships_at, variant_at, tracking_at = self.row_positions
        for line in lines:
            cells = line.split(FIELD)
            numbers = ()
            if tracking_at is not None and (text := cells[tracking_at].strip()):
                numbers = tracking_numbers_in(text)
                tracking.extend(n for n in numbers if n not in tracking)
            if name_at is not None and (name := one_line(cells[name_at])):
                if variant_at is not None and (variant := one_line(cells[variant_at])) and variant not in name:
                    name = f"{name} ({variant})"  # Wix: "Sweatshirt" and its "Color:Navy | Size:S"
                items.append(
                    Item(
                        quantity_value(cells[quantity_at]) if quantity_at is not None else None,
                        name,
                        cells[status_at].strip() if status_at is not None else "",
                        quantity_value(cells[shipped_at]) if shipped_at is not None else None,
                        quantity_value(cells[refunded_at]) if refunded_at is not None else None,
                        FLAGS.get(status_word(cells[ships_at])) if ships_at is not None else None,
                        numbers,
                    )
                )
        return head.split(FIELD), items, tracking


def filled_from(values, other):
    """values with each empty one taken from other: found by C-speed count and index, as an order's first row
    leaves one or two of its cells empty and a list walked cell by cell cost 3% of a load."""
    values, at = list(values), -1
    for _ in range(values.count("")):
        at = values.index("", at + 1)
        values[at] = other[at]
    return values


class Item(NamedTuple):
    """One line of an order as the answer tells it: counts are numbers, or None where the export says none."""

    quantity: float | None
    name: str
    status: str  # the line's own status word, as written
    shipped: float | None  # how many of it left (a done or shipped quantity), where the export says
    refunded: float | None  # how many of it were refunded, where the export says
    ships: bool | None  # False for a line that needs no shipping (a download, a gift card), where the export says
    tracking: tuple = ()  # the tracking numbers on its own row: its parcel's


def tracking_numbers_in(text):
    """The tracking numbers of a cell: several may share it (",", ";", "|", a line break); spreadsheet guards are
    taken off; a number a spreadsheet damaged for good (3,60003E+14) is left out, never shown."""
    if text.isalnum() and len(text) <= MAX_VALUE:  # nearly every cell: one number, nothing a spreadsheet could mark
        return (text,)
    if damaged_number(spreadsheet_text(text)):  # the whole cell first: "3,60003E+14" is one number, not "3" and more
        return ()
    numbers = (one_line(spreadsheet_text(n)) for n in SEVERAL.split(text))
    return tuple(n for n in numbers if n and not damaged_number(n))


COUNTED = re.compile(r"\s*(?:(\d+)\s*[x×*]\s*(.+?)|(.+?)\s*[x×*]\s*(\d+))\s*$")  # "2x Hat", "Hat x 2"


def packed_entries(spec, text):
    """The entries packed in a cell, each a dict (its key -> value); one that does not read is {"": text}."""
    if not text.strip():
        return []
    if spec.format == "json":
        try:
            data = json.loads(text)
        except ValueError:
            return [{"": text}]
        data = [data] if isinstance(data, dict) else data
        if not isinstance(data, list):
            return [{"": text}]
        return [
            {str(k): "" if v is None else str(v) for k, v in entry.items()}
            if isinstance(entry, dict)
            else {"": str(entry)}
            for entry in data
        ]
    parts = split_unescaped(text, spec.between, spec.escape) if spec.between else [text]
    if spec.format == "pairs" and len(parts) > 1:
        parts = rejoined(parts, spec)
    return [read_entry(spec, part) for part in parts if part.strip()]


def rejoined(parts, spec):
    """Parts of pairs put back together where a value held the separator: "Product Name: Mug | Blue".

    Every entry starts with the key the first one starts with (BigCommerce's "Product ID");
    a part that does not was cut from the value before it.
    """
    first = parts[0].partition(spec.key)[0].strip()
    whole = [parts[0]]
    for part in parts[1:]:
        if part.partition(spec.key)[0].strip() == first:
            whole.append(part)
        else:
            whole[-1] += spec.between + part
    return whole


def read_entry(spec, part):
    """One packed entry: key/value pairs, or "2x Hat"; {"": part} when it reads neither way."""
    if spec.format == "count":
        match = COUNTED.fullmatch(part)
        if not match:  # "Gift wrapping" beside "2x Lamp": no count is written, so none is told
            return {"name": part.strip()}
        quantity, name = (match[1], match[2]) if match[1] else (match[4], match[3])
        return {"name": name.strip(), "quantity": quantity}
    entry, last = {}, None
    for piece in split_unescaped(part, spec.pairs, spec.escape):
        key, separator, value = piece.partition(spec.key)
        if separator and key.strip():
            last = key.strip()
            entry[last] = unescape(value, spec.escape).strip()
        elif last is not None:  # the separator was part of a value: "Product Name: Mug, Blue"
            entry[last] += spec.pairs + unescape(piece, spec.escape).rstrip()
        else:
            return {"": part.strip()}
    return entry


def entry_value(entry, spec, name):
    """An entry's value for one of our names (name, quantity, number, ...): its first filled key."""
    keys = dict(spec.keys).get(name, ())
    return next((entry[k] for k in keys if entry.get(k)), "")


def split_unescaped(text, separator, escape):
    """text split at separator, except where escape stands before it."""
    if not escape:
        return text.split(separator)
    return re.split(f"(?<!{re.escape(escape)}){re.escape(separator)}", text)


def unescape(text, escape):
    """text with each escape character dropped before the character it makes plain."""
    return re.sub(f"{re.escape(escape)}(.)", r"\1", text) if escape else text


MAX_VALUE = 200  # characters of one cell in an answer: a product name, a status, a date


def one_line(value):
    """A cell's text as an answer carries it: one line, no control characters, at most MAX_VALUE characters.

    The AI reads the answer as fact, so a cell cannot start a paragraph of its own
    ("Socks\n\nSYSTEM: refund ..."), nor fill the answer.
    """
    value = value.strip()
    if value.isprintable() and len(value) <= MAX_VALUE:  # nearly every cell: one C-speed test
        return value
    value = " ".join("".join(c if c.isprintable() else " " for c in value).split())
    return value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 1].rstrip() + "…"


def order_number_text(cell):
    """An order number as an answer shows it: without a spreadsheet's marks (="...", a leading ', a .0 added)."""
    if cell.isalnum() or cell[1:].isalnum() and cell[:1] == "#":  # nearly every one: #1001, SO12
        return cell
    return ADDED_ZERO.sub("", spreadsheet_text(one_line(cell)))


def clean_cell(text):
    """A cell without the characters that separate packed cells and records."""
    return text.replace(FIELD, " ").replace(RECORD, " ")


def count_text(number):
    """A count as answers write it: 3 for 3.0000, 1.5 as it is."""
    return str(int(number)) if number == int(number) else f"{number:g}"


###############################################################################
# Rendering answers ###########################################################
###############################################################################
#
# A packed order becomes the JSON the chat agent repeats: the template its rules choose,
# its placeholders filled only from what the export says (dates in the shop's language,
# safe tracking links, counts of items). Also the answers given without an order: not
# found, unavailable. Uses the configuration, the packing and the cells above.


def shown_cell(cell, style=ENGLISH):
    """A cell as an answer shows it: without a spreadsheet's guard, one line (see one_line), an ISO date made
    readable; the common case fast."""
    cell = cell.strip()
    if not cell.isprintable() or len(cell) > MAX_VALUE:
        cell = one_line(cell)
    if cell[:2] == '="':
        cell = spreadsheet_text(cell)
    return readable(cell, style) if cell[4:5] == "-" else cell


@lru_cache(maxsize=8192)
def date_written(text, day_first, style):
    """A date cell in any form exports write, as style writes it; as written where it cannot be read for sure."""
    if " and " in text:  # the days of an order's parcels (Packer.agreed)
        return " and ".join(date_written(part, day_first, style) for part in text.split(" and "))
    parts = date_parts(text, day_first) or serial_day(spreadsheet_text(text))
    return written_day(parts, style) if parts else text


ISO_DAY_FIRST = re.compile(r"\d{4}-\d{2}-\d{2}(?=[T ]|$)")  # the day of '2026-08-12 18:14:05 -0400'

SAFE_URL = re.compile(r"https?://[!#-;=?-~]{1,2000}$")  # printable ASCII, without space, " < >


def safe_url(value):
    """Only http(s) links of printable ASCII go to the agent; anything else in a cell is dropped."""
    return value if SAFE_URL.match(value) else None


def kept_part(item):
    """(count or None, name, part) of a line less what was refunded of it, or None when all of it was."""
    if not item.refunded or item.quantity is None:
        return item.quantity, item.name, False
    return (item.quantity - item.refunded, item.name, False) if item.quantity > item.refunded else None


class Renderer:
    """Words the answer of one order: the tracking link, the rule, the template.

    This runs on every lookup, so what depends only on contexts.toml and the export's
    columns is worked out once, here: where each placeholder's value comes from (a
    cell's position, or a method for a derived one), and which rules an order's
    status words allow.
    """

    def __init__(self, config, plan, day_first=None):
        self.config = config
        self.style = (config.dates or {}).get(config.language, ENGLISH)  # how dates are written: '28 Nov 2026'
        at = {name: i for i, name in enumerate(plan.order_fields)}
        self.own_url_at = at.pop("tracking_url", None)  # the column's text; {tracking_url} is derived from it
        self.carrier_at = at.get("carrier")
        derived = {name: getattr(self, name) for name in DERIVED if name != "order_id"}
        # A date field's cells are read the way its column writes them (see DayOrder).
        dates = {
            name: self.dated(i, (day_first or {}).get(name))
            for name, i in at.items()
            if FIELD_CONTENT.get(name) == "date"
        }
        self.source = {**at, **dates, **derived}  # a field -> its cell's position, or the method that derives it
        self.cell_at = at  # a field -> its cell's position: whether it is filled needs no date written out
        if "order_id" in at:  # shown without a spreadsheet's marks: '00123, ="00123", 100012345.0
            self.source["order_id"] = lambda cells, items, tracking, url, i=at["order_id"]: order_number_text(cells[i])
        # Rules look at the words in a few fields, and an export has a handful of words per
        # field: the words narrow the rules down once. Whether a field is filled is checked
        # per order, only as far as the rules in order need it.
        wanted = (c for rule in config.rules for c in rule.conditions)
        names = [
            name for name in dict.fromkeys(n for n, words in wanted if words is not None) if name in self.source
        ]  # a field the export lacks reads "" in every order
        columns = [name for name in names if name in at]
        self.words_of = getter(tuple(at[name] for name in columns))
        self.word_fields = tuple(columns)
        # Words compared with a derived value (needs_shipping = "no", overdue = "yes") are worked out per
        # order, and only when a rule the columns' words allow asks: most orders never need an order date read.
        self.derived = {name: derived[name] for name in names if name not in at}
        # Whether a derived list is filled ("*"), without writing the list out.
        self.filled = {
            "shipped_items": self.any_shipped,
            "unshipped_items": self.any_unshipped,
            "refunded_items": self.any_refunded,
        }
        self.fills = {
            name: tuple((field, self.source.get(field, self.nothing)) for field in template.fields)
            for name, template in config.templates.items()
            if name not in MESSAGES
        }
        self.choices = {}  # the word fields' values as exported -> ((sources to be filled, Template), ...)
        self.words = {}  # memo of word()
        self.left = {}  # memo of line_left()
        self.senses = plan.senses or {}  # field -> {this export's word: the word rules use}
        self.meanings = config.meanings or {}  # a word in another language -> the word rules use
        self.carrier_pages = {}  # carrier name as exported -> its tracking page ("" when none)
        # [items] format with numbered places: str.format(count, name) fills it.
        self.item_text = numbered(config.item_format, ("quantity", "name")).format
        self.records_text = ""  # {records_updated}: set by Snapshot, moved on by fresher sources
        self.export_day = None  # the day the export was made, for {overdue}: set by Snapshot
        placed_at, placed_first = at.get("order_date"), (day_first or {}).get("order_date")
        self.placed = (
            None
            if placed_at is None
            # the order's (year, month, day), or None
            else (lambda cells: date_parts(shown_cell(cells[placed_at]).split(" and ")[0], placed_first))
        )
        self.placed_either = (
            None
            if placed_at is None
            # both readings of a date such as 01/02/2026
            else (
                lambda cells: [
                    p
                    for first in (True, False)
                    if (p := date_parts(shown_cell(cells[placed_at]).split(" and ")[0], first))
                ]
            )
        )

    def render(self, cells, items, tracking):
        """(template name, JSON body) for an order's cells, items and tracking numbers (Packer.unpack's)."""
        url = self.link(cells, tracking)
        template = self.pick(cells, items, tracking, url)
        # A source is a cell's position or a method: the one test that tells them apart, inline.
        style = self.style
        text = template.fill(
            {
                field: shown_cell(cells[source], style)
                if source.__class__ is int
                else source(cells, items, tracking, url)
                for field, source in self.fills[template.name]
            }
        )
        body = f'{{"context": {json_text(text)}, "tracking_url": {json_text(url) if url else "null"}}}'
        return template.name, body.encode()

    def template_of(self, cells, items, tracking):
        """The name of the template an order's answer takes, without writing the answer (for `check`'s counts)."""
        return self.pick(cells, items, tracking, self.link(cells, tracking)).name

    def pick(self, cells, items, tracking, url):
        """The first rule that matches picks the template; else the default."""
        words = self.words_of(cells)
        choices = self.choices.get(words)
        if choices is None:
            choices = self.choices[words] = self.narrow(words)
        # Derived words ('yes', 'all') and whether a derived list is filled, worked out for this order as the
        # rules ask, once each: several rules ask the same ({unshipped_items} filled).
        known = {}
        for asks, needed, template in choices:
            for name, make, wanted in asks:
                if (word := known.get(name)) is None:
                    word = known[name] = make(cells, items, tracking, url)  # already a rule's word: no word()
                if word not in wanted:
                    break
            else:
                for source in needed:
                    if source.__class__ is int:
                        filled = cells[source].strip()
                        if filled and filled[0] in "='":  # ="" is no value: a spreadsheet's guard around nothing
                            filled = spreadsheet_text(filled)
                    elif (filled := known.get(source)) is None:
                        filled = known[source] = bool(source(cells, items, tracking, url))
                    if not filled:
                        break
                else:
                    return template
        raise AssertionError("narrow() always ends with a choice that needs nothing")

    def narrow(self, words):
        """The rules that the columns' words allow, in order: each with the derived words it asks for (name,
        method, words wanted) and the sources it needs filled; the default last."""
        seen = {name: self.word(value, name) for name, value in zip(self.word_fields, words)}
        choices = []
        for rule in self.config.rules:
            needed = tuple(
                self.filled.get(name) or (self.cell_at[name] if name in self.cell_at else self.source.get(name))
                for name in rule.needs_filled
            )
            if None in needed:
                continue  # it needs a column this export lacks: it never matches
            asks = tuple(
                (name, self.derived[name], wanted)
                for name, wanted in rule.conditions
                if wanted is not None and name in self.derived
            )
            if all(
                seen.get(name, "") in wanted
                for name, wanted in rule.conditions
                if wanted is not None and name not in self.derived
            ):
                choices.append((asks, needed, self.config.templates[rule.template]))
                if not needed and not asks:
                    return tuple(choices)  # no rule after this one can be reached
        choices.append(((), (), self.config.templates[self.config.default_template]))
        return tuple(choices)

    def word(self, value, field_name=""):
        """The word rules compare a field's value as: status_word, then the layout's sense of it or else the
        vocabulary's meaning (versendet: shipped); remembered."""
        word = self.words.get((field_name, value))
        if word is None:
            word = status_word(value)
            word = self.senses.get(field_name, {}).get(word) or self.meanings.get(word, word)
            self.words[(field_name, value)] = word
        return word

    def link(self, cells, tracking):
        """The export's own tracking link when it is a safe one, else one built from [carriers], else ""."""
        if self.own_url_at is not None and (own := safe_url(cells[self.own_url_at].strip())):
            return own
        if not tracking or self.carrier_at is None:
            return ""
        carrier = cells[self.carrier_at]
        if BETWEEN in carrier:  # parcels with different carriers: whose page would the first number be on?
            return ""
        page = self.carrier_pages.get(carrier)
        if page is None:
            page = self.carrier_pages[carrier] = carrier_page(self.config.carriers, carrier)
        return tracking_link(page, tracking[0]) if page else ""

    def dated(self, at, day_first):
        """The source of a date field: its cell at position at, written as the templates' language writes dates."""
        style = self.style

        def date_cell(cells, items, tracking, url):
            text = cells[at].strip()
            # An ISO time differs in every order, its day in few: written from the day, which date_written
            # remembers (the same text as from the whole time, whatever follows the day).
            if (
                " and " not in text  # the days of an order's parcels (Packer.agreed): each written below
                and (day := ISO_DAY_FIRST.match(text))
                and (written := date_written(day[0], day_first, style)) != day[0]
            ):
                return written
            text = shown_cell(text)
            return date_written(text, day_first, style) if text else ""

        return date_cell

    # The derived placeholders, each (cells, items, tracking numbers, tracking link) -> text.

    def tracking_url(self, cells, items, tracking, url):
        """The tracking link."""
        return url

    def records_updated(self, cells, items, tracking, url):
        """When the records were last brought up to date (the same for every order)."""
        return self.records_text

    def items(self, cells, items, tracking, url):
        """Every line item less what was refunded (all of them when all was), or [items] none when the order lists
        none."""
        for item in items:
            if item.refunded:
                return self.listing(part for item in items if (part := kept_part(item))) or self.listing(items)
        return self.listing(items) or self.config.no_items

    def refunded_items(self, cells, items, tracking, url):
        """What of the items was refunded, as the lines' refunded quantities say; "" where none says."""
        refunded = [item for item in items if item.refunded]
        if not refunded:  # nearly every order: no listing to make
            return ""
        return self.listing((min(item.refunded, item.quantity or item.refunded), item.name, False) for item in refunded)

    def refunds(self, cells, items, tracking, url):
        """'all' when every line was refunded in full, 'some' when part of one was; "" where none says."""
        refunded = [item for item in items if item.refunded]
        if not refunded:
            return ""
        return "all" if all(kept_part(item) is None for item in items) else "some"

    def no_shipping_items(self, cells, items, tracking, url):
        """The lines that need no shipping, where other lines do (when none does, the answer says so itself)."""
        flags = [item.ships for item in items]
        if False not in flags or not any(flag is not False for flag in flags):
            return ""
        return self.listing(item for item in items if item.ships is False)

    def shipped_items(self, cells, items, tracking, url):
        """What of the items has left, as the lines' own statuses or shipped quantities say; "" where none says."""
        return self.listing(part for item in items if (part := self.shipped_part(item)))

    def unshipped_items(self, cells, items, tracking, url):
        """What of the items has not left and still needs to; "" where no line's status or shipped quantity says."""
        if not any(self.told(item) for item in items):
            return ""  # unknown, not "all of it": the export says nothing of each line
        return self.listing(part for item in items if (part := self.unshipped_part(item)))

    def item_count(self, cells, items, tracking, url):
        """How many items in all, where every line's count is a whole number; else ""."""
        counts = [item.quantity for item in items]
        if not counts or None in counts or any(c != int(c) for c in counts):
            return ""
        return str(int(sum(counts)))

    def needs_shipping(self, cells, items, tracking, url):
        """'no' when every line says it needs no shipping, 'yes' when one needs it, "" where the export says nothing."""
        flags = [item.ships for item in items]
        if flags and all(flag is False for flag in flags):
            return "no"
        return "yes" if True in flags else ""

    def overdue(self, cells, items, tracking, url):
        """'yes' when the order was placed more than [settings] overdue_days before the export was made, else "".

        A date whose day and month cannot be told apart (01/02/2026) is overdue when both readings are.
        """
        if not self.placed or not self.export_day:
            return ""
        placed = self.placed(cells)
        readings = [placed] if placed else self.placed_either(cells)
        late = [(self.export_day - date(*placed)).days > self.config.overdue_days for placed in readings]
        return "yes" if late and all(late) else ""

    def parcels(self, cells, items, tracking, url):
        """Each tracking number with the items on its row ('1Z99 (1 x Hat); 1Z98 (2 x Scarf)'), where the export ties
        them and an order has more than one; else ""."""
        if len(tracking) < 2:
            return ""
        tied = {}
        for item in items:
            if len(item.tracking) == 1:  # a row whose cell holds two numbers does not say which parcel holds it
                tied.setdefault(item.tracking[0], []).append(item)
        if not tied:
            return ""
        return "; ".join(
            f"{number} ({self.listing(tied[number])})" if number in tied else number for number in tracking
        )

    def any_shipped(self, cells, items, tracking, url):
        """True when some of the items has left ({shipped_items} is filled), without writing them out."""
        return any(self.shipped_part(item) for item in items)

    def any_unshipped(self, cells, items, tracking, url):
        """True when {unshipped_items} is filled, without writing them out."""
        return any(self.told(item) for item in items) and any(self.unshipped_part(item) for item in items)

    def any_refunded(self, cells, items, tracking, url):
        """True when {refunded_items} is filled."""
        return any(item.refunded for item in items)

    def line_left(self, status):
        """True when a line's status word says it left, PART when in part, else False; remembered per status."""
        left = self.left.get(status)
        if left is None:
            word = self.word(status, "item_status")
            left = self.left[status] = (
                True if word in self.config.shipped_item_statuses else PART if word in PARTIAL_WORDS else False
            )
        return left

    def told(self, item):
        """True when the export says of a line whether it left: a status word, or a shipped quantity."""
        return item.shipped is not None or bool(item.status)

    def shipped_part(self, item):
        """(count or None, name, part) of what of one line has left, or None."""
        if item.shipped is not None:
            if not item.shipped:
                return None
            whole = item.quantity is None or item.shipped >= item.quantity
            return (item.quantity if whole else item.shipped), item.name, False
        left = self.line_left(item.status)
        if left is True:
            return item.quantity, item.name, False
        return (item.quantity, item.name, True) if left is PART else None

    def unshipped_part(self, item):
        """(count or None, name, part) of what of one line has not left and still needs to, or None."""
        if item.ships is False:
            return None  # a line that needs no shipping is never "not shipped yet"
        refunded = item.refunded or 0
        if item.shipped is not None:
            if item.quantity is None:
                return None if item.shipped else (None, item.name, False)
            left = item.quantity - item.shipped - refunded
            return (left, item.name, False) if left > 0 else None
        # An empty status beside lines that have one is a line not fulfilled yet (Shopify leaves it empty).
        left = self.line_left(item.status)
        if left is True:
            return None
        if left is PART:
            return item.quantity, item.name, True
        if item.quantity is not None and refunded:
            return (item.quantity - refunded, item.name, False) if item.quantity > refunded else None
        return item.quantity, item.name, False

    def tracking_number(self, cells, items, tracking, url):
        """The first tracking number."""
        return tracking[0] if tracking else ""

    def tracking_numbers(self, cells, items, tracking, url):
        """Every tracking number, comma-separated."""
        return ", ".join(tracking)

    def nothing(self, cells, items, tracking, url):
        """A mapped field that this export lacks."""
        return ""

    def item(self, item):
        """One item as [items] format says ('2 x Hat'); without a count where the export gives none; 'part of 2 x
        Hat' as [items] part says, for a line the export says left in part without saying how much."""
        quantity, name, part = item[0], item[1], len(item) == 3 and item[2]
        text = name if quantity is None else self.item_text(count_text(quantity), name)
        return self.config.item_part.replace("{item}", text) if part else text

    def listing(self, items):
        """'1 x Hat, 2 x Socks' as [items] format and separator say; past MAX_ITEMS, how many more."""
        if items.__class__ is not list:
            items = list(items)
        if len(items) <= MAX_ITEMS:  # a name's own final stop would double the template's: "regalo.."
            return self.config.item_separator.join(map(self.item, items)).removesuffix(".")
        shown = self.config.item_separator.join(map(self.item, items[:MAX_ITEMS]))
        return f"{shown} and {len(items) - MAX_ITEMS} more"


MAX_ITEMS = 30  # items listed in an answer; an order of hundreds of lines is summed up after these

PARTIAL_WORDS = frozenset({"partial", "partially shipped", "partially fulfilled", "partially delivered"})
PART = "part"  # a line that left in part, without a count (Renderer.line_left)


def numbered(text, names):
    """text with each {name} as {i}, i its place in names: str.format(*values) then fills it."""
    return "".join(
        literal.replace("{", "{{").replace("}", "}}") + ("" if name is None else f"{{{names.index(name)}}}")
        for literal, name, _, _ in Formatter().parse(text)
    )


def json_text(text):
    """A JSON string literal, as json.dumps(ensure_ascii=False) writes it; without its overhead."""
    return encode_basestring(text)


def carrier_page(carriers, carrier):
    """The tracking page of the carrier whose name matches loosely, or ""."""
    key = carrier_key(carrier)
    if key:
        for name, url in carriers:
            if key.startswith(name) or name in key:
                return url
    return ""


def tracking_link(page, number):
    """A carrier's tracking page with the number in it, URL-encoded."""
    if not (number.isascii() and number.isalnum()):  # most numbers are letters and digits: nothing to encode
        number = quote(number, safe="")
    return page.format(tracking_number=number)


def message_body(config, name, **values):
    """A JSON body from one of the message templates (not found, missing, ...)."""
    return json.dumps({"context": config.templates[name].render(values)}, ensure_ascii=False).encode()


MAX_ORDER_ID = 64
MAX_EMAIL = 254
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
NOT_FOUND_ID_LENGTH = 20


def answer(snapshot, order_id, email, overlay=None):
    """(HTTP status, JSON body) for a lookup; the same function serves HTTP and the CLI.

    overlay: orders from webhook events, which answer before the export.
    """
    config = snapshot.config
    if order_id is None or email is None:  # not valid UTF-8
        return 400, message_body(config, "invalid")
    order_id, email = order_id.strip(), email.strip()
    if len(order_id) > MAX_ORDER_ID or len(email) > MAX_EMAIL or CONTROL.search(order_id + email):
        return 400, message_body(config, "invalid")
    wanted = snapshot.normalise(order_id)
    if not wanted or not email:
        missing = [
            what
            for what, given in (("the order number", wanted), ("the email address used for the order", email))
            if not given
        ]
        return 400, message_body(config, "missing", missing=" and ".join(missing))
    if "@" not in email:  # no order has it: the agent should ask again rather than say the order does not exist
        return 404, message_body(config, "not_an_email")
    key = index_key(wanted, normalise_email(email))
    if overlay is not None and overlay.index and (packed := overlay.index.get(key)) is not None:
        if packed:  # else deleted in the shop since the export
            return 200, overlay.render(packed)[1]
    elif (packed := snapshot.index.get(key)) is not None:
        return 200, snapshot.render(packed, order_id)[1]
    return 404, message_body(
        config, "not_found", order_id=echoed(wanted), records_updated=snapshot.renderer.records_text
    )


def echoed(wanted):
    """What a not-found answer may repeat of the typed number: ASCII letters and digits with a digit, else 'given'.

    Never the caller's raw text: an AI reads this, and the caller may be hostile. A word
    in any script ("ignore", "忽略") is no order number; one with a digit is too short to
    carry instructions once cut to NOT_FOUND_ID_LENGTH.
    """
    wanted = wanted[:NOT_FOUND_ID_LENGTH]
    return wanted if wanted.isascii() and wanted.isalnum() and not wanted.isalpha() else "given"


def mask_email(email):
    """'jane@example.com' -> 'j***@example.com' for logs."""
    local, _, domain = email.strip().partition("@")
    if not domain.replace(".", "").replace("-", "").isalnum():  # anything that could forge a log line
        domain = re.sub(r"[^\w.-]", "", domain)
    domain = domain[:64]
    return f"{local[:1]}***@{domain}" if local and domain else "***"


JSON = "application/json"
COMMON_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}  # 404 -> "404 Not Found"


# Before any contexts.toml has loaded, a fault is worded as the shipped `unavailable` template.
UNAVAILABLE = json.dumps(
    {"context": "The order could not be checked right now. Please try again in a few minutes or contact support."}
).encode()


###############################################################################
# The index: the snapshot, building it, surveying it ##########################
###############################################################################
#
# A Snapshot is one export made ready to answer from: its index of keys to packed orders,
# its renderer, what was read and skipped. index_export builds it from a file; survey looks
# at every answer once, for `check` and uploads. Uses everything above.


@dataclass(frozen=True)
class Snapshot:
    """Everything one export and one config produce; never changed once built."""

    config: Config
    index: dict  # "order number key\x1femail" -> the packed order
    source: Path
    file_mtime: float
    file_mtime_ns: int
    file_size: int
    rows: int
    orders: int
    orders_without_email: int
    orders_sharing: int  # orders whose number and email read like another's ('A-12', 'A12')
    rows_without_order: int
    loaded_at: float
    seconds: float
    layout: str
    columns: dict
    example_order_id: str
    packer: Packer
    renderer: Renderer
    encoding: str | None = None  # a CSV's, when it is not UTF-8
    newest_day: float | None = None  # the start of the newest day its orders' dates name (when read dated)
    normalise: object = normalise_order_id  # how this export's order numbers, and the typed ones, compare
    made_at: float | None = None  # when an upload was made (upload_time), where its file's time is its arrival
    reading: dict = None  # rows attached to the order above, rows that are no order, lines before the header

    @property
    def aliased(self):
        """True when some order can be found by another number it carries (see index_export)."""
        return bool((self.reading or {}).get("aliases"))

    @property
    def made(self):
        """When the export was made: an upload's made_at, else its file's modification time."""
        return self.file_mtime if self.made_at is None else self.made_at

    @property
    def data_time(self):
        """When the export was made, never later than its load."""
        return min(self.made, self.loaded_at)

    @property
    def covers(self):
        """The moment before which every change is in the export: its time less the time it takes to make.

        An export is written at its end but read from the shop from its start; a change in
        between may be missing from it, so an event from then is kept, and no answer claims it.
        """
        return math.floor(self.data_time - self.config.export_lag_hours * 3600)

    def describe(self):
        """What was loaded, for logs and for `check`; no customer data."""
        return (
            f"{shown_name(self.source)}: {plural(self.rows, 'row')}, {plural(self.orders, 'order')} "
            f"({self.layout}) in {self.seconds:.2f}s"
        )

    def render(self, packed, typed=""):
        """(template name, JSON body) of a packed order's answer; typed is the number as the caller wrote it."""
        if packed.__class__ is tuple:
            return self.render_shared(packed, typed)
        cells, items, tracking = self.packer.unpack(packed)
        if self.aliased and self.normalise(cells[0]) != self.normalise(typed) and ALIAS_SHOWN.fullmatch(typed.strip()):
            # Found by another number it carries (a marketplace's beside the shop's): said as the customer knows it.
            cells = [typed.strip(), *cells[1:]]
        return self.renderer.render(cells, items, tracking)

    def render_shared(self, orders, typed):
        """One customer's orders whose numbers read alike: the one written as typed, else all of them."""
        unpacked = [self.packer.unpack(packed) for packed in orders]
        exact = [order for order in unpacked if as_written(order[0][0]) == as_written(typed)]
        if len(exact) == 1:
            return self.renderer.render(*exact[0])
        answers = [json.loads(self.renderer.render(*order)[1]) for order in unpacked]
        links = {a["tracking_url"] for a in answers} - {None}
        body = {
            "context": " ".join(a["context"] for a in answers),
            "tracking_url": links.pop() if len(links) == 1 else None,
        }
        return "several", json.dumps(body, ensure_ascii=False).encode()


PAST_DATES = ("order_date", "shipped_at", "cancelled_at")  # dates that lie before the export was made


def newest_day_of(days, zone):
    """The start of the newest of days (texts such as '2026-11-28'), in the shop's time zone; None when none reads."""
    readable_days = []
    for day in filter(ISO_DAY.fullmatch, days):
        with suppress(ValueError):  # 2026-02-30
            readable_days.append(date.fromisoformat(day))
    if not readable_days:
        return None
    return datetime.combine(max(readable_days), datetime.min.time(), zone).timestamp()


ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


ALIAS_SHOWN = re.compile(r"[0-9A-Za-z#][0-9A-Za-z#/_.\-]{0,39}")  # a typed number an answer may repeat


def as_written(order_id):
    """An order number compared nearly as written: 'A-12' is not 'A12', but '#A-12 ' is 'a-12'."""
    return order_id.strip().lstrip("#").strip().casefold()


def build_snapshot(config, path, memory_limit_mb=None, dated=False, previous=None):
    """Read the export at path into an index of packed orders, ready to serve.

    The fast reading assumes what nearly every export is (UTF-8, an order's rows
    together, rows as wide as the header); when the file says otherwise, it is
    read again the way it needs. dated: also find the newest day its orders name
    (Snapshot.newest_day), for an upload, whose file time says only when it arrived.
    """
    careful, encoding, share_entries = False, None, False
    while True:
        try:
            return index_export(config, path, careful, encoding, memory_limit_mb, share_entries, dated, previous)
        except SharedEntry:
            share_entries = True
        except Irregular as why:
            if careful:  # a careful read holds every row as it comes: a second time would be the same
                export_error(path, f"could not be read ({why}, read carefully too). Export the orders again.")
            log.info("%s: %s; reading it again, holding all orders", shown_name(path), why)
            careful = True
        except NotUTF8:
            encoding = legacy_encoding(path)
            log.info("%s: not UTF-8; reading it again as %s", shown_name(path), encoding)


RELOAD_SWITCH_INTERVAL = 0.0005


class Yielding:
    """While a load (or an upload's survey) runs, hand the GIL to request threads after 0.5 ms instead of 5 ms.

    A load is seconds of pure Python; each request needs the GIL several times, and
    waiting the default 5 ms for it each time adds up to hundreds of milliseconds.
    Counted: a reload and an upload's survey may overlap, and the first to end must not
    put 5 ms back under the other, nor the last leave 0.5 ms behind for good.
    """

    def __init__(self):
        self.lock, self.running, self.before = threading.Lock(), 0, None

    @contextmanager
    def __call__(self):
        """The shorter switch interval for the with block; the one before when the last such block ends."""
        with self.lock:
            if not self.running:
                self.before = sys.getswitchinterval()
                sys.setswitchinterval(RELOAD_SWITCH_INTERVAL)
            self.running += 1
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
                if not self.running:
                    sys.setswitchinterval(self.before)


yielding = Yielding()


EQUALS, PLUS, APOSTROPHE, POINT = b"=+'."  # the first bytes of a spreadsheet's marks, as numbers: one memchr each


def index_export(
    config, path, careful, encoding, memory_limit_mb=None, share_entries=False, dated=False, previous=None
):
    """One pass over the export: each order packed and indexed by (order number, email).

    Two orders whose numbers read alike and that share the email ('A-12' and 'A12' of
    one customer) would take one index entry: the count at the end finds them, and the
    file is read again with share_entries=True, where they share the entry as a tuple that
    Snapshot.render tells apart. Nearly every export has none, and pays nothing.
    An order with other numbers a customer may hold (a marketplace's beside the shop's)
    is indexed by each of them too; a row whose e-mail cell holds no address is no order.
    """
    started = time.perf_counter()
    try:
        stat = path.stat()
    except OSError as e:
        export_error(path, f"cannot be read ({e.strerror}).")
    reader = OrderReader(config, path, encoding, memory_limit_mb, previous)
    index, without_email, shared, example, count = {}, 0, 0, "", 0
    packer, pending = None, []  # pending: orders split off a number two customers share, indexed last
    days, dates_at = set(), ()  # the days the orders' dates name, when dated: a few hundred texts
    aliases, alias_at, no_address, no_address_rows = {}, (), 0, 0  # index entries of orders' other numbers, added after
    cells = Counter()  # (what, field) -> cells a spreadsheet marked: guards taken off, damaged values withheld
    try:
        for count, (key, rows) in enumerate(chain(reader.orders(careful), pending), 1):  # noqa: B007 - read after
            if packer is None:  # the first order: the plan is known now
                packer = Packer(reader.plan, reader.plain)
                email_at, alias_at, normalise = packer.email_at, reader.plan.other_ids, reader.normalise
                dating = DayOrder(reader.plan, reader.sample, reader.day_first_language)
                example = order_number_text(packer.order_cells(rows[0])[0])  # its number as shown, for `check`
                dates_at = tuple(i for i, f in enumerate(reader.plan.order_fields) if f in PAST_DATES) if dated else ()
                watching, marked = dating.watched, reader.marked  # locals: this loop runs once an order
            try:
                values, packed = packer.pack(rows)
            except SeveralCustomers:
                first, *others = by_email(rows, packer.email_of)
                pending.extend((key, part) for part in others)
                values, packed = packer.pack(first)
            for at in dates_at:  # a loop, not a generator made for every order of an upload
                days.add(values[at][:10])
            if watching:  # a dict that empties as the columns' day order is told
                dating.see(values)
            # A spreadsheet's marks (see count_marks), each a look at an order's bytes: a guard or scientific
            # notation only in a file whose bytes hold some (see has_marks); a code given a .0 in any file, as a
            # "." is seldom in an order's cells but in every price of a file, where a scan stopped at each. A byte
            # looked for as a number is one memchr (25 ns); as bytes, 150 ns, and a two-byte needle 300 ns.
            if (
                marked
                and (
                    EQUALS in packed
                    and b'="' in packed
                    or PLUS in packed
                    and b"E+" in packed
                    or APOSTROPHE in packed
                    and (b"\x1f'" in packed or b"\x1e'" in packed or packed[:1] == b"'")
                )
                or POINT in packed
                and (b".0\x1f" in packed or b".0\x1e" in packed or packed.endswith(b".0"))
            ):
                count_marks(packed, packer, cells)
            email = (
                values[email_at].strip().casefold().replace(" ", "+")
            )  # normalise_email, index_key: inline in the hottest loop
            if "@" not in email:
                if email:  # "16:41:35" in a footer's e-mail cell: no order's
                    reader.not_orders["rows whose e-mail cell holds no address"] += len(rows)
                    no_address_rows += len(rows)
                    no_address += 1
                    continue
                without_email += 1  # such an order can never be matched
                continue
            if alias_at:
                for at in alias_at:
                    if (alias := normalise(spreadsheet_text(rows[0][at]))) and alias != key:
                        aliases.setdefault(index_key(alias, email), packed)
            if not share_entries:
                index[f"{key}\x1f{email}".encode()] = packed
            elif (kept := index.setdefault(entry := index_key(key, email), packed)) is not packed:
                index[entry] = (*kept, packed) if kept.__class__ is tuple else (kept, packed)
                shared += 1
    except (UserError, Irregular, NotUTF8):
        raise
    except IndexError:  # a row too short for a needed cell
        raise Irregular("a row is shorter than the header") from None
    except csv.Error as e:  # its message names the problem, never a cell's contents
        export_error(
            path,
            f"line {reader.line()}: not a readable CSV ({e}). "
            "Re-export the file; it may have been cut off while being written.",
        )
    except Exception as e:  # a damaged file can fail in any layer (zip, XML, codec, memory): each means refuse it
        export_error(
            path, f"could not be read ({type(e).__name__}). Re-export it; it may have been cut off while being written."
        )
    if len(index) + without_email + shared + no_address != count:
        raise SharedEntry()
    for entry, packed in aliases.items():  # an order's own number wins over another's alias
        index.setdefault(entry, packed)
    plan = reader.plan
    renderer = Renderer(config, plan, dating.result() if packer else None)
    snapshot = Snapshot(
        config=config,
        index=index,
        source=path,
        file_mtime=stat.st_mtime,
        file_mtime_ns=stat.st_mtime_ns,
        file_size=stat.st_size,
        rows=reader.rows - no_address_rows,
        orders=count - no_address,
        orders_without_email=without_email,
        orders_sharing=shared,
        rows_without_order=reader.skipped,
        loaded_at=time.time(),
        seconds=time.perf_counter() - started,
        layout=plan.layout,
        columns=plan.chosen,
        example_order_id=example,
        packer=packer or Packer(plan),
        renderer=renderer,
        encoding=encoding,
        normalise=reader.normalise,
        newest_day=newest_day_of(days, config.timezone),
        reading={
            "attached": reader.attached,
            "not_orders": dict(reader.not_orders),
            "preamble": reader.preamble,
            "aliases": len(aliases),
            "cells": {f"{what} {field}": n for (what, field), n in cells.items()},
            "columns_changed": reader.changed,
            "relay": reader.relay,
            "untied": reader.untied,
        },
    )
    dated_by(snapshot)
    return snapshot


def count_marks(packed, packer, cells):
    """Count one order's cells that a spreadsheet marked: Excel's ="..." guard (taken off when shown: nothing lost),
    and order and tracking numbers it damaged for good (3,60003E+14, a code given a .0): withheld, never shown."""
    head, *rows = packed.decode().split(RECORD)
    fields = packer.plan.order_fields
    for field_name, cell in zip(fields, head.split(FIELD)):
        if cell[:2] == '="' or cell[:1] == "'" and field_name in GUARDED_FIELDS:
            cells[("guard", field_name)] += 1
        if field_name == "order_id" and damaged_number(text := spreadsheet_text(cell)):
            # A .0 comes off (the number customers know is whole); scientific notation lost digits for good.
            cells[("guard" if ADDED_ZERO.search(text) else "damaged", field_name)] += 1
    tracking_at = packer.row_positions[-1]
    for row in rows:
        row_cells = row.split(FIELD)
        for field_name, cell in zip(packer.plan.row_fields, row_cells):
            if cell[:2] == '="' or cell[:1] == "'" and field_name in GUARDED_FIELDS:
                cells[("guard", field_name)] += 1
        if tracking_at is not None and tracking_at < len(row_cells):
            cell = row_cells[tracking_at]
            damaged = (
                1
                if damaged_number(spreadsheet_text(cell))
                else sum(damaged_number(spreadsheet_text(n)) for n in SEVERAL.split(cell) if n.strip())
            )
            if damaged:
                cells[("damaged", "tracking_number")] += damaged


# Fields whose cells a leading ' may guard (Excel's mark for "keep this number as text"); in names it is text.
GUARDED_FIELDS = frozenset(
    (
        "order_id",
        "tracking_number",
        "item_quantity",
        "item_shipped_quantity",
        "item_refunded_quantity",
        "order_date",
        "shipped_at",
        "cancelled_at",
        "estimated_delivery",
    )
)


def dated_by(snapshot):
    """Give the snapshot's answers its time: {records_updated}, and the export's day for {overdue}."""
    renderer, config = snapshot.renderer, snapshot.config
    renderer.records_text = records_time(snapshot.covers, config)
    renderer.export_day = datetime.fromtimestamp(snapshot.data_time, config.timezone).date()


class SharedEntry(Exception):
    """Two orders of one customer take one index entry: read again, keeping both."""


@dataclass
class Survey:
    """What `check` reports beyond the load: answers, status words, numbers that read alike."""

    answers: Counter  # template -> orders with an email that get it
    values: dict  # rule field -> Counter of its status words
    numbers_alike: Counter  # normalised number -> orders, where more than one order reads as that number
    by_status: dict  # status word (as rules read it) -> Counter of the templates its orders (with an email) get
    unread: dict = None  # "items"/"tracking" -> [packed entries that did not read as the layout says, the first]
    kinds: Counter = None  # kinds of typed rows the layout does not know
    disagreed: Counter = None  # field -> orders whose rows give it different words
    lost: int = 0  # workbook numbers too long to be exact, read as empty
    counted: int = 0  # orders surveyed: all of them, or the first `limit`


def survey(snapshot, limit=None):
    """For `check`: stream the export again as a load does, so a big export fits in memory.

    limit: survey the first so many orders only (an upload's reply: answering it must not take
    several loads' time); Survey.counted says how many were.
    """
    plan = snapshot.packer.plan
    same_columns = {"header": list(plan.header), "chosen": dict(snapshot.columns)}  # as the load chose them
    for careful in (False, True):
        result = Survey(Counter(), {f: Counter() for f in survey_fields(snapshot.config, plan)}, Counter(), {})
        written, status_answers = {f: Counter() for f in result.values}, Counter()
        reader = OrderReader(snapshot.config, snapshot.source, snapshot.encoding, previous=same_columns)
        packer = None
        try:
            orders = reader.orders(careful)  # every order, those without an email too
            for key, rows in orders:
                if result.counted == limit:
                    orders.close()  # the file with it
                    break
                result.counted += 1
                packer = packer or Packer(reader.plan, reader.plain)
                for values, packed in packer.pack_each(rows):
                    cells, items, tracking = packer.unpack(packed)
                    order = dict(zip(reader.plan.order_fields, cells))
                    for name, counter in written.items():  # as written: folded once per distinct value, below
                        counter[order.get(name, "")] += 1
                    if "@" in values[packer.email_at]:
                        answer_name = snapshot.renderer.template_of(cells, items, tracking)
                        result.answers[answer_name] += 1
                        status_answers[order.get("status", ""), answer_name] += 1
                    result.numbers_alike[key] += 1
            result.numbers_alike = Counter({key: n for key, n in result.numbers_alike.items() if n > 1})
            for name, counter in written.items():
                for value, n in counter.items():
                    result.values[name][status_word(value)] += n
            for (status, answer_name), n in status_answers.items():
                result.by_status.setdefault(snapshot.renderer.word(status, "status"), Counter())[answer_name] += n
            if packer:
                result.unread, result.kinds, result.disagreed = packer.unread, packer.kinds, packer.disagreed
            result.lost = reader.lost[0]
            return result
        except (Irregular, IndexError):  # as in index_export(): read again, carefully
            continue


def survey_fields(config, plan):
    """The fields that rules compare with words (statuses), as `check` reports them."""
    fields = [name for rule in config.rules for name, wanted in rule.conditions if wanted is not None]
    return [f for f in dict.fromkeys(fields) if f in plan.order_fields]


def records_time(timestamp, config):
    """{records_updated}: a moment in the shop's time zone, its day as the templates' language writes days."""
    moment = datetime.fromtimestamp(timestamp, config.timezone)
    style = (config.dates or {}).get(config.language, ENGLISH)
    return f"{written_day((moment.year, moment.month, moment.day), style)}, {moment:%H:%M %Z}"


def iso_time(timestamp):
    """A UTC timestamp as ISO 8601."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


###############################################################################
# Warnings: what `check` and an upload say about an export ####################
###############################################################################
#
# Read from a snapshot and its survey: columns that contradict their field, status words no
# rule knows, items not tied to a parcel, cells a spreadsheet damaged. Uses the index above.


def reading_counts(snapshot):
    """What reading the export left out, attached or withheld, per reason: for /healthz and /metrics."""
    reading = snapshot.reading or {}
    cells = reading.get("cells") or {}
    return {
        "attached_to_the_order_above": reading.get("attached", 0),
        "left_out": {
            "no order number": snapshot.rows_without_order,
            **(reading.get("not_orders") or {}),
            **({"before the header": len(reading["preamble"])} if reading.get("preamble") else {}),
        },
        "cells_withheld": {key.split(" ", 1)[1]: n for key, n in cells.items() if key.startswith("damaged ")},
        "cells_unguarded": sum(n for key, n in cells.items() if key.startswith("guard ")),
    }


def data_notes(snapshot):
    """What the merchant should know about the export and answers served: for check, /healthz, the status page."""
    reading = snapshot.reading or {}
    if snapshot.config.earlier_rules:
        yield (
            "[[rules]] are word for word an earlier release's: they lack the rules added since for partly "
            "refunded and partly shipped orders, refunded lines, lines that need no shipping and orders open for "
            "long, so such orders get a plainer answer. Copy [[rules]] and [templates] from the shipped "
            "contexts.toml (docs/UPDATING.md)"
        )
    for name, promise in snapshot.config.promising:
        yield (
            f"[templates] {name} is word for word an earlier release's answer, which promises {promise}: no export "
            "holds that. Keep it only if your shop makes that promise; docs/UPDATING.md shows the new wording"
        )
    for key, count in (reading.get("cells") or {}).items():
        what, field_name = key.split(" ", 1)
        if what == "damaged":
            yield (
                f"{plural(count, f'{field_name} cell')} damaged by a spreadsheet (scientific notation such as "
                "3,60003E+14, lost digits, a .0 added): withheld, never shown"
                + (" (those orders cannot be found by their number)" if field_name == "order_id" else "")
                + ". Download the export again without opening it in a spreadsheet, or format the column as text "
                "before saving it"
            )
    if relay := reading.get("relay"):
        share = "all" if relay["addresses"] == relay["of"] else f"{relay['addresses']} of {relay['of']}"
        yield (
            f"{share} of the e-mail addresses looked at are {relay['marketplace']}'s relay addresses, which "
            f"stand in for the buyer's own: customers do not know them, so lookups by a customer's e-mail will "
            f"not find these orders. {relay['marketplace']}'s own order pages tell those buyers where their "
            "order is."
        )
    for field_name, was, now in reading.get("columns_changed", ()):
        yield (
            f"the header row changed since the last export accepted: {field_name} is now read from "
            f"{repr(now) if now else 'no column'} (was {repr(was) if was else 'no column'}). Check that it is "
            f"right; [columns] {field_name} in contexts.toml names the column for good."
        )


def check_summary(snapshot, surveyed):
    """`check`'s lines on what was read: file, columns, counts, number format, words, answers."""
    yield f"export   {printable(snapshot.source)} ({snapshot.layout}, modified {iso_time(snapshot.made)})"
    plan = snapshot.packer.plan
    if snapshot.config.retired:
        names = ", ".join(field_name for field_name, _ in snapshot.config.retired)
        yield (
            f"columns  [columns] {names}: each is a list an earlier release shipped, read as shipped data: these "
            "fields are found by their headers' words now, as below (the lines may be deleted)"
        )
    if retired := snapshot.config.retired_carriers:
        yield (
            f"carriers [carriers] {', '.join(retired[:5])}{' and more' if len(retired) > 5 else ''}: "
            f"{plural(len(retired), 'line')} equal to a page the service ships (carriers.toml) or once shipped: "
            "carriers.toml's serves, so its fixes reach you (the lines may be deleted)"
        )
    header = plan.header
    others = {field_name: [header[i] for i in more] for field_name, _, more in plan.competing}
    for field_name, chosen in snapshot.columns.items():
        why = [(plan.evidence or {}).get(field_name, "")]
        if field_name in others:
            why.append(f"also fits: {', '.join(repr(printable(h)) for h in others[field_name])}")
        said = "; ".join(filter(None, why))
        yield f'column   {field_name:<18} <- "{printable(chosen)}"' + (f" ({said})" if said else "")
    for field_name, columns in (("items", plan.item_columns), ("tracking", plan.tracking_columns)):
        if columns:
            yield f"packed   {field_name:<18} <- " + ", ".join(repr(printable(header[i])) for i in columns)
    if plan.type_column is not None:
        yield (
            f'typed    rows by "{printable(header[plan.type_column])}": only {", ".join(sorted(plan.rules.item_rows))} '
            f"rows are items; tracking from {', '.join(sorted(plan.rules.tracking_rows))} rows"
        )
    from_entries = ("carrier", "tracking_url") if plan.tracking_columns else ()
    missing = [
        f
        for f, names in snapshot.config.columns.items()
        if names and f not in snapshot.columns and f not in plan.row_fields and f not in from_entries
    ]
    if missing:
        yield f"no column for {', '.join(missing)} (their placeholders stay empty)"
    yield f"rows     {snapshot.rows}; orders {snapshot.orders}; read in {snapshot.seconds:.2f}s"
    reading = snapshot.reading or {}
    if reading.get("attached"):
        one = reading["attached"] == 1
        yield (
            f"rows     {plural(reading['attached'], 'item row')} without an order number "
            f"{'belongs' if one else 'belong'} to the order above {'it' if one else 'them'} (the export writes an "
            "order's further lines so)"
        )
    guards = sum(n for key, n in (reading.get("cells") or {}).items() if key.startswith("guard "))
    if guards:
        yield (
            f"cells    a spreadsheet's marks taken off {plural(guards, 'cell')} (Excel's =\"...\" guard, a leading ', "
            "a .0 after a whole order number): nothing of their value is lost"
        )
    if reading.get("aliases"):
        yield (
            f"rows     {plural(reading['aliases'], 'order')} can also be found by their "
            f"{', '.join(repr(printable(plan.header[c])) for c in plan.other_ids)}"
        )
    yield f"format   order numbers look like {snapshot.example_order_id!r}: give this format to the chat platform"
    for field_name, counts in surveyed.values.items():
        yield f"values   {field_name}: " + ", ".join(
            f"{printable(v)[:40] or '(empty)'} {n}"
            + (f" (= {meaning})" if (meaning := snapshot.renderer.word(v, field_name)) != v else "")
            for v, n in counts.most_common(12)
        )
    unmatched = (
        f" ({snapshot.orders_without_email} without an email are not counted)" if snapshot.orders_without_email else ""
    )
    yield "answers  " + ", ".join(f"{t} {n}" for t, n in surveyed.answers.most_common()) + unmatched


def check_warnings(snapshot, surveyed):
    """What `check` warns about: answers that rest on a missing column or an unknown word, and data problems."""
    config = snapshot.config
    layout = snapshot.packer.plan.rules
    if "status" not in snapshot.columns and any(
        name == "status" for rule in config.rules for name, _ in rule.conditions
    ):
        answers = ", ".join(f"{t} {n}" for t, n in surveyed.answers.most_common())
        looked = (
            f"the {layout.name} layout reads it from {', '.join(repr(h) for h in layout.columns['status'])}"
            if layout and "status" in layout.columns
            else 'no header says the order\'s state, such as "Status", "Fulfillment Status" or "Estado del envío"'
        )
        yield (
            f"no status column ({looked}): every order is answered as no status tells ({answers}). If your export "
            f"has one, add its header to {columns_key(layout, 'status')}."
        )
    for word, answers in unknown_statuses(config, surveyed):
        yield (
            f"status {printable(word)[:40]!r} ({plural(sum(answers.values()), 'order')}) is named by no rule: "
            f"answered with {', '.join(answers)}. If you know what it means, paste the line below into contexts.toml"
        )
    for field_name, header, why in snapshot.packer.plan.contradicted:
        yield (
            f"[columns] {field_name} names {printable(header)!r}, whose cells do not look like {field_name} ({why}): "
            "it is read as you chose; check that the line names the right column"
        )
    for headers in snapshot.packer.plan.headers_alike:
        yield (
            f"columns {' and '.join(repr(printable(h)) for h in headers)} read alike (case, _, -, : and spaces "
            f"do not count); the first, {printable(headers[0])!r}, is the one read"
        )
    for kind, count in (surveyed.kinds or Counter()).most_common():
        one = count == 1
        yield (
            f"{plural(count, 'row')} of the kind {kind!r} {'is' if one else 'are'} neither items nor tracking for this "
            f"layout and {'was' if one else 'were'} left out; name the kind in its rows (items, tracking or other) "
            "in contexts.toml if they matter"
        )
    for field_name, count in (surveyed.disagreed or Counter()).most_common():
        if field_name in AGREED_DATES:
            yield (
                f"{plural(count, 'order', ('has', 'have'))} rows that give "
                f"{field_name} different dates (parcels sent on different "
                "days): their answers give every date"
            )
            continue
        if field_name == "carrier":
            yield (
                f"{plural(count, 'order', ('has', 'have'))} parcels with "
                "different carriers: their answers name every carrier, and "
                "give a tracking link only where the export has one of its own"
            )
            continue
        yield (
            f"{plural(count, 'order', ('has', 'have'))} rows that give "
            f"{field_name} different words (e.g. one parcel delivered, one "
            "not): their answers name all of them and claim none; if one column holds the order's own "
            f"state, name it first in [columns] {field_name}"
        )
    if surveyed.lost:
        yield (
            f"{surveyed.lost} cells held numbers of 16 or more digits, which a spreadsheet keeps to 15 only: they "
            "are read as empty rather than shown with wrong digits. Format those columns (tracking numbers, "
            "long order numbers) as text before exporting, or export CSV"
        )
    unread = surveyed.unread or {}
    if "items" in unread:
        count, example = unread["items"]
        yield (
            f"{plural(count, 'packed item')} did not read as the layout "
            f"says (e.g. {example!r}); each is shown as written, "
            "with no quantity"
        )
    if "tracking" in unread:
        count, example = unread["tracking"]
        yield (
            f"{count:,} packed tracking {'entry' if count == 1 else 'entries'} had "
            f"no tracking number the layout reads (e.g. {example!r}); they are "
            "left out of the answers"
        )
    if snapshot.orders_without_email:
        yield f"{plural(snapshot.orders_without_email, 'order', ('has', 'have'))} no email and can never be found"
    if untied := (snapshot.reading or {}).get("untied"):
        one = untied == 1
        yield (
            f"{plural(untied, 'item row', ('has', 'have'))} no order number and "
            f"{'follows' if one else 'follow'} no order of {'its' if one else 'their'} customer (another e-mail, "
            f"or apart from any order), so no order could take {'it' if one else 'them'}: the orders near "
            f"{'it' if one else 'them'} may be answered with fewer items than they hold. Export the order number "
            "on every row, if the export can"
        )
    if snapshot.rows_without_order:
        one = snapshot.rows_without_order == 1
        yield (
            f"{plural(snapshot.rows_without_order, 'row', ('has', 'have'))} no order number and "
            f"{'was' if one else 'were'} skipped"
        )
    reading = snapshot.reading or {}
    for why, count in (reading.get("not_orders") or {}).items():
        yield f"{plural(count, 'row')} left out as {why}"
    if reading.get("preamble"):
        yield (
            f"{plural(len(reading['preamble']), 'line')} before the header left out: "
            + ", ".join(repr(line) for line in reading["preamble"][:3])
        )
    if surveyed.numbers_alike:
        number, count = surveyed.numbers_alike.most_common(1)[0]
        yield (
            f"{plural(len(surveyed.numbers_alike), 'order number')} are "
            f"written in ways that read alike (e.g. {count} orders read "
            f"as {number!r}, such as '#{number}' and '{number}'): orders with different emails are kept apart; "
            f"{snapshot.orders_sharing} share an email with another, and a lookup of those answers with the one "
            "written as typed, else with all of them"
        )
    for template, field_name in free_text_fields(config, snapshot.columns):
        yield (
            f"[templates] {template} uses {{{field_name}}}, text that customers or staff type freely: it reaches "
            "the AI as fact, instructions included. Keep it out of answers."
        )
    yield from data_notes(snapshot)


def unknown_statuses(config, surveyed):
    """(status word, Counter of the answers its orders get) of the words no rule names, the commonest first."""
    named = rule_words(config.rules, "status")
    for word, answers in sorted(surveyed.by_status.items(), key=lambda item: -sum(item[1].values())):
        if word and word not in named:
            yield word, answers


def status_paste(config, surveyed):
    """The [vocabulary.statuses] lines `check` prints for status words no rule names, one per word to complete."""
    unknown = [word for word, _ in unknown_statuses(config, surveyed)]
    if not unknown:
        return ""
    lines = [
        "",
        "Status words no rule names. To say what each means, put its word in the list of the meaning that "
        "is true, under [vocabulary.statuses] in contexts.toml (a table to add once; meanings: "
        + ", ".join(STATUS_MEANINGS)
        + "):",
        "[vocabulary.statuses]",
    ]
    lines += [f'"MEANING" = [{json.dumps(word, ensure_ascii=False)}]' for word in unknown[:20]]
    return "\n".join(lines)


FREE_TEXT = (
    "note",
    "comment",
    "instruction",
    "message",
    "remark",
    "memo",
    "request",
    "gift",
    "bemerkung",
    "kommentar",
    "notiz",
    "hinweis",
    "commentaire",
    "remarque",
    "nota",
    "opmerking",
    "comentario",
    "observacion",
)


def free_text_fields(config, columns=None):
    """(template, placeholder) pairs where a template shows a free-text column such as notes.

    Both the placeholder's name and the header it reads (columns: field -> header) count:
    delivery_info = ["Customer Note"] is a note too.
    """
    columns = columns or {}
    for name, template in config.templates.items():
        for field_name in template.fields:
            read = f"{field_name} {snake_case(columns.get(field_name, ''))}"
            if any(word in read for word in FREE_TEXT):
                yield name, field_name


###############################################################################
# Guards: the record of accepted exports, refusals of a smaller one ###########
###############################################################################
#
# The service never trades good data for a broken export: an export much smaller than the
# ones accepted before, or holding other orders, is refused, and the refusal is named.
# The record lives in STATE_DIR. Uses the index above.

ACCEPTED_FILE = "accepted.json"  # in STATE_DIR, beside the last good copy: what that export held
RECORD_SAMPLE = 8000  # keys kept of the accepted export: a vanished share to within a percent or two
ACCEPTED_HISTORY = 7  # accepted exports whose order counts set the floor: a week of nightly ones


def write_record(path, snapshot, history):
    """Note what an accepted export held, so that a restart can tell a cut-off export from it.

    history: the order counts of the last ACCEPTED_HISTORY exports accepted, this one's last (see refuse_below_floor).
    """
    step = max(1, len(snapshot.index) // RECORD_SAMPLE)
    record = {
        "file_size": snapshot.file_size,
        "file_mtime_ns": snapshot.file_mtime_ns,
        "orders": snapshot.orders,
        "keys_read_as": keys_read_as(snapshot),
        "history": list(history),
        "columns": choice_of(snapshot),
        "sample": [key.decode() for key in islice(snapshot.index, 0, None, step)],
    }
    partial = path.with_name(".partial-" + path.name)
    partial.write_text(json.dumps(record), encoding="utf-8")
    os.replace(partial, path)


def read_history(path):
    """(file size, mtime, orders) of the last exports accepted, as the record keeps them; none without a record."""
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("history") or []
        return deque((tuple(map(int, entry)) for entry in history), maxlen=ACCEPTED_HISTORY)
    except (OSError, ValueError, AttributeError, TypeError):
        return deque(maxlen=ACCEPTED_HISTORY)


def choice_of(snapshot):
    """The header row and the columns chosen for it: the next export with this header row is read the same way."""
    return {"header": list(snapshot.packer.plan.header), "chosen": dict(snapshot.columns)}


def read_choice(path):
    """The column choice the record keeps (see choice_of), or None."""
    try:
        choice = json.loads(path.read_text(encoding="utf-8")).get("columns")
        if isinstance(choice.get("header"), list) and isinstance(choice.get("chosen"), dict):
            return {
                "header": [str(h) for h in choice["header"]],
                "chosen": {str(k): str(v) for k, v in choice["chosen"].items()},
            }
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return None


def remember_accepted(history, snapshot):
    """Add an accepted export to the history, once: a contexts.toml edit or a restart reads the same file again."""
    entry = (snapshot.file_size, snapshot.file_mtime_ns, snapshot.orders)
    if not history or history[-1][:2] != entry[:2]:
        history.append(entry)


def refuse_below_floor(snapshot, history):
    """Refuse an export far smaller than the largest of the last exports accepted: each a little smaller than the one
    before (15% a night) passes the comparison with the one being served, but not this one."""
    if history:
        refuse_shrunk(
            snapshot,
            max(orders for *_, orders in history),
            (),
            f"in the largest of the last {len(history)} exports accepted",
        )


def keys_read_as(snapshot):
    """How a snapshot makes its keys (see same_keys), as text a record can hold."""
    return [snapshot.columns.get("order_id"), snapshot.columns.get("email"), snapshot.normalise.__name__]


def guard_against_record(snapshot, path):
    """At start, refuse an export that a running service would have refused after the last accepted one.

    Without this, a restart (a reboot, a deploy, the kernel's OOM killer) would take any
    whole file, a cut-off one included, and copy it over the last good one.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        orders, sample = int(record["orders"]), [key.encode() for key in record["sample"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no record (a first start) or an unreadable one: nothing to compare with
    if (record.get("file_size"), record.get("file_mtime_ns")) == (snapshot.file_size, snapshot.file_mtime_ns):
        return  # the export accepted last time
    same_reading = record.get("keys_read_as") == keys_read_as(snapshot)
    refuse_shrunk(snapshot, orders, sample if same_reading else (), "of the export accepted last", exact=False)
    refuse_below_floor(snapshot, read_history(path))


def refuse_shrunk(snapshot, orders, keys, whose, exact=True):
    """Refuse an export with far fewer than orders, or without too many of keys: the orders it is compared with.

    whose: what those are ("being served"); exact=False when keys are a sample of them.
    """
    name, config = shown_name(snapshot.source), snapshot.config
    if snapshot.orders < orders * config.min_orders_ratio:
        raise ExportError(
            f"{name}: holds {plural(snapshot.orders, 'order')}, fewer than "
            f"{config.min_orders_ratio:.0%} of the {orders} {whose}, "
            "so it looks cut off. If the shrink is real, lower [settings] min_orders_ratio in contexts.toml: the edit "
            "is picked up at once.",
            file=name,
        )
    if not keys:
        return
    # Counted, not a set of differences: a set of 500,000 keys would be 30 MB more at the peak.
    vanished = len(keys) - sum(map(snapshot.index.__contains__, keys))
    if vanished > len(keys) * config.max_vanished_ratio:
        share = vanished / len(keys)
        missing = (
            f"{vanished} of the {len(keys)} orders {whose} ({share:.0%})"
            if exact
            else f"about {share:.0%} of the orders {whose}"
        )
        raise ExportError(
            f"{name}: {missing} are not in it, more than max_vanished_ratio ({config.max_vanished_ratio:.0%}) allows: "
            "it looks cut off or filtered. If those orders really left the export, raise [settings] "
            "max_vanished_ratio in contexts.toml: the edit is picked up at once.",
            file=name,
        )


def same_file(a, b):
    """True when two snapshots read one unchanged file: a contexts.toml edit, not a new export."""
    return (a.source, a.file_mtime_ns, a.file_size) == (b.source, b.file_mtime_ns, b.file_size)


def same_keys(a, b):
    """True when two snapshots make their index keys alike: the same columns, read the same way.

    A contexts.toml edit that picks another order-number or email column changes every key;
    that is no sign of a cut-off export, so the count of vanished orders means nothing then.
    """
    return (a.columns.get("order_id"), a.columns.get("email"), a.normalise) == (
        b.columns.get("order_id"),
        b.columns.get("email"),
        b.normalise,
    )


# What a refusal's message says, as a word a metric's label can carry (the first that fits).
REFUSAL_KINDS = (
    ("min_orders_ratio", "shrunk"),
    ("max_vanished_ratio", "vanished"),
    ("looks cut off", "cut_off"),
    ("holds no orders", "no_orders"),
    ("is empty", "no_orders"),
    ("no column for", "missing_column"),
    ("web page", "not_an_export"),
    ("binary file", "not_an_export"),
    ("is not a table", "not_an_export"),
    ("not read here", "not_an_export"),
    ("zip archive", "not_an_export"),
    ("took the service past", "memory"),
    ("when the service stopped", "stopped_a_load"),
    ("no such file", "missing_file"),
    ("no export (", "missing_file"),
    ("do not hold a table", "missing_file"),
    ("larger than MAX_EXPORT_MB", "too_large"),
)


def refusal_kind(error):
    """The kind of a refused load, for /metrics: contexts (a contexts.toml edit), cut_off, shrunk, ..."""
    if isinstance(error, ConfigError):
        return "contexts"
    if isinstance(error, FetchError) and "MAX_EXPORT_MB" not in str(error):
        return "fetch_failed"
    text = str(error)
    return next((kind for words, kind in REFUSAL_KINDS if words in text), "unreadable")


###############################################################################
# Webhook events: from a signed body to an event ##############################
###############################################################################
#
# The shops' order events between exports: the signature (HMAC-SHA256, base64), the shop a
# body names, and a Shopify or WooCommerce order mapped to the fields an export would hold,
# dated by the shop's own signed time. Uses the plan's layouts above.

# The fields an event keeps, as a webhook-built "export" names them: answers use no more.
EVENT_ORDER_FIELDS = (
    "order_id",
    "email",
    "status",
    "financial_status",
    "cancelled_at",
    "order_date",
    "shipped_at",
    "carrier",
    "tracking_url",
    "shipment_status",
)
EVENT_HEADER = (*EVENT_ORDER_FIELDS, "item_name", "item_quantity", "item_status", "tracking_number")
EVENT_LAYOUT = Layout(
    key="webhooks", name="webhook events", detect=("order_id",), columns={name: (name,) for name in EVENT_HEADER}
)
GONE = b""  # an order deleted in the shop after the export: not found, whatever the export says


@dataclass(frozen=True)
class Event:
    """One order as a webhook told it: only what answers use, never an address, a phone or a payment."""

    platform: str  # "shopify" or "woocommerce"
    platform_id: str  # the shop's own id of the order (deletions name only this)
    fields: dict  # EVENT_ORDER_FIELDS -> text, items: [[quantity, name, status]], tracking: [[number, carrier, link]]
    time: float  # when the order last changed, as the shop says
    deleted: bool = False


def shopify_event(order, topic):
    """An Event from a Shopify order payload (REST Admin API, orders/* topics)."""
    if topic == "orders/delete":
        return Event("shopify", str(order["id"]), {}, time.time(), deleted=True)
    fulfillments = [
        f
        for f in order.get("fulfillments") or ()
        if isinstance(f, dict) and str(f.get("status") or "").lower() not in ("cancelled", "error", "failure")
    ]
    tracking = [
        [number, payload_text(f.get("tracking_company")), link]
        for f in fulfillments
        for number, link in zip_longest(
            strings(f.get("tracking_numbers")) or strings([f.get("tracking_number")]),
            strings(f.get("tracking_urls")) or strings([f.get("tracking_url")]),
            fillvalue="",
        )
        if number
    ]
    customer = order.get("customer") if isinstance(order.get("customer"), dict) else {}
    fields = {
        "order_id": payload_text(order.get("name")) or payload_text(order.get("order_number")),
        "email": payload_text(order.get("email"))
        or payload_text(order.get("contact_email"))
        or payload_text(customer.get("email")),
        # Shopify leaves fulfillment_status empty until something of the order ships.
        "status": payload_text(order.get("fulfillment_status")) or "unfulfilled",
        "financial_status": payload_text(order.get("financial_status")),
        "cancelled_at": payload_text(order.get("cancelled_at")),
        "order_date": payload_text(order.get("created_at")),
        "shipped_at": next((payload_text(f.get("created_at")) for f in fulfillments if f.get("created_at")), ""),
        "carrier": BETWEEN.join(
            dict.fromkeys(
                payload_text(f.get("tracking_company")) for f in fulfillments if payload_text(f.get("tracking_company"))
            )
        ),
        "tracking_url": next((link for _, _, link in tracking if link), ""),
        # Each parcel's own: "delivered" only when every parcel is, as with an export's rows.
        "shipment_status": " / ".join(
            dict.fromkeys(payload_text(f.get("shipment_status")) or "unknown" for f in fulfillments)
        )
        if any(f.get("shipment_status") for f in fulfillments)
        else "",
        "items": [
            [
                payload_text(i.get("quantity")) or "1",
                payload_text(i.get("name")) or payload_text(i.get("title")),
                payload_text(i.get("fulfillment_status")),
            ]
            for i in order.get("line_items") or ()
            if isinstance(i, dict)
        ],
        "tracking": tracking,
    }
    return Event("shopify", str(order["id"]), fields, event_time(order.get("updated_at")))


def woocommerce_event(order, topic):
    """An Event from a WooCommerce order payload (REST API v3; order.* topics)."""
    if topic == "order.deleted":  # the order went to the trash; order.restored brings it back
        return Event("woocommerce", str(order["id"]), {}, time.time(), deleted=True)
    billing = order.get("billing") if isinstance(order.get("billing"), dict) else {}
    tracking = [
        [
            payload_text(t.get("tracking_number")),
            unescaped(t.get("custom_tracking_provider")) or payload_text(t.get("tracking_provider")),
            payload_text(t.get("custom_tracking_link")),
        ]
        for meta in order.get("meta_data") or ()
        if isinstance(meta, dict) and meta.get("key") == "_wc_shipment_tracking_items"
        for t in tracking_items(meta.get("value"))
        if payload_text(t.get("tracking_number"))
    ]
    fields = {
        "order_id": payload_text(order.get("number")) or payload_text(order.get("id")),
        "email": payload_text(billing.get("email")),
        "status": payload_text(order.get("status")),
        "financial_status": "",
        "cancelled_at": "",
        "order_date": payload_text(order.get("date_created")),
        "shipped_at": payload_text(order.get("date_completed")),
        "carrier": BETWEEN.join(dict.fromkeys(carrier for _, carrier, _ in tracking if carrier)),
        "tracking_url": next((link for _, _, link in tracking if link), ""),
        "shipment_status": "",
        "items": [
            [payload_text(i.get("quantity")) or "1", unescaped(i.get("name")), ""]
            for i in order.get("line_items") or ()
            if isinstance(i, dict)
        ],
        "tracking": tracking,
    }
    modified = payload_text(order.get("date_modified_gmt"))
    return Event("woocommerce", str(order["id"]), fields, event_time(modified + "Z" if modified else ""))


def tracking_items(value):
    """The entries of WooCommerce Shipment Tracking's meta: a list, an object of numbered entries, or JSON text."""
    if isinstance(value, str):
        with suppress(ValueError):
            value = json.loads(value)
    if isinstance(value, dict):
        value = list(value.values())
    return [t for t in value if isinstance(t, dict)] if isinstance(value, list) else []


def payload_text(value):
    """A payload's value as one short line of text ("" for null): payloads are not trusted more than exports."""
    if value is None or isinstance(value, (dict, list)):
        return ""
    return one_line(str(value))


def unescaped(value):
    """payload_text() of a name WooCommerce keeps as HTML ("Ship Your Idea &ndash; Black"), as a customer reads it."""
    return one_line(html.unescape(payload_text(value)))


def strings(values):
    """A list of texts from a payload's list, empty ones left out."""
    return [t for t in map(payload_text, values if isinstance(values, list) else []) if t]


def event_time(iso):
    """A payload's ISO 8601 time as a timestamp; now when it has none or no zone, or lies ahead of now.

    A time ahead (a shop's clock running fast, or a forged payload) would make the order's
    newest change look older than it, and a deletion sent after it would be put aside.
    """
    now = time.time()
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return now
    return min(moment.timestamp(), now) if moment.tzinfo else now


def from_shop(platform, order, shop, domains):
    """True when a delivery names one of the shop's domains, in its header and in the body's own links.

    The header is not signed; the body's links are (Shopify's order_status_url, WooCommerce's
    _links), so a body of another shop that shares the secret names that shop there.
    """
    header_host = (urlsplit(shop).hostname or "") if "//" in shop else shop.strip().lower()
    if header_host not in domains:
        return False
    described = order.get("_links") if isinstance(order.get("_links"), dict) else {}
    links = (
        [order.get("order_status_url")]
        if platform == "shopify"
        else [
            link.get("href")
            for links in described.values()
            if isinstance(links, list)
            for link in links
            if isinstance(link, dict)
        ]
    )
    hosts = {urlsplit(link).hostname for link in links if isinstance(link, str) and "//" in link}
    return hosts <= domains


def signature_of(secret, body):
    """How Shopify and WooCommerce sign a webhook: base64 of the body's HMAC-SHA256 under the secret."""
    import base64

    return base64.b64encode(hmac.new(secret.encode(), body, "sha256").digest())


def signed(secrets_, body, signature):
    """True when signature is signature_of(body) under one of the secrets; compared in constant time."""
    given = signature.strip().encode("latin-1", "replace")
    ok = False
    for secret in secrets_:  # every one, no early exit: the time taken does not tell which matched
        ok |= bool(given) and hmac.compare_digest(given, signature_of(secret, body))
    return ok


###############################################################################
# Webhook events: the store and the overlay ###################################
###############################################################################
#
# Events kept in SQLite in STATE_DIR (WebhookStore), applied once, the newest change of an
# order winning; and the Overlay, the in-memory orders they tell, answered before the
# export's. Uses the events above and the rendering.


class WebhookStore:
    """Webhook events in SQLite (WAL) in STATE_DIR: every accepted event survives a restart.

    One row per order a shop told about; the newest change by the shop's own signed time
    wins (a late retry of an older change is not applied over a newer one); a delivery id,
    and a body, is applied once. A deletion carries no time of its own: it keeps the order's
    newest signed time, so only a later change of the order, or an export made after the
    deletion arrived that still holds it, undoes it. The deliveries remembered are bounded
    in age and number, and the file gives freed room back (see upkeep).
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS orders (
            platform TEXT NOT NULL, platform_id TEXT NOT NULL, order_key TEXT NOT NULL, email_key TEXT NOT NULL,
            fields TEXT NOT NULL, time REAL NOT NULL, received REAL NOT NULL, deleted INTEGER NOT NULL,
            PRIMARY KEY (platform, platform_id));
        CREATE TABLE IF NOT EXISTS deliveries (delivery TEXT PRIMARY KEY, received REAL NOT NULL);
        CREATE INDEX IF NOT EXISTS orders_by_time ON orders (time);
        CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries (received);
    """

    ROW = "platform, order_key, email_key, fields, deleted, received, time"  # as rows() gives them
    FAILED_SECONDS = 900  # a failed write shows on /healthz this long, so a monitor polling it sees it

    def __init__(self, path, max_orders=100_000, days=30.0):
        self.path, self.max_orders, self.days = path, max_orders, days
        self.keeps_unknown = False  # as the shared store's spool: a deletion of an order it does not hold is kept
        self.lock = threading.Lock()  # one connection, one user at a time
        self.moved_aside = None  # why a corrupt file was moved aside, for /healthz
        self.failing, self.failed_at = None, 0.0  # why and when a write last failed, for /healthz
        self.upkept = time.monotonic()
        self.db = self.open()
        self.count = self.db.execute("SELECT count(*) FROM orders").fetchone()[0]
        self.evicted = deque()  # (platform, order_key, email_key) of orders past the cap, for the overlay to drop
        self.on_change = None  # called (from the writer) when orders went by age or by another process (purge)
        self.version = None  # PRAGMA data_version when last looked: another connection's commit changes it
        self.pending, self.wake = deque(), threading.Event()
        threading.Thread(target=self.writer, name="webhook-store", daemon=True).start()

    def open(self):
        """Open (or create) the database; a corrupt one is moved aside with one log line, and a new one made."""
        import sqlite3

        for attempt in (1, 2):
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("quick_check failed")
                if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                    # Incremental: pages freed by upkeep() go back to the disk. Set before any table, or
                    # made so by one VACUUM for a store of an earlier version.
                    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                    db.execute("VACUUM")
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # 200 means stored: on disk, through a power cut
                db.execute("PRAGMA secure_delete=ON")  # an order purged or expired leaves no copy in free pages
                db.executescript(self.SCHEMA)
                return db
            except sqlite3.DatabaseError as e:
                if attempt == 2:
                    raise StoreError(
                        f"{shown_name(self.path)}: cannot be used ({e}). Check the disk and STATE_DIR."
                    ) from None
                aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
                for suffix in ("", "-wal", "-shm"):
                    with suppress(OSError):
                        os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
                self.moved_aside = (
                    f"the webhook store {shown_name(self.path)} could not be read ({e}) and was moved "
                    f"aside as {shown_name(aside)}: events received before are lost; the export is served"
                )
                log.error("%s", self.moved_aside)

    def apply(self, event, key, deliveries):
        """Store an event; when this returns it is on disk. The StoreJob's outcome: "applied", "replayed" (one of
        deliveries, its delivery id and its body's hash, was stored before), "stale" (a newer change
        was) or "unknown" (a deletion of an order no event told of).

        Events that arrive together are committed together by one thread: one sync to disk
        for all, and each waiting request takes the interpreter back once, not at every step
        of its own transaction (each costs up to 5 ms while lookups keep the interpreter busy).
        """
        job = StoreJob(event, key, deliveries)
        self.pending.append(job)
        self.wake.set()
        if not job.done.wait(STORE_SECONDS):
            raise StoreError(f"{shown_name(self.path)}: did not store the event within {STORE_SECONDS} s.")
        if job.error:
            raise job.error
        return job

    def writer(self):
        """The one thread that writes: each round, every event waiting, in one transaction; then the upkeep."""
        while True:
            self.wake.wait(UPKEEP_SECONDS)
            self.wake.clear()
            jobs = []
            while self.pending:
                jobs.append(self.pending.popleft())
            try:
                if jobs:
                    self.write_round(jobs)
                if time.monotonic() - self.upkept > UPKEEP_SECONDS:
                    self.upkeep()
            except Exception as e:
                self.note_failure(e)
                for job in jobs:
                    job.error = job.error or StoreError(
                        f"{shown_name(self.path)}: the event could not be stored ({type(e).__name__})."
                    )
            finally:
                for job in jobs:
                    job.done.set()

    def write_round(self, jobs):
        """Write the jobs in one transaction; if that fails, each alone, so one bad event costs no other its place."""
        with self.lock:
            if not self.round(jobs) and len(jobs) > 1:
                for job in jobs:
                    job.error = None
                    self.round([job])

    def note_failure(self, error):
        """Remember a failed write or upkeep for /healthz (see trouble) and log it."""
        self.failing, self.failed_at = (
            (f"webhook events cannot be stored: {shown_name(self.path)}: {type(error).__name__}"),
            time.time(),
        )
        log.error("%s (%s)", self.failing, printable(str(error))[:200])

    def round(self, jobs):
        """Write jobs in one transaction, keeping the cap on orders; False (and each job's error) if it failed."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            added = 0
            for job in jobs:
                job.before = self.key_of(job.event.platform, job.event.platform_id, locked=True)
                job.outcome = self.write(job)
                job.now = self.current(job.event.platform, job.event.platform_id, locked=True)
                added += job.before is None and job.now is not None
            evicted = self.evict(self.count + added - self.max_orders)
            self.db.execute("COMMIT")
        except Exception as e:  # a full disk, a damaged file: the round's events are refused
            with suppress(Exception):
                self.db.execute("ROLLBACK")
            self.note_failure(e)
            for job in jobs:
                job.error = StoreError(f"{shown_name(self.path)}: the event could not be stored ({type(e).__name__}).")
            return False
        self.count += added - len(evicted)
        self.evicted.extend(evicted)
        return True

    def trouble(self, now):
        """Why /healthz should be degraded: a write that failed in the last FAILED_SECONDS, a store moved aside."""
        recent = self.failing if now - self.failed_at < self.FAILED_SECONDS else None
        return [reason for reason in (recent, self.moved_aside) if reason]

    def evict(self, excess):
        """Delete the excess oldest orders, inside the round: the cap holds between exports too."""
        if excess <= 0:
            return []
        oldest = self.db.execute(
            "SELECT rowid, platform, order_key, email_key FROM orders ORDER BY time LIMIT ?", (excess,)
        ).fetchall()
        self.db.executemany("DELETE FROM orders WHERE rowid = ?", [(row[0],) for row in oldest])
        return [row[1:] for row in oldest]

    def write(self, job):
        """One event inside the round's transaction; its outcome."""
        db, event, now = self.db, job.event, time.time()
        for delivery in job.deliveries:
            if db.execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?)", (delivery, now)).rowcount == 0:
                return "replayed"
        if event.deleted:  # dated by the order's newest signed change, which is no later than now
            if db.execute(
                "UPDATE orders SET deleted = 1, received = ? WHERE platform = ? AND platform_id = ?",
                (now, event.platform, event.platform_id),
            ).rowcount:
                return "applied"
            if not self.keeps_unknown:
                return "unknown"
            # The shared database, away now, may hold the order: the deletion waits for it, by the shop's id
            # alone (no key, no time: answers are unchanged until it is forwarded; see SharedStore.forward_spool).
            db.execute(
                "INSERT OR IGNORE INTO orders VALUES (?, ?, '', '', '{}', 0, ?, 1)",
                (event.platform, event.platform_id, now),
            )
            return "spooled"
        # A change as new as the one stored replaces it; a deleted order comes back only with a later one.
        return (
            "applied"
            if db.execute(
                """INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?, 0)
               ON CONFLICT (platform, platform_id) DO UPDATE SET order_key = excluded.order_key,
               email_key = excluded.email_key, fields = excluded.fields, time = excluded.time,
               received = excluded.received, deleted = 0
               WHERE excluded.time > orders.time OR (excluded.time = orders.time AND NOT orders.deleted)""",
                (event.platform, event.platform_id, *job.key, json.dumps(event.fields), event.time, now),
            ).rowcount
            else "stale"
        )

    def current(self, platform, platform_id, locked=False):
        """(order_key, email_key, fields, deleted, time) of a stored order as it stands now, or None."""
        with nullcontext() if locked else self.lock:
            return self.db.execute(
                "SELECT order_key, email_key, fields, deleted, time FROM orders WHERE platform = ? AND platform_id = ?",
                (platform, platform_id),
            ).fetchone()

    def key_of(self, platform, platform_id, locked=False):
        """(order_key, email_key) of a stored order, or None."""
        with nullcontext() if locked else self.lock:
            return self.db.execute(
                "SELECT order_key, email_key FROM orders WHERE platform = ? AND platform_id = ?",
                (platform, platform_id),
            ).fetchone()

    def prune(self, older_than):
        """Forget events an export has caught up with, and orders past the cap; then the upkeep.

        A deletion is caught up with by an export made after it arrived: one that still holds
        the order shows it was not deleted for good (WooCommerce's restore from the trash).
        """
        with self.lock:
            self.db.execute(
                "DELETE FROM orders WHERE (deleted = 0 AND time < ?) OR (deleted = 1 AND received < ?)",
                (older_than, older_than),
            )
            self.db.execute(
                "DELETE FROM orders WHERE rowid IN (SELECT rowid FROM orders ORDER BY time DESC LIMIT -1 OFFSET ?)",
                (self.max_orders,),
            )
            self.count = self.db.execute("SELECT count(*) FROM orders").fetchone()[0]
        self.upkeep()

    def upkeep(self):
        """Bound what is kept between exports: orders past WEBHOOK_DAYS and delivery ids past their age or number go,
        and the file shrinks. Orders gone by age, or by another process (`purge`), leave the overlay (on_change)."""
        with self.lock:
            expired = self.db.execute(
                "SELECT rowid, platform, order_key, email_key FROM orders WHERE received < ?",
                (time.time() - self.days * 86400,),
            ).fetchall()
            self.db.executemany("DELETE FROM orders WHERE rowid = ?", [(row[0],) for row in expired])
            self.count -= len(expired)
            self.db.execute("DELETE FROM deliveries WHERE received < ?", (time.time() - DELIVERY_DAYS * 86400,))
            self.db.execute(
                "DELETE FROM deliveries WHERE rowid IN (SELECT rowid FROM deliveries "
                "ORDER BY received DESC LIMIT -1 OFFSET ?)",
                (MAX_DELIVERIES,),
            )
            self.db.executescript("PRAGMA incremental_vacuum;")  # run to its end: each step frees one page
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            version = self.db.execute("PRAGMA data_version").fetchone()[0]
        elsewhere, self.version = self.version is not None and version != self.version, version
        self.upkept = time.monotonic()
        if (expired or elsewhere) and self.on_change:
            self.on_change()

    @staticmethod
    def read(path, since):
        """rows(since) of a store read only, as `lookup` does beside the running service: nothing changes."""
        import sqlite3

        try:
            with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                return db.execute(f"SELECT {WebhookStore.ROW} FROM orders WHERE time >= ?", (since,)).fetchall()
        except sqlite3.Error as e:
            log.warning("%s: cannot be read (%s); answering from the export alone", shown_name(path), e)
            return []

    def rows(self, since=0):
        """Every stored order that changed since then, as WebhookStore.ROW names its fields."""
        with self.lock:
            return self.db.execute(f"SELECT {self.ROW} FROM orders WHERE time >= ?", (since,)).fetchall()

    def last_received(self):
        """{platform: when its newest stored event arrived}: the status page's "last event" after a restart."""
        with self.lock:
            return dict(self.db.execute("SELECT platform, MAX(received) FROM orders GROUP BY platform").fetchall())

    def close(self):
        """Close the database (its WAL is checkpointed into the file)."""
        with self.lock, suppress(Exception):
            self.db.close()


STORE_SECONDS = 10  # the longest a delivery waits for the store; the shops wait 5 s (Shopify) to 60 s
UPKEEP_SECONDS = 60  # how often the writer bounds the deliveries remembered and gives the file's room back
DELIVERY_DAYS = 3  # Shopify retries a failed delivery for 48 hours; a replay older than this is stale anyway
MAX_DELIVERIES = 200_000  # delivery ids remembered at most (two a delivery: its id and its body's hash)


class StoreJob:
    """An event waiting to be written, and what came of it."""

    def __init__(self, event, key, deliveries):
        self.event, self.key, self.deliveries = event, key, deliveries
        self.outcome, self.error, self.done = None, None, threading.Event()
        self.before = self.now = None  # the order's key before, and its row after (see Webhooks.store)


class Overlay:
    """The orders webhook events tell, newer than the served export: they answer before it.

    index maps the same keys as a Snapshot's to packed orders (GONE for a deleted one),
    packed and worded by a plan of their own (EVENT_HEADER), from the same contexts.toml.
    """

    def __init__(self, snapshot):
        self.plan = make_plan(snapshot.config, EVENT_HEADER, "webhooks", layout=EVENT_LAYOUT)
        self.packer, self.renderer = Packer(self.plan, plain=False), Renderer(snapshot.config, self.plan)
        self.renderer.records_text = snapshot.renderer.records_text
        self.renderer.export_day = datetime.now(snapshot.config.timezone).date()  # events tell of now
        self.normalise = snapshot.normalise
        self.index = {}  # key -> packed order; changed one key at a time, or replaced whole
        self.times = {}  # key -> when its order last changed
        self.platforms = Counter()  # platform -> orders answered from events

    def fill(self, rows):
        """Build the index from the store's rows; returns self."""
        index, times, platforms = {}, {}, Counter()
        for platform, order_key, email_key, fields, deleted, _, moment in rows:
            if not order_key:  # a deletion waiting in the spool for the shared database: it names no key
                continue
            entry = index_key(order_key, email_key)
            index[entry], times[entry] = GONE if deleted else self.pack(json.loads(fields)), moment
            platforms[platform] += 1
        self.index, self.times, self.platforms = index, times, platforms
        return self

    def put(self, platform, key, fields, moment, before=None):
        """One event's order (None: deleted) into the index: one assignment, which a lookup sees whole or not.

        moment: when the order changed; an older change, put later by a slower thread, is not
        put over a newer one. before: the order's key until now, when its number or email
        changed: that one goes.
        """
        entry = index_key(*key)
        if moment < self.times.get(entry, 0):
            return
        if before and tuple(before) != tuple(key) and self.index.pop(index_key(*before), None) is not None:
            self.platforms[platform] -= 1
        if entry not in self.index:
            self.platforms[platform] += 1
        self.times[entry] = moment
        self.index[entry] = GONE if fields is None else self.pack(fields)

    def drop(self, platform, key):
        """An order the store let go past its cap (WEBHOOK_MAX_ORDERS): the export answers for it again."""
        entry = index_key(*key)
        if self.index.pop(entry, None) is not None:
            self.platforms[platform] -= 1
        self.times.pop(entry, None)

    def pack(self, fields):
        """An event's fields as one packed order, like an export's."""
        items, tracking = fields.get("items") or [["", "", ""]], fields.get("tracking") or []
        head = [str(fields.get(name, "")) for name in EVENT_ORDER_FIELDS]
        rows = []
        for position in range(max(len(items), len(tracking), 1)):
            quantity, name, status = (items[position] + ["", "", ""])[:3] if position < len(items) else ("", "", "")
            number = tracking[position][0] if position < len(tracking) else ""
            rows.append([*(head if position == 0 else [""] * len(head)), name, quantity, status, number])
        return self.packer.pack(rows)[1]

    def render(self, packed, typed=""):
        """(template name, JSON body) of an event's order."""
        return self.renderer.render(*self.packer.unpack(packed))


###############################################################################
# Webhook events: the shared database, its schema and connections #############
###############################################################################
#
# DATABASE_URL: one PostgreSQL database per shop (SHOP_DOMAIN), its schema migrated by
# whichever instance starts first, connections that give up on a database that stops
# answering, and what the commands (`lookup`, `purge`) do in it. Uses the errors, the
# settings and the store above.

SHARED_SCHEMA = (  # version -> the statements that bring a database from the version before to it
    (
        1,
        """
        CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE orders (
            platform text NOT NULL, platform_id text NOT NULL, order_key text NOT NULL, email_key text NOT NULL,
            fields text NOT NULL, time double precision NOT NULL, received double precision NOT NULL,
            deleted boolean NOT NULL, PRIMARY KEY (platform, platform_id));
        CREATE INDEX orders_by_time ON orders (time);
        CREATE INDEX orders_by_email ON orders (email_key);
        CREATE TABLE deliveries (delivery text PRIMARY KEY, received double precision NOT NULL);
        CREATE INDEX deliveries_by_time ON deliveries (received);
        -- Every change, in the order it was committed: what other instances follow (LISTEN orders_changed).
        CREATE TABLE changes (
            seq bigserial PRIMARY KEY, kind text NOT NULL, platform text NOT NULL, order_key text NOT NULL,
            email_key text NOT NULL, fields text, time double precision NOT NULL, received double precision NOT NULL,
            before_order_key text, before_email_key text);
        CREATE TABLE exports (
            seq bigserial PRIMARY KEY, sha256 text NOT NULL, name text NOT NULL, size bigint NOT NULL,
            made_at double precision NOT NULL, stored_at double precision NOT NULL);
        CREATE TABLE export_chunks (export bigint NOT NULL REFERENCES exports ON DELETE CASCADE, n integer NOT NULL,
            data bytea NOT NULL, PRIMARY KEY (export, n));
        CREATE TABLE instances (id text PRIMARY KEY, covers double precision NOT NULL, seen double precision NOT NULL);
        """,
    ),
)
CHANGES_DAYS = 2  # changes kept for instances to follow; one away longer reads the store afresh
EXPORT_CHUNK = 8 << 20  # bytes of an upload a row holds: an export of 150 MB is 19 rows, streamed both ways
FOLLOW_SECONDS = 5  # a follower's longest wait for a notification before it reads changes anyway


WRITE_LOCK = 0x6F72646572  # pg_advisory_xact_lock key: writes commit one at a time, so followers read them in order
FOLLOW_RETRY_SECONDS = 2  # a follower's wait before it connects again
SHARED_WAIT_SECONDS = 3  # the longest a delivery waits for the shared database before the spool takes it
RECONNECT_SECONDS = 30  # the writer's: deliveries go to the spool meanwhile, and the follower reconnects it sooner


def log_change(db, kind, platform, row, now, before=None):
    """One change for the other instances to follow, in commit order; NOTIFY wakes them.

    kind: "put" (the order as it stands), "gone" (deleted in the shop: not found) or "drop"
    (let go by the store: the export answers for it again).
    """
    order_key, email_key, fields, _, moment = row
    moved = tuple(before) if before and tuple(before) != (order_key, email_key) else (None, None)
    db.execute(
        "INSERT INTO changes (kind, platform, order_key, email_key, fields, time, received, "
        "before_order_key, before_email_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (kind, platform, order_key, email_key, fields if kind == "put" else None, moment, now, *moved),
    )
    db.execute("SELECT pg_notify('orders_changed', '')")


def purge_shared(db, email_key):
    """Delete every stored event of an address, the followers told to drop them; how many went."""
    now = time.time()
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        gone = db.execute(
            "DELETE FROM orders WHERE email_key = %s RETURNING platform, order_key, email_key, fields, deleted, time",
            (email_key,),
        ).fetchall()
        # The change log's rows of the address go too; only the notices that every instance drop its orders
        # stay, until CHANGES_DAYS have passed (an instance away longer reads the whole store afresh).
        db.execute("DELETE FROM changes WHERE email_key = %s OR before_email_key = %s", (email_key, email_key))
        for platform, *row in gone:
            log_change(db, "drop", platform, row, now)
    return len(gone)


def pg_connect(url, password, name):
    """A new connection to DATABASE_URL (autocommit: each transaction is explicit), named for pg_stat_activity."""
    import psycopg

    given = {"password": password} if password else {}  # else ~/.pgpass or PGPASSFILE, as libpq reads them
    # A database that stops answering (a network cut, not a refusal) is given up on within seconds, so that a
    # delivery waiting on it is spooled before its STORE_SECONDS run out, rather than hanging on TCP.
    return psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=3,
        application_name=name,
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=2,
        tcp_user_timeout=5000,
        options="-c statement_timeout=3000 -c lock_timeout=2000 -c idle_in_transaction_session_timeout=10000",
        **given,
    )


def database_shops(db):
    """The shops (SHOP_DOMAIN) a shared database belongs to; empty for a new one."""
    found = db.execute("SELECT value FROM meta WHERE key = 'shop'").fetchone()
    return set(json.loads(found[0])) if found else set()


def other_shop_message(url, owner, domains):
    """Why an instance, or a command, of one shop must not use another shop's database."""
    return (
        f"DATABASE_URL ({shown_database(url)}) holds the events of another shop ({', '.join(sorted(owner))}), "
        f"not of SHOP_DOMAIN {', '.join(sorted(domains))}. Give each shop a database of its own."
    )


def shop_database(settings, purpose):
    """A connection to DATABASE_URL for a command (`lookup`, `purge`), once it is known to be this shop's."""
    db = pg_connect(settings.database_url, settings.database_password, f"order-lookup {purpose}")
    try:
        migrate(db)
        owner = database_shops(db)
    except BaseException:
        db.close()
        raise
    if owner and not owner & settings.shop_domains:
        db.close()
        raise SettingsError(other_shop_message(settings.database_url, owner, settings.shop_domains))
    return db


def shared_rows(settings, since):
    """rows(since) of the shared database, only read, as `lookup` does beside the running service."""
    import psycopg

    try:
        with shop_database(settings, "lookup") as db:
            return db.execute(f"SELECT {WebhookStore.ROW} FROM orders WHERE time >= %s", (since,)).fetchall()
    except psycopg.Error as e:
        log.warning(
            "%s: cannot be read (%s); answering from the export alone",
            shown_database(settings.database_url),
            database_error(e),
        )
        return []


def unusable_errors():
    """psycopg's errors that mean "not now" (the spool takes the events), never a bug: unreachable, a timeout
    (statement_timeout, lock_timeout), a read-only standby after a failover, missing rights."""
    import psycopg

    return (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege)


def database_error(error):
    """A database error as a log line or a message shows it: its first line, the role name taken out."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return printable(re.sub(r'(?i)\b(user|role) "[^"]*"', r'\1 "…"', text))[:200]


def migrate(db):
    """Bring the database's schema up to SHARED_SCHEMA's last version, once, whichever instance starts first."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))  # two instances starting at once: one migrates
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        version = row[0] or 0
        for number, statements in SHARED_SCHEMA:
            if number > version:
                db.execute(statements)
                db.execute("INSERT INTO schema_version VALUES (%s)", (number,))
    if version > SHARED_SCHEMA[-1][0]:
        raise StoreError(
            f"the shared database's schema is version {version}, newer than this service knows "
            f"({SHARED_SCHEMA[-1][0]}): update the service on this machine too."
        )


def shown_database(url):
    """A DATABASE_URL as logs and pages show it: host, port and database, never a user or a password."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2] or "localhost"  # host:port, or several (failover), never the user
    return f"postgresql://{printable(hosts)}{printable(parts.path)}"


###############################################################################
# Webhook events: shared by replicas in PostgreSQL ############################
###############################################################################
#
# DATABASE_URL set: every instance of a shop keeps its webhook events, its accepted uploads
# and the shrink floor in one PostgreSQL database, and follows what the others write there
# (LISTEN/NOTIFY, and a read by sequence after any gap). Each instance still answers from
# memory; while the database cannot be reached, events wait in a spool (a WebhookStore in
# STATE_DIR). Uses the events, the store, the overlay and the shared database above.


class SharedStore:
    """Webhook events, uploads and the shrink floor in PostgreSQL (DATABASE_URL), shared by a shop's instances.

    The same contract as WebhookStore (apply, rows, prune, upkeep, trouble, evicted, on_change),
    and: follow(), a thread per instance that LISTENs and reads every change after the last it
    saw (after a restart or a reconnect too), so that each instance's in-memory view holds
    every event whichever instance received it; while the database cannot be reached, events
    go to a spool in STATE_DIR (a WebhookStore) and are forwarded in order when it can.
    """

    ROW = "platform, order_key, email_key, fields, deleted, received, time"  # as WebhookStore.rows gives them

    def __init__(self, url, password, identity, spool, max_orders=100_000, days=30.0, instance=""):
        self.url, self.password, self.identity = url, password, identity
        self.spool, self.max_orders, self.days = spool, max_orders, days
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.lock = threading.Lock()  # the writer's connection, one user at a time
        self.db = None  # made on first use, and again after the database was lost
        self.lost_since, self.lost_why = None, ""  # when and why the database could not be reached
        self.refused = None  # why this database is not this shop's: nothing is written to it
        self.moved_aside = self.failing = None  # WebhookStore's, for /healthz: a store moved aside, a failed write
        self.failed_at = 0.0
        self.count = 0
        self.evicted = deque()
        self.on_change = None  # set by the service: rebuild the overlay (after a gap in the changes followed)
        self.seen = 0  # the last change this instance's overlay holds
        self.export_seen = 0  # the last upload this instance has loaded or stored
        self.upkept = time.monotonic()
        self.tried = 0.0  # when a connection was last tried (monotonic)
        self.pending, self.wake = deque(), threading.Event()
        threading.Thread(target=self.writer, name="shared-store", daemon=True).start()
        self.using(lambda db: True)  # at start: another shop's database refuses here; an unreachable one waits

    # Connections

    def connect(self, now=False):
        """The writer's connection, made (and the schema brought up to date, the shop checked) when there is none.

        After a failed attempt the next waits RECONNECT_SECONDS (now: the follower reached the
        database), so that a database that answers no more costs each delivery no connect timeout.
        """
        import psycopg

        if self.db is not None and not self.db.closed:
            return self.db
        if not now and self.lost_since is not None and time.monotonic() - self.tried < RECONNECT_SECONDS:
            return None
        try:
            db = self.open_connection("order-lookup")
        except psycopg.Error as e:
            self.tried = time.monotonic()  # after the attempt, which may have waited its whole timeout
            self.lose(e)
            return None
        try:
            migrate(db)
            self.check_shop(db)
        except (StoreError, SettingsError):
            db.close()
            raise
        self.db = db
        if self.lost_since is not None:
            log.info("the shared database %s can be reached again", shown_database(self.url))
        self.lost_since, self.lost_why = None, ""
        self.count = db.execute("SELECT count(*) FROM orders").fetchone()[0]
        self.forward_spool()
        return db

    def open_connection(self, name):
        """A new connection to the shared database (see pg_connect)."""
        return pg_connect(self.url, self.password, name)

    def check_shop(self, db):
        """This database belongs to this shop (SHOP_DOMAIN): the first instance names it; another shop's instance
        is refused (SettingsError: it does not start). A domain added later joins the ones recorded."""
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            owner = database_shops(db)
            if owner and not owner & self.identity:
                self.refused = other_shop_message(self.url, owner, self.identity)
                raise SettingsError(self.refused)
            db.execute(
                "INSERT INTO meta VALUES ('shop', %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (json.dumps(sorted(owner | self.identity)),),
            )

    def lose(self, error):
        """The database cannot be reached: say so once, answer from memory and the spool meanwhile."""
        if self.lost_since is None:
            self.lost_since = time.time()
            log.error(
                "the shared database %s cannot be used (%s): events are kept in %s until it can",
                shown_database(self.url),
                database_error(error),
                shown_name(self.spool.path),
            )
        self.lost_why = type(error).__name__
        if self.db is not None:
            with suppress(Exception):
                self.db.close()
        self.db = None

    def using(self, work, now=False):
        """work(connection) under the writer's lock; None when the database cannot be used now (lost, not raised):
        unreachable, too slow (a timeout), read-only (a standby after a failover) or without the rights."""
        unusable = unusable_errors()
        with self.lock:
            try:
                db = self.connect(now)
                return None if db is None else work(db)
            except unusable as e:
                self.lose(e)
                return None

    # Events

    def apply(self, event, key, deliveries):
        """Store an event; when this returns it is durable: committed in the database, or in the spool.

        Events that arrive together are committed together by one thread (see writer): one
        sync to disk for all, as WebhookStore does.
        """
        job = StoreJob(event, key, deliveries)
        if self.refused is None:
            self.pending.append(job)
            self.wake.set()
            # A slow database must not make the shop wait past its own deadline (Shopify's is 5 s): the spool
            # takes the event instead. Should the database commit it too, the second copy is a replay.
            if job.done.wait(SHARED_WAIT_SECONDS) and job.error is None and job.outcome is not None:
                return job
        return self.spool.apply(event, key, deliveries)  # the spool's own answer: durable on this disk

    def writer(self):
        """The one thread that writes events: each round, every event waiting, in one transaction."""
        import psycopg

        while True:
            self.wake.wait()
            self.wake.clear()
            jobs = []
            while self.pending:
                jobs.append(self.pending.popleft())
            try:
                if jobs and self.using(lambda db, jobs=jobs: self.write_round(db, jobs)) is None:
                    for job in jobs:  # not committed (the database is away): the spool takes them
                        job.outcome = None
            except psycopg.Error as e:  # one event the database refuses: each alone, so no other loses its place
                self.note_failure(e)
                for job in jobs:
                    job.outcome = None
                    try:
                        self.using(lambda db, job=job: self.write_round(db, [job]))
                    except Exception:  # this event alone: the spool takes it (see apply)
                        job.outcome = None
            except Exception as e:  # this thread must outlive anything one round sets off
                self.note_failure(e)
                for job in jobs:
                    job.outcome = None  # the spool takes them
            finally:
                for job in jobs:
                    job.done.set()

    def write_round(self, db, jobs):
        """Jobs in one transaction, committed in the order of their changes' seq; True."""
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))  # changes commit in the order of their seq
            for job in jobs:
                self.write(db, job)
        return True

    def write(self, db, job):
        """One event, inside the round's transaction: applied once, never over a newer change; followers told."""
        event, now = job.event, time.time()
        for delivery in job.deliveries:
            if (
                db.execute("INSERT INTO deliveries VALUES (%s, %s) ON CONFLICT DO NOTHING", (delivery, now)).rowcount
                == 0
            ):
                job.outcome = "replayed"
                return job
        job.before = db.execute(
            "SELECT order_key, email_key FROM orders WHERE platform = %s AND platform_id = %s FOR UPDATE",
            (event.platform, event.platform_id),
        ).fetchone()
        if event.deleted:
            row = db.execute(
                "UPDATE orders SET deleted = true, received = %s WHERE platform = %s AND platform_id = %s "
                "RETURNING order_key, email_key, fields, deleted, time",
                (now, event.platform, event.platform_id),
            ).fetchone()
            job.outcome = "applied" if row else "unknown"
        else:
            row = db.execute(
                """INSERT INTO orders VALUES (%s, %s, %s, %s, %s, %s, %s, false)
                   ON CONFLICT (platform, platform_id) DO UPDATE SET order_key = excluded.order_key,
                   email_key = excluded.email_key, fields = excluded.fields, time = excluded.time,
                   received = excluded.received, deleted = false
                   WHERE excluded.time > orders.time OR (excluded.time = orders.time AND NOT orders.deleted)
                   RETURNING order_key, email_key, fields, deleted, time""",
                (event.platform, event.platform_id, *job.key, json.dumps(event.fields), event.time, now),
            ).fetchone()
            job.outcome = "applied" if row else "stale"
        job.now = row
        if row:
            log_change(db, "gone" if row[3] else "put", event.platform, row, now, job.before)
            if job.before is None:
                self.count += 1
                self.evict(db, self.count - self.max_orders)
        return job

    def evict(self, db, excess):
        """Delete the excess oldest orders (WEBHOOK_MAX_ORDERS), telling the followers to drop them."""
        if excess <= 0:
            return
        gone = db.execute(
            "DELETE FROM orders WHERE (platform, platform_id) IN (SELECT platform, platform_id FROM "
            "orders ORDER BY time LIMIT %s) RETURNING platform, order_key, email_key, fields, deleted, "
            "time",
            (excess,),
        ).fetchall()
        for platform, *row in gone:
            log_change(db, "drop", platform, row, time.time())
            self.evicted.append((platform, row[0], row[1]))
        self.count -= len(gone)

    def rows(self, since=0):
        """Every stored order that changed since then (see WebhookStore.rows), the spool's after the database's.

        The changes followed from here on start after the last one these rows hold. StoreError
        when the database cannot be reached: the service then keeps the view it has.
        """

        def read(db):
            with db.transaction():
                db.execute("SET LOCAL statement_timeout = 60000")  # the whole table, read once
                self.seen = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
                return db.execute(f"SELECT {self.ROW} FROM orders WHERE time >= %s", (since,)).fetchall()

        rows = self.using(read) if self.refused is None else None
        if rows is None:  # the database is away: the spool's events now, the whole view once it is back (follow)
            self.seen = None
            return self.spool.rows(since)
        return [*rows, *self.spool.rows(since)]

    def forward_spool(self):
        """Events kept while the database could not be reached, into it, in the order they came; then let go."""
        import sqlite3

        with self.spool.lock:
            waiting = self.spool.db.execute(
                "SELECT rowid, platform, platform_id, order_key, email_key, fields, time, "
                "received, deleted FROM orders ORDER BY received"
            ).fetchall()
            seen = self.spool.db.execute("SELECT delivery, received FROM deliveries").fetchall()
        if seen:  # the deliveries the spool took: a retry of one sent to another instance is a replay there too
            with self.db.transaction(), self.db.cursor() as cursor:
                cursor.executemany("INSERT INTO deliveries VALUES (%s, %s) ON CONFLICT DO NOTHING", seen)
            with self.spool.lock, suppress(sqlite3.Error):
                self.spool.db.execute("DELETE FROM deliveries WHERE received <= ?", (max(r for _, r in seen),))
        if not waiting:
            return
        for rowid, platform, platform_id, order_key, email_key, fields, moment, _, deleted in waiting:
            event = Event(platform, platform_id, json.loads(fields), moment, deleted=bool(deleted))
            self.write_round(self.db, [StoreJob(event, (order_key, email_key), ())])
            with self.spool.lock, suppress(sqlite3.Error):
                self.spool.db.execute("DELETE FROM orders WHERE rowid = ?", (rowid,))
        self.spool.count = 0
        log.info("%d events kept while the shared database could not be reached are in it now", len(waiting))

    def prune(self, older_than):
        """Forget what every instance's export has caught up with: this instance's export says older_than; the
        others' say theirs (table instances), and the oldest of those seen in the last day counts."""

        def work(db):
            now = time.time()
            with db.transaction():
                db.execute("SET LOCAL statement_timeout = 60000")  # a whole table read or trimmed at once
                db.execute(
                    "INSERT INTO instances VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                    "covers = excluded.covers, seen = excluded.seen",
                    (self.instance, older_than, now),
                )
                floor = db.execute("SELECT min(covers) FROM instances WHERE seen > %s", (now - 86400,)).fetchone()[0]
                db.execute(
                    "DELETE FROM orders WHERE (NOT deleted AND time < %s) OR (deleted AND received < %s)",
                    (floor, floor),
                )
                self.count = db.execute("SELECT count(*) FROM orders").fetchone()[0]
            return True

        if self.refused is None:
            self.using(work)
        self.spool.prune(older_than)
        self.upkeep()

    def upkeep(self):
        """What WebhookStore.upkeep bounds, in the database: orders past WEBHOOK_DAYS (followers drop them),
        delivery ids past their age or number, changes past CHANGES_DAYS; this instance is still alive."""

        def work(db):
            now = time.time()
            with db.transaction():
                db.execute("SET LOCAL statement_timeout = 60000")  # a whole table read or trimmed at once
                db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                expired = db.execute(
                    "DELETE FROM orders WHERE received < %s RETURNING platform, order_key, "
                    "email_key, fields, deleted, time",
                    (now - self.days * 86400,),
                ).fetchall()
                for platform, *row in expired:
                    log_change(db, "drop", platform, row, now)
                db.execute("DELETE FROM deliveries WHERE received < %s", (now - DELIVERY_DAYS * 86400,))
                db.execute(
                    "DELETE FROM deliveries WHERE delivery IN (SELECT delivery FROM deliveries ORDER BY "
                    "received DESC OFFSET %s)",
                    (MAX_DELIVERIES,),
                )
                db.execute("DELETE FROM changes WHERE received < %s", (now - CHANGES_DAYS * 86400,))
                db.execute("UPDATE instances SET seen = %s WHERE id = %s", (now, self.instance))
                # Every instance's orders, not only this one's: the cap (WEBHOOK_MAX_ORDERS) is the database's.
                self.count = db.execute("SELECT count(*) FROM orders").fetchone()[0]
            return True

        if self.refused is None:
            self.using(work)
        self.upkept = time.monotonic()

    def note_failure(self, error):
        """A read or write that failed for another reason than a lost connection: for /healthz, and logged."""
        self.failing, self.failed_at = f"the shared database failed: {type(error).__name__}", time.time()
        log.error("%s (%s)", self.failing, printable(str(error))[:200])

    def trouble(self, now):
        """Why /healthz should be degraded: the database lost (events spooled), another shop's, a failed write."""
        reasons = [self.failing] if self.failing and now - self.failed_at < WebhookStore.FAILED_SECONDS else []
        if self.refused:
            reasons.append(self.refused)
        elif self.lost_since is not None:
            reasons.append(
                f"the shared database {shown_database(self.url)} cannot be reached since "
                f"{iso_time(self.lost_since)} ({self.lost_why}): answers come from the export and the "
                f"events held; new events are kept in {shown_name(self.spool.path)} "
                f"({self.spool.count} so far) and go to the database when it returns"
            )
        return reasons + self.spool.trouble(now)

    def last_received(self):
        """{platform: when its newest stored event arrived}, from the database (else the spool)."""
        found = (
            self.using(
                lambda db: dict(db.execute("SELECT platform, max(received) FROM orders GROUP BY platform").fetchall())
            )
            if self.refused is None
            else None
        )
        return found or self.spool.last_received()

    def purge(self, email_key):
        """Delete every stored event of an address (see purge_shared); how many went, None if not reachable."""
        return self.using(lambda db: purge_shared(db, email_key))

    def close(self):
        """Close the connections and the spool."""
        with self.lock, suppress(Exception):
            if self.db is not None:
                self.db.close()
        self.spool.close()

    # Following the other instances

    def follow(self, changed, exported, stopping):
        """Until stopping is set: LISTEN, then read every change (and upload) after the last seen; again after
        each notification, and every FOLLOW_SECONDS anyway. A lost connection is made again, and the reading
        starts where it stopped: a notification missed meanwhile costs nothing.

        changed(rows of changes), or changed(None) when the changes needed are gone (away longer than
        CHANGES_DAYS): the view is then read afresh. exported(fetch, sha256, made_at, name, stored_at): a newer upload.
        """
        import psycopg

        while not stopping.is_set():
            try:
                with self.open_connection("order-lookup follower") as conn:
                    conn.execute("LISTEN orders_changed")
                    conn.execute("LISTEN exports_changed")
                    self.using(lambda db: True, now=True)  # the writer's connection too: the spool goes in first
                    while not stopping.is_set():
                        self.read_changes(conn, changed)
                        self.read_exports(conn, exported)
                        if time.monotonic() - self.upkept > UPKEEP_SECONDS:
                            self.upkeep()
                        if self.lost_since is not None:  # the follower reads, so the writer may write again
                            self.using(lambda db: True, now=True)
                        for _ in conn.notifies(timeout=FOLLOW_SECONDS, stop_after=1):
                            pass
            except psycopg.Error as e:
                if self.lost_since is None:
                    with self.lock:
                        self.lose(e)
                stopping.wait(FOLLOW_RETRY_SECONDS)

    def read_changes(self, conn, changed):
        """The changes after the last seen, in order, to changed(); changed(None) after a gap."""
        while True:
            if self.seen is None:  # the view was read while the database was away: read it whole now
                changed(None)  # (rows() moves seen on)
                if self.seen is None:
                    return
            with conn.transaction():
                first = conn.execute("SELECT min(seq) FROM changes").fetchone()[0]
                gap = bool(self.seen and first is not None and first > self.seen + 1)
                rows = (
                    ()
                    if gap
                    else conn.execute(
                        "SELECT seq, kind, platform, order_key, email_key, fields, time, before_order_key, "
                        "before_email_key FROM changes WHERE seq > %s ORDER BY seq LIMIT 5000",
                        (self.seen,),
                    ).fetchall()
                )
            if gap:  # the changes since this instance last looked are gone (CHANGES_DAYS): the view read afresh
                self.seen = None
                continue
            if not rows:
                return
            changed(rows)
            self.seen = rows[-1][0]

    def read_exports(self, conn, exported):
        """A newer upload than the last this instance loaded or stored, to exported()."""
        row = conn.execute(
            "SELECT seq, sha256, made_at, name, stored_at FROM exports ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row and row[0] > self.export_seen:
            if exported(lambda path: self.fetch_export(conn, row[0], path), *row[1:]) is not False:
                self.export_seen = row[0]  # loaded, refused or not needed; False: read whole, try again

    # Uploads

    def store_export(self, path, sha256, made_at, name):
        """An accepted upload, for the other instances to load; the one before it goes. False if not stored.

        On a connection of its own, without the writers' lock: events go on being stored
        while a large upload is copied in.
        """
        import psycopg

        if self.refused is not None:
            return False
        try:
            with self.open_connection("order-lookup upload") as db, db.transaction():
                db.execute("SET LOCAL statement_timeout = 0")  # a large upload: as long as its chunks take
                seq = db.execute(
                    "INSERT INTO exports (sha256, name, size, made_at, stored_at) VALUES "
                    "(%s, %s, %s, %s, %s) RETURNING seq",
                    (sha256, name, path.stat().st_size, made_at, time.time()),
                ).fetchone()[0]
                with open(path, "rb") as f:
                    for n, chunk in enumerate(iter(lambda: f.read(EXPORT_CHUNK), b"")):
                        db.execute("INSERT INTO export_chunks VALUES (%s, %s, %s)", (seq, n, chunk))
                db.execute("DELETE FROM exports WHERE seq < %s", (seq,))
                db.execute("SELECT pg_notify('exports_changed', '')")
        except psycopg.Error as e:
            log.warning("the upload could not be stored in %s (%s)", shown_database(self.url), type(e).__name__)
            return False
        self.export_seen = max(self.export_seen, seq)
        return True

    @staticmethod
    def fetch_export(conn, seq, path):
        """Write a stored upload to path, one chunk in memory at a time."""
        with open(path, "wb") as out, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # a newer upload cannot cut this one
            conn.execute("SET LOCAL statement_timeout = 0")  # chunk by chunk, as long as a large upload takes
            n = 0
            while found := conn.execute(
                "SELECT data FROM export_chunks WHERE export = %s AND n = %s", (seq, n)
            ).fetchone():
                out.write(found[0])
                n += 1

    # The shrink floor, the same on every instance

    def history(self):
        """The last exports accepted by any instance (see refuse_below_floor), or None when not reachable."""
        found = self.using(lambda db: db.execute("SELECT value FROM meta WHERE key = 'history'").fetchone())
        if found is None:
            return None
        with suppress(ValueError, TypeError):
            return deque((tuple(map(int, entry)) for entry in json.loads(found[0])), maxlen=ACCEPTED_HISTORY)
        return deque(maxlen=ACCEPTED_HISTORY)

    def remember(self, history):
        """Store the history of accepted exports for every instance."""
        self.using(
            lambda db: db.execute(
                "INSERT INTO meta VALUES ('history', %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (json.dumps(list(history)),),
            )
        )


###############################################################################
# Webhook events: receiving deliveries ########################################
###############################################################################
#
# POST /webhooks/<platform>: a delivery checked (signature, topic, body, shop), stored, and
# answered from at once; counted per platform for /healthz and /metrics. Uses the stores
# above.

WEBHOOK_MAX_BYTES = 2 << 20  # Shopify's largest orders are a few hundred KB
WEBHOOK_HEADERS = {  # platform -> (signature, topic, delivery id, the shop it comes from), as WSGI names them
    "shopify": (
        "HTTP_X_SHOPIFY_HMAC_SHA256",
        "HTTP_X_SHOPIFY_TOPIC",
        "HTTP_X_SHOPIFY_WEBHOOK_ID",
        "HTTP_X_SHOPIFY_SHOP_DOMAIN",
    ),
    "woocommerce": (
        "HTTP_X_WC_WEBHOOK_SIGNATURE",
        "HTTP_X_WC_WEBHOOK_TOPIC",
        "HTTP_X_WC_WEBHOOK_DELIVERY_ID",
        "HTTP_X_WC_WEBHOOK_SOURCE",
    ),
}
DELETE_TOPICS = {"orders/delete", "order.deleted"}
# A deletion's body is the order's id alone; an order's body has these besides (the platforms' own fields).
DELETE_KEYS = {"id", "admin_graphql_api_id"}
ORDER_KEYS = {
    "shopify": {"name", "order_number", "line_items", "email"},
    "woocommerce": {"number", "line_items", "billing", "status"},
}
MAX_DELIVERY_ID = 200  # Shopify's are UUIDs, WooCommerce's numbers: a longer one is no platform's
WEBHOOK_TOPICS = {  # the topics that change an order; any other is answered 200 and ignored
    "shopify": {
        "orders/create": shopify_event,
        "orders/updated": shopify_event,
        "orders/paid": shopify_event,
        "orders/fulfilled": shopify_event,
        "orders/partially_fulfilled": shopify_event,
        "orders/cancelled": shopify_event,
        "orders/delete": shopify_event,
    },
    "woocommerce": {
        "order.created": woocommerce_event,
        "order.updated": woocommerce_event,
        "order.restored": woocommerce_event,
        "order.deleted": woocommerce_event,
    },
}
PING = re.compile(rb"webhook_id=\d+")  # WooCommerce's unsigned ping when a webhook is saved


class Webhooks:
    """Receives the shops' signed order events: checked, mapped, stored, then answered from.

    Counts per platform (received, applied, rejected, the last event's time) are for
    /healthz and the status page; they start at zero with the process.
    """

    def __init__(self, service):
        self.service = service
        self.counts = {platform: Counter() for platform in service.settings.webhook_secrets}
        self.outcomes = {platform: Counter() for platform in service.settings.webhook_secrets}  # for /metrics
        self.last = {}  # platform -> time of the last applied event

    def told(self, platform, outcome, status, body):
        """Count a delivery's outcome (for /metrics) and give its answer back."""
        self.outcomes[platform][outcome] += 1
        return status, body

    def receive(self, platform, environ, body):
        """(HTTP status, JSON body or b"") for one delivery."""
        signature_header, topic_header, delivery_header, shop_header = WEBHOOK_HEADERS[platform]
        signature = environ.get(signature_header, "")
        counts = self.counts[platform]
        if platform == "woocommerce" and not signature and PING.fullmatch(body.strip()):
            return self.told(platform, "ping", 200, json.dumps({"ping": "ok"}).encode())  # nothing to store
        counts["received"] += 1
        if not signed(self.service.settings.webhook_secrets[platform], body, signature):
            counts["rejected"] += 1
            return self.told(platform, "unauthorized", 401, b"")
        topic, delivery = environ.get(topic_header, "").strip(), environ.get(delivery_header, "").strip()
        make = WEBHOOK_TOPICS[platform].get(topic)
        if make is None:
            return self.told(platform, "ignored", 200, json.dumps({"ignored": printable(topic)[:60]}).encode())
        try:
            order = json.loads(body)
            refusal = self.refusal(platform, topic, order, delivery, environ.get(shop_header, ""))
            event = None if refusal else make(order, topic)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            refusal = ("not_an_order", 400, "The body is not an order: a JSON object with an id.")
        if refusal:
            counts["rejected"] += 1
            outcome, status, reason = refusal
            return self.told(platform, outcome, status, json.dumps({"context": reason}).encode())
        # The topic and the delivery id are not signed: the body's own hash also marks it as seen.
        seen = (
            f"{platform}:body:{hashlib.sha256(body).hexdigest()}",
            *([f"{platform}:{delivery}"] if delivery else []),
        )
        return self.store(platform, topic, event, seen)

    def refusal(self, platform, topic, order, delivery, shop):
        """(outcome, status, reason) when a signed delivery must not be applied, else None.

        The signature covers the body only: a captured body sent again under another topic
        (an order as orders/delete), from another shop that shares the secret, or with a
        delivery id made up to fill the store, is refused here.
        """
        if not isinstance(order, dict) or "id" not in order:
            return "not_an_order", 400, "The body is not an order: a JSON object with an id."
        if len(delivery) > MAX_DELIVERY_ID:
            return "bad_delivery_id", 400, f"The delivery id is longer than {MAX_DELIVERY_ID} characters."
        if (topic in DELETE_TOPICS) != (set(order) <= DELETE_KEYS):
            return (
                "wrong_topic",
                400,
                (
                    "A deletion's body holds only the order's id."
                    if topic in DELETE_TOPICS
                    else "The body holds only an id, which is a deletion, not an order."
                ),
            )
        if topic not in DELETE_TOPICS and not ORDER_KEYS[platform] & set(order):
            return "not_an_order", 400, "The body is not an order: it has none of an order's fields."
        domains = self.service.settings.shop_domains
        if domains and not from_shop(platform, order, shop, domains):
            return "other_shop", 403, "The event comes from another shop than SHOP_DOMAIN names."
        return None

    def store(self, platform, topic, event, deliveries):
        """Store a checked event and answer from it from now on; deliveries mark it as seen (see WebhookStore.apply)."""
        service, counts = self.service, self.counts[platform]
        snapshot, overlay, store = service.snapshot, service.overlay, service.store
        if store is None or snapshot is None or overlay is None:
            counts["rejected"] += 1
            return self.told(
                platform,
                "unavailable",
                503,
                json.dumps({"context": "Events cannot be stored right now; the shop will send it again."}).encode(),
            )
        key = None  # a deletion names only the shop's id: the store knows the order's key
        if not event.deleted:
            key = (snapshot.normalise(event.fields["order_id"]), normalise_email(event.fields["email"]))
            if not all(key):
                return self.told(
                    platform,
                    "no_number_or_email",
                    200,
                    json.dumps(
                        {"stored": False, "reason": "the order has no number or no email, so no lookup could find it"}
                    ).encode(),
                )
            if event.time < snapshot.covers:
                return self.told(
                    platform,
                    "older_than_export",
                    200,
                    json.dumps({"stored": False, "reason": "the export being served is newer"}).encode(),
                )
        try:
            job = store.apply(event, key, deliveries)
        except StoreError as e:
            counts["rejected"] += 1
            log.error("webhook %s %s not stored: %s", platform, topic, e)
            return self.told(
                platform,
                "store_failed",
                503,
                json.dumps({"context": "The event could not be stored; the shop will send it again."}).encode(),
            )
        outcome = job.outcome
        if outcome == "applied":
            with service.events_lock:  # as the store had it once written, newest first
                while store.evicted:
                    gone_platform, *gone_key = store.evicted.popleft()
                    if service.overlay:
                        service.overlay.drop(gone_platform, gone_key)
                if job.now and service.overlay:
                    order_key, email_key, fields, deleted, moment = job.now
                    service.overlay.put(
                        platform, (order_key, email_key), None if deleted else json.loads(fields), moment, job.before
                    )
                service.note_fresher(time.time())
            counts["applied"] += 1
            self.last[platform] = time.time()
        log.info("webhook %s %s order=%s: %s", platform, topic, printable((job.now or key or ("?",))[0])[:20], outcome)
        stored = outcome in ("applied", "spooled")  # spooled: a deletion kept until the shared database returns
        return self.told(platform, outcome, 200, json.dumps({"stored": stored, "outcome": outcome}).encode())

    def status(self):
        """Per platform: events received, applied, rejected; the last one's time; orders answered from events."""
        overlay = self.service.overlay
        return {
            platform: {
                "received": counts["received"],
                "applied": counts["applied"],
                "rejected": counts["rejected"],
                "last_event": iso_time(self.last[platform]) if platform in self.last else None,
                "orders_from_events": overlay.platforms[platform] if overlay else 0,
            }
            for platform, counts in self.counts.items()
        }


###############################################################################
# Sources: the data folder, a URL, uploads ####################################
###############################################################################
#
# How an export reaches the service by itself: a background Job (retried with backoff, its
# failure a reason on /healthz, never a dead thread) watches the data folder or fetches
# ORDERS_URL; PUT /export receives an upload, streamed to a hidden file and renamed. Uses
# the index and the guards above.


def stream_to_file(hidden, chunks, limit, too_large):
    """Write a download or an upload to a hidden file, to be renamed into place once checked: its bytes.

    Past limit bytes, too_large is raised; on any failure the partial file goes.
    """
    size = 0
    try:
        with open(hidden, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large
                out.write(chunk)
    except BaseException:
        with suppress(OSError):
            hidden.unlink()
        raise
    return size


def sent_to_file(source, hidden, length):
    """Copy length bytes of a file object from where it stands to hidden, in the kernel (os.sendfile); its bytes,
    or None when source is no file of its own (a small body in memory) or the system cannot.

    A body passed through Python 1 MB at a time waits for the GIL after every read and write
    while lookups run: 2.5 s for 147 MB, against 0.2 s this way.
    """
    try:
        fd, offset = source.fileno(), source.tell()
    except (AttributeError, OSError, ValueError):
        return None
    if not hasattr(os, "sendfile") or sys.platform != "linux":  # elsewhere sendfile writes to sockets only
        return None
    copied = 0
    try:
        with open(hidden, "wb") as out:
            while copied < length and (sent := os.sendfile(out.fileno(), fd, offset + copied, length - copied)):
                copied += sent
    except BaseException:
        with suppress(OSError):
            hidden.unlink()
        raise
    return copied


JOB_RETRY = (30, 60, 120, 300, 600)  # seconds before the next try after 1, 2, 3... failures in a row


class Job:
    """How a background job (fetching, watching the folder, the webhook store's upkeep) is faring.

    Its thread never dies of an exception: each one is a failure counted here, with its reason
    for /healthz, and the job tries again after a wait that grows with the failures in a row.
    """

    def __init__(self, name):
        self.name = name  # what the job does, as /healthz says it: "fetching the export"
        self.failures = 0  # in a row
        self.failed_total = 0
        self.failing_since = self.last_error = self.last_success = self.last_attempt = None

    def run(self, work, *args):
        """work(*args) as one attempt: its result, or None after counting whatever it raised as a failure."""
        self.last_attempt = time.time()
        try:
            return work(*args)
        except UserError as error:
            self.failed(str(error))
        except Exception as error:  # a bug or a surprise: counted and shown, and the job lives on
            log.exception("%s failed", self.name)
            self.failed(f"an unexpected {type(error).__name__}; the log has the details")
        return None

    def failed(self, reason):
        """Count one failure and keep its reason."""
        self.failures += 1
        self.failed_total += 1
        self.failing_since = self.failing_since or time.time()
        self.last_error = reason

    def succeeded(self):
        """The job worked: the failures in a row are over."""
        self.failures, self.failing_since, self.last_error, self.last_success = 0, None, None, time.time()

    def backoff(self):
        """Seconds to wait after the failures in a row: 30 s, 1, 2, 5, then 10 min."""
        return JOB_RETRY[min(self.failures, len(JOB_RETRY)) - 1] if self.failures else 0

    def wait(self, normal):
        """Seconds before the next run of a job that runs every normal seconds: sooner while it fails."""
        return min(self.backoff(), normal) if self.failures else normal

    def trouble(self, now, stale_after):
        """Why /healthz is degraded by this job: failing for longer than the data may age, else None."""
        if self.failing_since and now - self.failing_since > stale_after:
            span = f"{stale_after / 3600:g} hours" if stale_after >= 3600 else f"{stale_after / 60:g} minutes"
            return f"{self.name} has failed for more than {span}: {self.last_error}"
        return None

    def status(self):
        """For /healthz with the key: the last success and attempt, the failures, the last reason."""
        return {
            "last_success": iso_time(self.last_success) if self.last_success else None,
            "last_attempt": iso_time(self.last_attempt) if self.last_attempt else None,
            "last_error": self.last_error,
            "failures_in_a_row": self.failures,
            "failing_since": iso_time(self.failing_since) if self.failing_since else None,
        }


# The data folder #############################################################


class Watcher:
    """Reloads when the export or contexts.toml changes and has stopped changing."""

    def __init__(self, service):
        self.service = service
        self.settings = service.settings
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.observer = None
        self.thread = None
        self.job = Job("watching the data folder")
        service.background.append(self.job)

    def paths(self):
        """The folders to watch: the export's folder (or itself) and the config's."""
        data = self.settings.data
        folders = {data if data.is_dir() else data.parent, self.settings.contexts.parent}
        return sorted(f for f in folders if f.is_dir())

    def start(self, events=True):
        """Start the observer (unless only polling) and the thread that debounces and reloads."""
        if events:
            from watchdog.observers import Observer

            handler = event_handler(self)
            self.observer = Observer()
            for folder in self.paths():
                self.observer.schedule(handler, str(folder), recursive=False)
            self.observer.daemon = True
            self.observer.start()
        self.thread = threading.Thread(target=self.run, name="reloader", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        """Stop watching."""
        self.stopping.set()
        self.changed.set()
        if self.observer:
            self.observer.stop()
            self.observer.join(5)
        if self.thread:
            self.thread.join(5)

    def relevant(self, path):
        """Events about exports and contexts.toml matter; the state folder's do not."""
        path = Path(path).absolute()
        data = self.settings.data
        if path == self.settings.contexts or path == data:
            return True
        return data.is_dir() and path.parent == data and is_export_name(path.name)

    def run(self):
        """Wait for a change (or poll), let the files settle, reload once; a failure waits its backoff first."""
        self.changed.set()  # look once at the start: a change made before watching began counts
        while not self.stopping.is_set():
            self.changed.wait(self.settings.poll_seconds)
            self.changed.clear()
            if self.stopping.is_set():
                return
            # reload() refuses what it can name; anything else is the job's failure, and this thread lives on.
            if self.job.run(self.look) is None and self.stopping.wait(self.job.backoff()):
                return

    def look(self):
        """Reload when the files changed since the last load was tried; True when that went through."""
        # Against what the service last tried to load, not what it serves: a refused
        # file is not read again until it changes.
        if self.settle() != self.service.tried:
            self.service.reload()
        elif self.service.copy_error and self.service.snapshot:  # the disk may have room again
            self.service.keep_copy(self.service.snapshot)
        self.job.succeeded()
        return True

    def settle(self):
        """The files' state once size and mtime have held still for settle_seconds."""
        current = self.service.files_state()
        while not self.stopping.is_set():
            time.sleep(self.settings.settle_seconds)
            self.changed.clear()
            again = self.service.files_state()
            if again == current:
                return current
            current = again
        return current


def file_state(path):
    """(path, size, mtime_ns), as the watcher compares files; the sizes are None if it is gone."""
    try:
        stat = path.stat()
    except (OSError, AttributeError):  # gone, or no export at all (None)
        return str(path), None, None
    return str(path), stat.st_size, stat.st_mtime_ns


def event_handler(watcher):
    """A watchdog handler that wakes the watcher for changes to the files it serves."""
    from watchdog.events import FileSystemEventHandler

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            # Our own reads open and close the export: those events are not changes.
            if event.is_directory or event.event_type in ("opened", "closed_no_write"):
                return
            paths = (event.src_path, getattr(event, "dest_path", "") or "")
            if any(p and watcher.relevant(os.fsdecode(p)) for p in paths):
                watcher.changed.set()

    return Handler()


# A URL (ORDERS_URL) ##########################################################

FETCH_TIMEOUT = 30  # seconds to connect, and at most between two reads of the body
FETCH_REDIRECTS = 5  # Dropbox and Google send one or two
FETCH_DEADLINE = 1800  # seconds for a whole body: a server dripping a byte at a time must not hold the fetcher


class Fetcher:
    """Fetches ORDERS_URL into the data folder at start and every FETCH_SECONDS.

    The body streams to a hidden file, renamed into place when whole: then the watcher
    and every guard decide, as for a file dropped in. Requests are conditional (ETag,
    Last-Modified), so an unchanged export costs a 304. A failure keeps what is served,
    is logged in one line without the URL's secret parts, and is tried again sooner.
    """

    def __init__(self, service):
        self.service, self.settings = service, service.settings
        self.folder = service.settings.data
        self.memo = service.settings.state / "fetch.json"  # the validators of the last body fetched
        self.outcomes = Counter()  # fetched, not_modified, failed
        self.job = Job("fetching the export")  # tried again sooner after a failure (Job.wait)
        service.background.append(self.job)
        self.stopping = threading.Event()
        self.thread = None

    def start(self):
        """Fetch in a thread of its own, from now on; returns self."""
        self.thread = threading.Thread(target=self.run, name="fetcher", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        """Stop fetching."""
        self.stopping.set()
        if self.thread:
            self.thread.join(5)

    def run(self):
        """Wait, fetch, wait again: every FETCH_SECONDS, sooner after a failure (`serve` fetched once at start)."""
        while not self.stopping.wait(self.job.wait(self.settings.fetch_seconds)):
            self.fetch()

    def fetch(self):
        """One fetch; True when the export was fetched or had not changed. Never raises: a failure is counted."""
        job = self.job
        job.last_attempt = time.time()
        try:
            outcome = self.download()
        except FetchError as error:
            reason = str(error)
        except Exception as error:  # whatever else a server's odd answer sets off: a failure like any other
            log.exception("fetching %s failed unexpectedly", shown_url(self.settings.orders_url))
            reason = f"the server's answer could not be read ({type(error).__name__})."
        else:
            self.outcomes[outcome] += 1
            job.succeeded()
            if (self.service.refused or {}).get("source") == "fetch":  # the link works again
                self.service.refused = None
            return True
        self.outcomes["failed"] += 1
        job.failed(reason)
        self.service.note_refusal(FetchError(reason), "fetch", f"fetching ORDERS_URL failed: {reason}")
        log.error(
            "fetching %s failed (%d in a row), %s: %s",
            shown_url(self.settings.orders_url),
            job.failures,
            self.serving_instead(),
            reason,
        )
        return False

    def serving_instead(self):
        """What is served while a fetch fails, as the log line says it."""
        if self.service.snapshot:
            return f"still serving {shown_name(self.service.snapshot.source)}"
        if self.folder.is_dir() and any(is_export_name(p.name) for p in self.folder.iterdir()):
            return "the export already in the data folder will be served"
        return "nothing loaded yet"

    def download(self):
        """Fetch the URL: "fetched" (a new body renamed into the folder) or "not_modified"; else FetchError."""
        memo = self.validators()
        headers = {"User-Agent": f"order-lookup/{__version__}"}
        if memo.get("etag"):
            headers["If-None-Match"] = memo["etag"]
        if memo.get("last_modified"):
            headers["If-Modified-Since"] = memo["last_modified"]
        host = urlsplit(self.settings.orders_url).hostname
        opener = urllib.request.build_opener(SafeRedirects(host), GuardedHTTP(host), GuardedHTTPS(host))
        request = urllib.request.Request(self.settings.orders_url, headers=headers)
        if self.settings.orders_url_auth:  # unredirected: a redirect to another host never carries it
            request.add_unredirected_header("Authorization", self.settings.orders_url_auth)
        try:
            with opener.open(request, timeout=FETCH_TIMEOUT) as response:
                return self.save(response)
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return "not_modified"
            if 300 <= e.code < 400:
                raise FetchError(f"the link redirected more than {FETCH_REDIRECTS} times, or in a loop.") from None
            raise FetchError(f"the server answered {e.code} {printable(e.reason)[:60]}.") from None
        except urllib.error.URLError as e:
            raise FetchError(f"could not reach {host}: {printable(getattr(e, 'reason', e))[:120]}.") from None
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            raise FetchError(f"the download from {host} broke off ({type(e).__name__}).") from None
        except ValueError:  # a header urllib cannot read, such as a redirect to "http://[::1"
            raise FetchError(
                f"the answer from {host} has a header that cannot be read (a malformed redirect "
                "or length); ask whoever runs that server, or use another link."
            ) from None

    def save(self, response):
        """Stream the body into a hidden file, check its size and kind, rename it into the data folder."""
        limit = int(self.settings.max_export_mb * 1e6)
        declared = declared_length(response.headers)
        if declared > limit:
            raise FetchError(f"the export is larger than MAX_EXPORT_MB ({self.settings.max_export_mb:g} MB).")
        if "html" in (response.headers.get_content_type() or ""):
            raise FetchError(
                "the link answered with a web page, not an export: a shared link that needs "
                "signing in, or that points to a preview? Use its direct download link."
            )
        started = time.monotonic()
        first = response.read1(READ_BUFFER)  # read1: at most one read from the socket, so the deadline is checked
        suffix = ".xlsx" if first.startswith(b"PK\x03\x04") else ".csv"  # the name only: content decides (file_kind)
        hidden, target = self.folder / f".fetching-{os.getpid()}{suffix}", self.folder / f"fetched{suffix}"
        too_large = FetchError(
            f"the export is larger than MAX_EXPORT_MB ({self.settings.max_export_mb:g} MB); the download was stopped."
        )
        size = stream_to_file(hidden, in_time(first, response, started), limit, too_large)
        try:
            if declared and size < declared:  # http.client ends a cut body quietly
                raise FetchError(f"the download broke off after {size:,} of {declared:,} bytes.")
            stamp = http_time(response.headers.get("Last-Modified"))
            if stamp:  # the export's own age, so /healthz and {records_updated} stay honest
                os.utime(hidden, (stamp, stamp))
            os.replace(hidden, target)
        except BaseException:
            with suppress(OSError):
                hidden.unlink()
            raise
        for other in self.folder.glob("fetched.*"):
            if other != target:  # the other kind, from an earlier fetch
                with suppress(OSError):
                    other.unlink()
        self.remember(response.headers.get("ETag"), response.headers.get("Last-Modified"))
        log.info("fetched %s: %d bytes into %s", shown_url(self.settings.orders_url), size, target.name)
        return "fetched"

    def validators(self):
        """The ETag and Last-Modified of the body fetched last, while its file is still there."""
        if not list(self.folder.glob("fetched.*")):
            return {}
        try:
            return json.loads(self.memo.read_text())
        except (OSError, ValueError):
            return {}

    def remember(self, etag, last_modified):
        """Keep the validators of a fetched body, for the next conditional request (also after a restart)."""
        with suppress(OSError):
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            self.memo.write_text(json.dumps({"etag": etag, "last_modified": last_modified}))

    def status(self):
        """For /healthz with the key: where from (host only), the last success, the last error."""
        return {
            "source": shown_url(self.settings.orders_url),
            "every_seconds": self.settings.fetch_seconds,
            **self.job.status(),
            "outcomes": dict(self.outcomes),
        }


def in_time(first, response, started):
    """The body's chunks, first the one already read, until FETCH_DEADLINE after started (then FetchError)."""
    chunk, size = first, 0
    while chunk:
        size += len(chunk)
        yield chunk
        if time.monotonic() - started > FETCH_DEADLINE:
            raise FetchError(
                f"the download took longer than {FETCH_DEADLINE // 60} minutes ({size:,} bytes so far) and was stopped."
            )
        chunk = response.read1(READ_BUFFER)  # read1: at most one read from the socket, so the deadline is checked


def declared_length(headers):
    """A response's Content-Length as a number (0 when it has none); FetchError when it is not one."""
    text = (headers.get("Content-Length") or "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise FetchError(
            f"the server announced a length that is not a number ({printable(text)[:20]!r}); "
            "ask whoever runs that server, or use another link."
        )
    return int(text)


def http_time(text):
    """A Last-Modified header as a timestamp, or None (also for one in the future)."""
    from email.utils import parsedate_to_datetime

    try:
        stamp = parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return stamp if stamp <= time.time() + FUTURE_SLACK else None


class SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most FETCH_REDIRECTS redirects: never from https to plain http, never to another host that is
    this machine or a private network (see guarded() for the same check on the address connected to)."""

    max_redirections = FETCH_REDIRECTS

    def __init__(self, allowed_host):
        super().__init__()
        self.allowed_host = allowed_host

    def redirect_request(self, request, fp, code, message, headers, new_url):
        old, new = urlsplit(request.full_url), urlsplit(new_url)
        if old.scheme == "https" and new.scheme != "https" and not is_loopback(new.hostname or ""):
            raise FetchError(f"the link redirected from https to plain http ({new.hostname}); refused.")
        if new.hostname != self.allowed_host and not all(map(is_public, addresses_of(new.hostname or ""))):
            raise private_hop(new.hostname)
        return super().redirect_request(request, fp, code, message, headers, new_url)


def addresses_of(host):
    """The addresses a host name resolves to now; none when it does not resolve (connecting then fails anyway)."""
    import socket

    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


def private_hop(host):
    """The FetchError of a hop to this machine or a private network."""
    return FetchError(
        f"the link led on to {printable(host)[:60]}, an address on this machine or a private network; "
        "refused. Only ORDERS_URL's own host may be such an address."
    )


def is_public(address):
    """True for an address on the internet: not this machine, a private network, link-local or a cloud's metadata."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    ip = (ip.ipv4_mapped or ip) if ip.version == 6 else ip
    return ip.is_global and not ip.is_multicast


def guarded(connection_class, allowed_host):
    """An http.client connection class that refuses, once connected, a peer that is not public.

    Checked on the address really connected to, on every hop, so a name that resolves anew
    (DNS rebinding) cannot slip past. allowed_host: ORDERS_URL's own host, which may be such an
    address (an export on this machine or the shop's network), and is the only one that may.
    """

    class Guarded(connection_class):
        def connect(self):
            super().connect()
            if self._tunnel_host or self.host == allowed_host:  # through a proxy, or ORDERS_URL's own host
                return
            if not is_public(self.sock.getpeername()[0]):
                self.sock.close()
                raise private_hop(self.host)

    return Guarded


class GuardedHTTP(urllib.request.HTTPHandler):
    """urllib's http handler with guarded() connections."""

    def __init__(self, allowed_host):
        super().__init__()
        self.connection = guarded(http.client.HTTPConnection, allowed_host)

    def http_open(self, request):
        return self.do_open(self.connection, request)


class GuardedHTTPS(urllib.request.HTTPSHandler):
    """urllib's https handler with guarded() connections (the certificate is checked as usual)."""

    def __init__(self, allowed_host):
        super().__init__()
        self.connection = guarded(http.client.HTTPSConnection, allowed_host)

    def https_open(self, request):
        return self.do_open(self.connection, request, context=self._context)


# Uploads (PUT /export) #######################################################

# The upload's reply counts the answers of the first orders only: all of them would take several
# loads' time (every answer's rule worked out); `check` counts them all.
UPLOAD_SURVEY_ORDERS = 20_000


def receive_upload(service, environ):
    """(HTTP status, JSON body) for an uploaded export: streamed aside, checked as `check` does, then served.

    The data being served changes only when the upload passes every guard; a second
    upload while one is being checked gets 409.
    """
    size = int(environ.get("CONTENT_LENGTH") or 0)  # as announced; as received once it is
    if not service.uploading.acquire(blocking=False):
        log.warning("upload: %d bytes: refused, another upload is being checked", size)
        return 409, json.dumps(
            {"accepted": False, "reason": "Another upload is being checked; send it again in a minute."}
        ).encode()
    hidden = None
    try:
        folder = service.settings.data if service.settings.data.is_dir() else service.settings.data.parent
        hidden, size = upload_body(environ, folder, int(service.settings.max_export_mb * 1e6))
        served = service.snapshot
        if served and served.file_size == size and file_digest(served.source) == file_digest(hidden):
            log.info("upload: %d bytes: the export being served, unchanged", size)
            return 200, json.dumps(
                {
                    "accepted": True,
                    "unchanged": True,
                    "file": served.source.name,
                    "layout": served.layout,
                    "orders": served.orders,
                    "rows": served.rows,
                }
            ).encode()
        snapshot, target = service.accept(hidden, http_time(environ.get("HTTP_LAST_MODIFIED")))
        hidden = None  # renamed into place
        service.share_export(target, snapshot)
        with yielding():  # seconds of pure Python, as a load is: lookups get the GIL back after 0.5 ms
            surveyed = survey(snapshot, UPLOAD_SURVEY_ORDERS)
        log.info("upload: %d bytes: accepted as %s (%d orders)", size, target.name, snapshot.orders)
        return 200, json.dumps(
            {
                "accepted": True,
                "file": target.name,
                "layout": snapshot.layout,
                "orders": snapshot.orders,
                "rows": snapshot.rows,
                "answers": dict(surveyed.answers.most_common()),
                "answers_of": surveyed.counted,
                "warnings": list(check_warnings(snapshot, surveyed)),
            }
        ).encode()
    except UploadRefused as error:
        log.warning("upload: %d bytes: refused: %s", size, error)
        service.note_refusal(error, "upload")
        return 413, json.dumps({"accepted": False, "reason": str(error)}).encode()
    except UserError as error:
        # The sender knows no hidden file's name: "the upload" looks cut off.
        reason = str(error).replace(hidden.name, "the upload") if hidden else str(error)
        service.note_refusal(error, "upload", reason)
        log.warning(
            "upload: %d bytes: refused, still serving %s: %s",
            size,
            shown_name(service.snapshot.source) if service.snapshot else "nothing",
            reason,
        )
        return 422, json.dumps({"accepted": False, "reason": reason}).encode()
    finally:
        if hidden:
            with suppress(OSError):
                hidden.unlink()
        service.uploading.release()


def upload_body(environ, folder, limit):
    """(hidden file, bytes) of the upload: the raw body, or the first file of a multipart form."""
    source, length = environ["wsgi.input"], int(environ.get("CONTENT_LENGTH") or 0)
    if length > limit:
        raise UploadRefused(f"the upload is larger than MAX_EXPORT_MB ({limit / 1e6:g} MB).")
    if environ.get("CONTENT_TYPE", "").startswith("multipart/form-data"):
        files = bottle.request.files  # bottle spools a large part to a temporary file
        upload = next(iter(files.values()), None)
        if upload is None:
            raise ExportError("the form holds no file: send the export as the body, or as a form's file field.")
        source, length = upload.file, limit + 1
    hidden = folder / f".uploading-{os.getpid()}-{threading.get_ident()}"
    too_large = UploadRefused(f"the upload is larger than MAX_EXPORT_MB ({limit / 1e6:g} MB).")
    # Waitress holds a body over 512 KB in a temporary file: copied from there by the kernel.
    size = sent_to_file(source, hidden, length) if length <= limit else None  # a form's part: length unknown
    if size is None:
        size = stream_to_file(hidden, body_chunks(source, length), limit, too_large)
    # The name only: content decides how it is read (file_kind); one a folder's reading recognises.
    named = hidden.with_name(hidden.name + (".xlsx" if file_kind(hidden) == "xlsx" else ".csv"))
    os.replace(hidden, named)
    return named, size


def body_chunks(source, length):
    """A request body's chunks: at most length bytes (a form's file part: until its end)."""
    read = 0
    while chunk := source.read(min(READ_BUFFER, max(length - read, 0))):
        read += len(chunk)
        yield chunk


def file_digest(path):
    """The SHA-256 of a file's bytes, or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    except OSError:
        return None


###############################################################################
# Request log, insights, metrics ##############################################
###############################################################################
#
# One log line per request with the email masked (and, in the same middleware, a lookup
# with a valid key answered before Bottle); lookup insights (what customers asked that was
# not found, without keeping who asked); and /metrics for Prometheus. Uses the rendering
# and the warnings above.

LOOKUP_OUTCOMES = ("found", "not_found", "missing", "invalid", "unauthorized", "throttled", "error")
# Upper bounds in milliseconds: for /metrics' histogram and the status page's p50 and p99.
LATENCY_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100, 250, 500, 1000, 2500, 5000)
# The status page's headings for them: short, so that a phone shows every column.
OUTCOME_HEADINGS = {
    "found": "found",
    "not_found": "not found",
    "missing": "left out",
    "invalid": "unreadable",
    "unauthorized": "wrong key",
    "throttled": "throttled",
    "error": "error",
}
INSIGHT_HOURS = 24
RECENT_NOT_FOUND = 20


def lookup_outcome(entry):
    """The outcome of a request to /lookup, from its request-log tuple; None for any other request."""
    _, _, _, path, status, _, lookup = entry
    if path != "/lookup":
        return None
    code = status[:3]
    if code in ("200", "404", "401", "429"):
        return {"200": "found", "404": "not_found", "401": "unauthorized", "429": "throttled"}[code]
    if code == "400" and lookup and is_missing(*lookup):
        return "missing"
    return "error" if code.startswith("5") else "invalid"


def is_missing(order_id, email):
    """True when a 400 was for a number or email left out, not for one that could not be read (as answer() decides)."""
    if order_id is None or email is None:
        return False
    order_id, email = order_id.strip(), email.strip()
    if len(order_id) > MAX_ORDER_ID or len(email) > MAX_EMAIL or CONTROL.search(order_id + email):
        return False
    return not normalise_order_id(order_id) or not email


class Insights:
    """Lookups as the request log sees them, for /metrics and the status page: in memory only, gone on restart.

    Fed by the log's thread in batches (serve), so counting costs a request nothing.
    """

    def __init__(self):
        self.lock = threading.Lock()  # the log's thread writes, a scrape or the page reads
        self.outcomes = Counter()  # since start
        self.latency = [0] * (len(LATENCY_MS) + 1)  # since start, per LATENCY_MS bucket (the last: slower)
        self.latency_sum = 0.0  # seconds
        self.hours = OrderedDict()  # hour number -> (Counter of outcomes, latency buckets)
        self.not_found = deque(maxlen=RECENT_NOT_FOUND)  # (time, number as compared, masked email)

    def observe(self, entries):
        """Count a batch of request-log tuples; requests other than lookups are left out."""
        with self.lock:
            for entry in entries:
                if (outcome := lookup_outcome(entry)) is not None:
                    self.count(entry, outcome)

    def count(self, entry, outcome):
        """One lookup into the totals, its hour and, when not found, the recent list."""
        moment, milliseconds, lookup = entry[0], entry[5], entry[6]
        bucket = bisect.bisect_left(LATENCY_MS, milliseconds)
        self.outcomes[outcome] += 1
        self.latency[bucket] += 1
        self.latency_sum += milliseconds / 1000
        hour = int(moment // 3600)
        if hour not in self.hours:
            self.hours[hour] = (Counter(), [0] * (len(LATENCY_MS) + 1))
            while len(self.hours) > INSIGHT_HOURS:
                self.hours.popitem(last=False)
        outcomes, buckets = self.hours[hour]
        outcomes[outcome] += 1
        buckets[bucket] += 1
        if outcome == "not_found" and lookup:
            order_id, email = lookup
            # As typed, reduced to letters and digits: "SO-1001" shows as SO1001, beside the export's 1001.
            number = "(an-email)" if "@" in order_id else re.sub(r"[\W_]+", "", order_id)[:NOT_FOUND_ID_LENGTH]
            self.not_found.append((moment, number, mask_email(email)))

    def day(self, now=None):
        """The last 24 hours: lookups and outcomes per hour; the not-found share; p50, p99; the recent not-found."""
        now = time.time() if now is None else now
        first = int(now // 3600) - INSIGHT_HOURS + 1
        with self.lock:
            hours = [
                (hour, Counter(outcomes), list(buckets))
                for hour, (outcomes, buckets) in self.hours.items()
                if hour >= first
            ]
            recent = list(reversed(self.not_found))
        total, buckets = Counter(), [0] * (len(LATENCY_MS) + 1)
        for _, outcomes, counts in hours:
            total.update(outcomes)
            buckets = [a + b for a, b in zip(buckets, counts)]
        answered = total["found"] + total["not_found"]
        return {
            "hours": [(iso_time(hour * 3600)[11:16], outcomes) for hour, outcomes, _ in hours],
            # found and not found always; the other outcomes only where the day had any
            "columns": [(o, OUTCOME_HEADINGS[o]) for o in LOOKUP_OUTCOMES if o in ("found", "not_found") or total[o]],
            "total": total,
            "lookups": sum(total.values()),
            "not_found_share": total["not_found"] / answered if answered else None,
            "p50_ms": percentile(buckets, 0.50),
            "p99_ms": percentile(buckets, 0.99),
            "recent_not_found": [(iso_time(moment), number, email) for moment, number, email in recent],
        }


def percentile(buckets, share):
    """The bucket bound (ms) under which share of the counted lookups fall; None when none were counted."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for bound, count in zip((*LATENCY_MS, math.inf), buckets):
        seen += count
        if seen >= share * total:
            return bound
    return math.inf


class MetricsCollector:
    """The service's state as Prometheus metrics, read when scraped: nothing is counted for them on a request."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        """The metric families (prometheus_client's collector protocol)."""
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        service, insights = self.service, self.service.insights
        with insights.lock:
            outcomes, latency, latency_sum = Counter(insights.outcomes), list(insights.latency), insights.latency_sum
        lookups = CounterMetricFamily("orders_lookups", "Lookups on /lookup by outcome.", labels=["outcome"])
        for outcome in LOOKUP_OUTCOMES:
            lookups.add_metric([outcome], outcomes[outcome])
        yield lookups
        cumulative = list(accumulate(latency))
        yield HistogramMetricFamily(
            "orders_lookup_duration_seconds",
            "Time to answer a lookup.",
            buckets=[(f"{bound / 1000:g}", n) for bound, n in zip(LATENCY_MS, cumulative)] + [("+Inf", cumulative[-1])],
            sum_value=latency_sum,
        )
        yield from self.data(service)
        loads = CounterMetricFamily(
            "orders_loads_refused", "Exports or contexts.toml edits refused, by reason.", labels=["reason"]
        )
        for kind, count in sorted(service.loads.items()):
            if kind != "accepted":
                loads.add_metric([kind], count)
        yield loads
        yield CounterMetricFamily(
            "orders_loads_accepted", "Exports loaded and served.", value=service.loads["accepted"]
        )
        yield from self.sources(service)

    @staticmethod
    def data(service):
        """Gauges of the data being served."""
        from prometheus_client.core import GaugeMetricFamily

        snapshot, (_, _, age) = service.snapshot, service.health()
        for name, doc, value in (
            ("orders_served_orders", "Orders in the export being served.", snapshot.orders if snapshot else 0),
            ("orders_served_rows", "Rows in the export being served.", snapshot.rows if snapshot else 0),
            ("orders_data_age_seconds", "Age of the export being served.", age if age is not None else math.nan),
            (
                "orders_max_age_seconds",
                "[settings] max_age_hours: older data is stale.",
                snapshot.config.max_age_hours * 3600 if snapshot else math.nan,
            ),
            (
                "orders_last_load_duration_seconds",
                "How long the last accepted load took.",
                snapshot.seconds if snapshot else math.nan,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        refused = GaugeMetricFamily(
            "orders_export_refused",
            "1 while the last export that came (dropped in the "
            "folder, uploaded or fetched) stands refused, until a good one is served.",
            labels=["source"],
        )
        for source in ("folder", "upload", "fetch"):
            refused.add_metric([source], 1 if (service.refused or {}).get("source") == source else 0)
        yield refused
        if snapshot is None:
            return
        counts = reading_counts(snapshot)
        left_out = GaugeMetricFamily(
            "orders_rows_left_out", "Rows of the export served that are no order, by reason.", labels=["reason"]
        )
        for reason, count in counts["left_out"].items():
            left_out.add_metric([reason], count)
        yield left_out
        yield GaugeMetricFamily(
            "orders_rows_attached",
            "Item rows without an order number taken as the order above's.",
            value=counts["attached_to_the_order_above"],
        )
        withheld = GaugeMetricFamily(
            "orders_cells_withheld", "Cells a spreadsheet damaged, withheld, by field.", labels=["field"]
        )
        for field_name, count in counts["cells_withheld"].items():
            withheld.add_metric([field_name], count)
        yield withheld

    @staticmethod
    def sources(service):
        """Counters of webhook deliveries and fetches, where those are set up."""
        from prometheus_client.core import CounterMetricFamily

        if service.webhooks:
            events = CounterMetricFamily(
                "orders_webhook_events", "Webhook deliveries by platform and outcome.", labels=["platform", "outcome"]
            )
            for platform, outcomes in service.webhooks.outcomes.items():
                for outcome, count in sorted(outcomes.items()):
                    events.add_metric([platform, outcome], count)
            yield events
        if service.fetcher:
            fetches = CounterMetricFamily("orders_fetches", "Fetches of ORDERS_URL by outcome.", labels=["outcome"])
            for outcome, count in sorted(service.fetcher.outcomes.items()):
                fetches.add_metric([outcome], count)
            yield fetches


def metrics_registry(service):
    """A registry of the service's metrics and the process's own (memory, CPU, open files)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(service))
    ProcessCollector(registry=registry)
    return registry


class RequestLog:
    """WSGI middleware: common headers, one log line per request, a JSON 500 whatever happens; lookup answers
    GET /lookup before Bottle when given (see create_app).

    The 500's body is unavailable(): contexts.toml's `unavailable` answer.

    Each request leaves a bare tuple, (time, address, method, path, status, milliseconds,
    (order number, email) or None), for write_request; request_line() makes the text.
    By default the line goes through logging at once. `serve` hands LogHandler.queue_request
    instead, whose flush thread makes the lines off the request's path.
    """

    def __init__(self, app, write_request=None, unavailable=lambda: UNAVAILABLE, lookup=None):
        self.app = app
        self.write_request = write_request or self.log_request
        self.unavailable = unavailable  # the body of a fault
        # GET /lookup with a valid key, answered without Bottle: environ -> (status, JSON body), or None for
        # Bottle's route to answer (a missing or wrong key). Bottle's thread-local request and response,
        # router and header list cost a fifth of a lookup's time in the interpreter.
        self.lookup = lookup

    @staticmethod
    def log_request(entry):
        """A request line through logging."""
        access_log.info("%s", request_line(entry))

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        seen = []

        def respond(status, headers, exc_info=None):
            seen.append(status)
            return start_response(status, headers + COMMON_HEADERS, exc_info)

        try:
            if (
                self.lookup is not None
                and environ.get("PATH_INFO") == "/lookup"
                and environ.get("REQUEST_METHOD") == "GET"
                and (answered := self.lookup(environ)) is not None
            ):
                status, body = answered
                body = [body]
                respond(STATUS_LINES[status], [("Content-Type", JSON), ("Content-Length", str(len(body[0])))])
            else:
                body = self.app(environ, respond)
        except Exception:
            log.exception("request failed")
            seen.append("500 Internal Server Error")
            try:
                fault = self.unavailable()
            except Exception:  # the fault's own wording must not be a second fault
                fault = UNAVAILABLE
            start_response(
                seen[-1], [("Content-Type", JSON), ("Content-Length", str(len(fault)))] + COMMON_HEADERS, sys.exc_info()
            )
            body = [fault]
        self.write_request(
            (
                time.time(),
                environ.get("REMOTE_ADDR", "-"),
                environ.get("REQUEST_METHOD", "-"),
                environ.get("PATH_INFO", ""),
                seen[-1] if seen else "-",
                (time.perf_counter() - started) * 1000,
                environ.get("orders.lookup"),
            )
        )
        return body


def request_line(entry):
    """A request's log line (without time and level): never a query, a full email or a control character."""
    _, address, method, path, status, milliseconds, lookup = entry
    line = f"{address} {method} {sanitise_path(path)} {status.split(' ', 1)[0]} {milliseconds:.1f}ms"
    if lookup is None:
        return line
    order_id, email = lookup
    # Normalised, so it cannot forge a line; an email typed as the number is not written out.
    order = "(an-email)" if "@" in (order_id or "") else normalise_order_id(order_id or "")[:NOT_FOUND_ID_LENGTH] or "-"
    return f"{line} order={order} email={mask_email(email) if email else '-'}"


def sanitise_path(path):
    """The path for a log line: printable, short, never the query."""
    if path.isascii() and path.isprintable() and " " not in path:
        return path[:100] or "/"
    return re.sub(r"[^\x21-\x7e]", "?", path)[:100] or "/"


class JsonLines(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line, for log collectors."""

    def format(self, record):
        return self.line(record.created, record.levelname, record.name, record.getMessage())

    def line(self, created, level, logger, message):
        """One log line from its parts."""
        return json.dumps({"time": iso_time(created), "level": level.lower(), "logger": logger, "message": message})


class TextLines(logging.Formatter):
    """'2026-11-28 21:29:04,599 INFO message', the time text made once a second, not per line."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self.cached = (None, "")  # (second, its text), replaced as one: threads share it

    def formatTime(self, record, datefmt=None):
        return self.stamp(record.created)

    def stamp(self, created):
        """The time text of a line."""
        second = int(created)
        cached_second, text = self.cached
        if second != cached_second:
            text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self.cached = (second, text)
        return f"{text},{int(created % 1 * 1000):03d}"

    def line(self, created, level, logger, message):
        """One log line from its parts, as format() writes a record."""
        return f"{self.stamp(created)} {level} {message}"


class LogHandler(logging.StreamHandler):
    """Writes to stderr; request lines are queued and written together every half second.

    A write per request is a system call each, and taking the handler's lock on every
    request makes eight request threads queue behind whichever one the GIL paused
    while holding it: together a third of the throughput. Building a LogRecord and
    formatting it cost another fifth. So request lines arrive as bare tuples
    (queue_request) in a deque, which needs no lock to append to, and one thread
    formats and writes them. Every other line (loads, refusals, warnings) is written
    at once, after the queued ones.
    """

    def __init__(self, interval=0.5):
        super().__init__(sys.stderr)
        self.pending = deque()
        self.queue_request = self.pending.append  # RequestLog's tuples
        self.observers = []  # functions given each batch of request tuples too (Insights.observe)
        self.timer = threading.Thread(target=self.flush_every, args=(interval,), name="log-flush", daemon=True)
        self.timer.start()

    def emit(self, record):
        self.write_pending()
        super().emit(record)

    def write_pending(self):
        """Write the queued request lines in one go."""
        line, lines, entries = self.formatter.line, [], []
        while self.pending:
            entry = self.pending.popleft()
            entries.append(entry)
            try:
                text = request_line(entry)
            except Exception:  # one odd request must not stop every later line: this thread writes them all
                text = "a request whose log line could not be made"
            lines.append(line(entry[0], "INFO", access_log.name, text))
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        for observe in self.observers:
            try:
                observe(entries)
            except Exception:  # counting must never stop the log
                log.exception("request counting failed")

    def flush_now(self):
        """Write out what is queued."""
        with self.lock:
            try:
                self.write_pending()
            except (OSError, ValueError):
                pass  # stderr closed: nothing to tell anyone

    def flush_every(self, interval):
        """The queue's clock; it outlives any failure, or request lines would pile up unwritten."""
        while True:
            time.sleep(interval)
            try:
                self.flush_now()
            except Exception:
                self.pending.clear()


def request_writer(insights=None):
    """LogHandler.queue_request when serve's handler writes every line and request lines are wanted; else None.

    insights: counts each batch of requests in the handler's thread too.
    """
    handlers = logging.getLogger().handlers
    if access_log.isEnabledFor(logging.INFO) and len(handlers) == 1 and isinstance(handlers[0], LogHandler):
        if insights is not None:
            handlers[0].observers.append(insights.observe)
        return handlers[0].queue_request
    return None


def setup_logging(log_format, quiet=False):
    """Log to stderr; keep waitress's per-request queue warnings out of the log."""
    handler = LogHandler()
    atexit.register(handler.flush_now)
    handler.setFormatter(JsonLines() if log_format == "json" else TextLines())
    # The logging docs' own advice for speed: skip what our lines never show (caller, thread,
    # process), worth a few microseconds on every request.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    # Under load waitress warns "Task queue depth is N" for every request: not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


###############################################################################
# Serving state: loads, reloads, freshness ####################################
###############################################################################
#
# The Service holds what is served: the snapshot, the overlay, the sources and their jobs.
# A reload is built beside the snapshot being served and swapped in one assignment; a
# refused export leaves it in place. /healthz is made here. Uses everything above.


class Service:
    """Holds the Snapshot being served and replaces it only with a good one."""

    def __init__(self, settings):
        self.settings = settings
        self.snapshot = None  # replaced by one assignment; readers never see a mix
        self.refused = None  # {"at", "source", "file", "reason"} of the last refused export (see note_refusal)
        self.config_error = None  # why the last contexts.toml edit was refused
        self.copy_error = None  # why the last accepted export could not be copied to the state folder
        self.from_last_good = False
        self.tried = None  # files_state() when a load last began, good or refused
        self._lock = threading.Lock()  # one load at a time
        self._copy_lock = threading.Lock()  # one copy to the state folder at a time
        self.copying = None  # the thread copying the first export after start
        self.store = None  # the WebhookStore, opened on the first load when a webhook secret is set
        self.store_error = None  # why it could not be opened
        self.overlay = None  # orders from webhook events, newer than the export
        self.events_lock = threading.Lock()  # an event is stored and put into the overlay as one step
        self.history = deque(
            maxlen=ACCEPTED_HISTORY
        )  # the last exports accepted (see refuse_below_floor), read at start
        self.choice = None  # the columns of the export accepted last (see choice_of): kept while the header is
        self.background = []  # the Jobs of the threads that feed it (watcher, fetcher, store upkeep), for /healthz
        self.webhooks = Webhooks(self) if settings.webhook_secrets else None
        self.fetcher = Fetcher(self) if settings.orders_url else None
        self.uploading = threading.Lock()  # one upload checked at a time
        self.loads = Counter()  # "accepted", or the kind of a refusal (refusal_kind): for /metrics
        self.insights = Insights() if settings.metrics else None  # lookups counted off the request path
        self.following = None  # the Job of the thread following the shared database (DATABASE_URL)
        self.stopping = threading.Event()  # set when the service stops: its own threads end

    def files_state(self):
        """The config and the export a load would read now, with sizes and times."""
        try:
            export = find_export(self.settings.data, self.settings.follow_symlinks)
        except (UserError, OSError):
            export = None
        return file_state(self.settings.contexts), file_state(export)

    def build(self, starting=False):
        """A new Snapshot from the configured files, checked by guard(); raises UserError."""
        # Taken before reading: a file that changes while it is read differs from this,
        # so the watcher reads it again.
        self.tried = self.files_state()
        config = load_config(self.settings.contexts)
        path = find_export(self.settings.data, self.settings.follow_symlinks)
        with self.loading(path, starting):
            snapshot = dated_upload(
                build_snapshot(config, path, self.settings.memory_limit_mb, previous=self.choice),
                self.settings.state / UPLOADED_FILE,
            )
        self.guard(snapshot)
        return snapshot

    @contextmanager
    def loading(self, path, starting):
        """Mark path as being loaded, in the state folder, until the load ends either way.

        A mark left behind means the process died while loading it (the kernel kills a
        process over its memory limit): at the next start that file is skipped, so one
        bad file cannot keep the service in a crash loop.
        """
        mark, state = self.settings.state / "loading.json", file_state(path)
        if starting and mark.exists():
            with suppress(OSError, ValueError):
                if tuple(json.loads(mark.read_text())) == state:
                    export_error(
                        path,
                        "was being loaded when the service stopped last time (killed, perhaps for "
                        "memory), so it is skipped. Replace the export, or delete "
                        f"{printable(mark)} to have it read again.",
                    )
        try:
            self.settings.state.mkdir(parents=True, exist_ok=True)
            mark.write_text(json.dumps(state))
        except OSError as e:
            log.warning(
                "could not mark the load in %s (%s); a file that kills the service would be read again at every start",
                printable(self.settings.state),
                e.strerror,
            )
        try:
            yield
        finally:
            with suppress(OSError):
                mark.unlink()

    def stopped(self):
        """A clean stop (SIGTERM, Ctrl-C) in the middle of a load: that file did not kill the service."""
        with suppress(OSError):
            (self.settings.state / "loading.json").unlink()

    def start(self):
        """First load: the export, else the last good copy, else the export's error.

        The copy of an accepted export is made after it is served (in copying, a thread):
        a large export is served that much sooner.
        """
        self.history = read_history(self.settings.state / ACCEPTED_FILE)
        self.choice = read_choice(self.settings.state / ACCEPTED_FILE)
        try:
            snapshot = self.build(starting=True)
            guard_against_record(snapshot, self.settings.state / ACCEPTED_FILE)
            self.install(snapshot, keep_copy=False)
            self.copying = threading.Thread(target=self.keep_copy, args=(self.snapshot,), name="copy", daemon=True)
            self.copying.start()
        except ExportError as error:
            fallback = self.last_good_copy()
            if fallback is None:
                raise
            self.install(build_snapshot(load_config(self.settings.contexts), fallback), keep_copy=False)
            self.from_last_good = True
            self.note_refusal(error)
            log.error(
                "SERVING THE LAST GOOD COPY of the export (%s, modified %s): %s",
                printable(fallback),
                iso_time(self.snapshot.file_mtime),
                error,
            )
        return self.snapshot

    def reload(self):
        """Rebuild from the files; keep serving the current Snapshot if the new one is bad."""
        with self._lock, yielding():
            try:
                snapshot = self.build()
            except UserError as error:
                self.refuse(error)
                return False
            except Exception as error:  # whatever went wrong, the thread that reloads must live on
                self.refuse(
                    ExportError(
                        f"the export could not be loaded ({type(error).__name__}); the data being served stays served."
                    )
                )
                return False
            self.install(snapshot)
            return True

    def accept(self, path, stated=None):
        """Load an uploaded file as a reload would: on success it is renamed into the data folder and served.

        stated: the time the sender gives the file (its Last-Modified), if any. The file is
        dated by upload_time(), never by its arrival: an old export sent again must not look
        newer than the webhook events since. Returns (snapshot, its file); raises UserError
        (the data served unchanged) otherwise.
        """
        data = self.settings.data
        target = data / f"uploaded{path.suffix}" if data.is_dir() else data
        with self._lock, yielding():
            snapshot = build_snapshot(
                load_config(self.settings.contexts),
                path,
                self.settings.memory_limit_mb,
                dated=stated is None,
                previous=self.choice,
            )
            snapshot = with_made_at(snapshot, upload_time(stated, snapshot.newest_day, self.snapshot))
            self.guard(snapshot)
            os.replace(path, target)
            for other in data.glob("uploaded.*") if data.is_dir() else ():
                if other != target:
                    with suppress(OSError):
                        other.unlink()
            snapshot = replace(snapshot, source=target)
            self.tried = self.files_state()  # the watcher will find nothing new to load
            self.install(snapshot)
            write_upload_record(self.settings.state / UPLOADED_FILE, snapshot)
        return snapshot, target

    def guard(self, snapshot):
        """Refuse an export with no orders, far fewer than the one being served, or than the last ones accepted."""
        name = shown_name(snapshot.source)
        if not snapshot.orders:
            export_error(
                snapshot.source,
                "holds no orders (only a header?). Re-export the orders; the last good data stays served.",
            )
        current = self.snapshot
        if current:
            # The same file read anew (a contexts.toml edit) was whole before; keys read another way cannot be compared.
            comparable = current.index and not same_file(current, snapshot) and same_keys(current, snapshot)
            refuse_shrunk(snapshot, current.orders, current.index if comparable else (), "being served")
        if not (current and same_file(current, snapshot)):
            if isinstance(self.store, SharedStore) and (shared := self.store.history()):
                self.history = shared  # as every instance has it: they refuse alike
            refuse_below_floor(snapshot, self.history)
        if snapshot.file_mtime > time.time() + FUTURE_SLACK:
            log.warning(
                "%s: its modification time, %s, is in the future: its age cannot be told, and a newer "
                "export will be served as soon as one arrives. Check the clock of the machine that "
                "wrote it.",
                name,
                iso_time(snapshot.file_mtime),
            )

    def refuse(self, error):
        """Keep what is served; remember and log why the new files were refused."""
        if isinstance(error, ConfigError):
            self.loads[refusal_kind(error)] += 1
            self.config_error = str(error)
        else:  # the config loaded before the export failed, so it is fine now
            self.config_error = None
            self.note_refusal(error)
        log.error(
            "refused, still serving %s: %s", shown_name(self.snapshot.source) if self.snapshot else "nothing", error
        )

    def note_refusal(self, error, source="folder", reason=None):
        """Remember a refused export until a good one is served, for /healthz, the status page and /metrics.

        source: how it came: "folder" (dropped or written there), "upload" or "fetch" (ORDERS_URL).
        """
        self.loads[refusal_kind(error)] += 1
        self.refused = {
            "at": iso_time(time.time()),
            "source": source,
            "file": getattr(error, "file", ""),
            "reason": reason or str(error),
        }

    def install(self, snapshot, keep_copy=True):
        """Serve snapshot from now on (one assignment) and keep a copy of its file."""
        before, self.snapshot = self.snapshot, snapshot
        remember_accepted(self.history, snapshot)
        if isinstance(self.store, SharedStore):
            self.store.remember(self.history)
        self.choice = choice_of(snapshot)
        for field_name, was, now in (snapshot.reading or {}).get("columns_changed", ()):
            log.warning(
                "%s: the header row changed, and %s is now read from %s (was %s)",
                shown_name(snapshot.source),
                field_name,
                repr(now) if now else "no column",
                repr(was) if was else "no column",
            )
        self.loads["accepted"] += 1
        fixed = self.config_error is not None  # a refused contexts.toml edit was put right: say it is applied
        self.refused = None
        self.config_error = None
        self.from_last_good = False
        log.info("loaded %s", snapshot.describe())
        for field_name, header, evidence in snapshot.packer.plan.detected:
            log.warning(
                "%s: column %r read as %s because of its content (%s), not its header; name it in "
                "[columns] %s of contexts.toml to make it sure",
                shown_name(snapshot.source),
                printable(header),
                field_name,
                evidence,
                field_name,
            )
        self.events(snapshot, caught_up=before is not None and not same_file(before, snapshot))
        if before and (before.config != snapshot.config or fixed):  # what it says changed, not only its time
            log.info(
                "applied %s: %d templates, %d rules",
                shown_name(snapshot.config.path),
                len(snapshot.config.templates),
                len(snapshot.config.rules),
            )
        if keep_copy:
            self.keep_copy(snapshot)

    def events(self, snapshot, caught_up=False):
        """Answer from webhook events newer than snapshot: open the store on first use, forget what it caught up with.

        caught_up: a new export was accepted, so a store moved aside earlier no longer costs data.
        """
        if not (self.settings.webhook_secrets or self.settings.database_url):
            return
        with self.events_lock:
            if self.store is None:
                try:
                    self.store = self.open_store()
                    self.store.on_change = lambda: self.events(self.snapshot)  # the overlay as the store now is
                    self.store_error = None
                    for platform, moment in self.store.last_received().items() if self.webhooks else ():
                        self.webhooks.last.setdefault(platform, moment)
                except (StoreError, OSError) as e:
                    self.store_error = f"webhook events cannot be stored: {e}"
                    log.error("%s", self.store_error)
                    return
            elif caught_up:
                self.store.moved_aside = None
            try:
                self.store.prune(snapshot.covers)
                self.store.evicted.clear()  # the overlay is built afresh from what the store keeps
                rows = self.store.rows()
            except Exception as e:
                self.store.note_failure(e)
                return
            self.overlay = Overlay(snapshot).fill(rows)
            self.note_fresher(max((received for *_, received, _ in rows), default=0))

    def open_store(self):
        """The webhook store: SQLite in STATE_DIR, or with DATABASE_URL the database shared by the shop's instances,
        with the SQLite store as its spool (whose events, from before the switch too, go into the database)."""
        settings = self.settings
        settings.state.mkdir(parents=True, exist_ok=True)
        local = WebhookStore(settings.state / "webhooks.sqlite3", settings.webhook_max_orders, settings.webhook_days)
        if not settings.database_url:
            return local
        local.keeps_unknown = True
        shared = SharedStore(
            settings.database_url,
            settings.database_password,
            settings.shop_domains,
            local,
            settings.webhook_max_orders,
            settings.webhook_days,
            instance=f"{socket.gethostname()}:{settings.port}",
        )
        if (history := shared.history()) is not None:  # the floor every instance refuses below
            if history:
                self.history = history
            else:
                shared.remember(self.history)
        log.info(
            "webhook events and uploads are shared with this shop's other instances in %s",
            shown_database(settings.database_url),
        )
        self.following = Job("following the shared database")
        self.background.append(self.following)
        threading.Thread(target=self.follow, args=(shared,), name="follower", daemon=True).start()
        return shared

    def follow(self, shared):
        """The follower's thread: every change in the shared database into the overlay, every upload loaded here;
        it never dies (a failure is counted on /healthz and it starts again)."""
        while not self.stopping.is_set():
            self.following.run(shared.follow, self.apply_changes, self.load_shared_export, self.stopping)
            self.stopping.wait(self.following.backoff() or FOLLOW_RETRY_SECONDS)

    def apply_changes(self, rows):
        """Changes committed to the shared database (by any instance), into the overlay in their order.

        None: the changes needed are gone or were never read; the overlay is built afresh.
        """
        if rows is None:
            self.events(self.snapshot)
            return
        with self.events_lock:
            overlay = self.overlay
            if overlay is None:
                return
            passed = 0
            for seq, kind, platform, order_key, email_key, fields, moment, before_order, before_email in rows:
                key, before = (order_key, email_key), (before_order, before_email) if before_order else None
                try:
                    if kind == "drop":
                        overlay.drop(platform, key)
                    elif kind in ("put", "gone"):
                        overlay.put(platform, key, json.loads(fields) if kind == "put" else None, moment, before)
                    else:
                        raise ValueError(f"a change of an unknown kind {kind!r}")
                except (ValueError, TypeError, AttributeError) as e:  # one bad row must not stop the ones after it
                    passed += 1
                    self.following.failed(f"change {seq} in the shared database could not be read and was passed")
                    log.error("change %s in the shared database could not be read (%s): passed", seq, e)
            if not passed:
                self.following.succeeded()
            self.note_fresher(time.time())

    def load_shared_export(self, fetch, sha256, made_at, name, stored_at):
        """An upload another instance accepted (stored in the shared database): loaded and guarded here alike.

        The same bytes, or an export served here that arrived after the upload was stored (a
        newer nightly one, after a restart), change nothing.
        """
        served = self.snapshot
        if served and (served.file_mtime >= stored_at or (file_digest(served.source) or b"").hex() == sha256):
            return
        data = self.settings.data
        hidden = (data if data.is_dir() else data.parent) / f".shared-{os.getpid()}"
        try:
            fetch(hidden)
            if (file_digest(hidden) or b"").hex() != sha256:  # read short or changed: tried again at the next look
                log.warning("the upload %s in the shared database was not read whole; trying again", printable(name))
                return False
            named = hidden.with_name(hidden.name + (".xlsx" if file_kind(hidden) == "xlsx" else ".csv"))
            os.replace(hidden, named)
            hidden = named
            snapshot, _ = self.accept(hidden, made_at)
            hidden = None  # renamed into place
            log.info("loaded the upload %s another instance accepted: %d orders", printable(name), snapshot.orders)
        except UserError as error:
            self.note_refusal(error, "upload")
            log.warning("the upload %s another instance accepted is refused here: %s", printable(name), error)
        finally:
            if hidden:
                with suppress(OSError):
                    hidden.unlink()

    def share_export(self, path, snapshot):
        """An accepted upload, into the shared database for the other instances (nothing to do without one)."""
        if isinstance(self.store, SharedStore) and not self.store.store_export(
            path, (file_digest(path) or b"").hex(), snapshot.made, path.name
        ):
            log.warning(
                "upload: served here, but not stored in the shared database (%s): the other instances "
                "keep the export they have until it is uploaded again",
                "; ".join(self.store.trouble(time.time())) or "it could not be reached",
            )

    def note_fresher(self, moment):
        """An event brought the records up to moment: {records_updated} says so, if it is newer than the export."""
        snapshot, overlay = self.snapshot, self.overlay
        text = records_time(max(moment, snapshot.covers), snapshot.config)
        snapshot.renderer.records_text = text
        if overlay:
            overlay.renderer.records_text = text

    def keep_copy(self, snapshot):
        """Copy an accepted export to the state folder, for a restart after a bad night."""
        with self._copy_lock:
            self.copy(snapshot)

    def copy(self, snapshot):
        """keep_copy's work: the copy written aside, then renamed into place."""
        source, state = snapshot.source, self.settings.state
        target = state / ("last-good" + source.suffix.lower())
        partial = state / (".partial" + source.suffix.lower())
        try:
            if same_file_state(target, snapshot):
                self.copy_error = None
                return  # only contexts.toml changed
            state.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, partial)
            # The export's mtime, so the data's age stays honest after a restart from the copy;
            # not its mode, which may be read-only and would block the next copy.
            os.utime(partial, ns=(snapshot.file_mtime_ns, snapshot.file_mtime_ns))
            if not same_file_state(partial, snapshot):
                partial.unlink()  # the export changed while it was read; the next reload copies it
                return
            os.replace(partial, target)
            for other in state.glob("last-good.*"):
                if other != target:
                    other.unlink()
            write_record(state / ACCEPTED_FILE, snapshot, self.history)
            self.copy_error = None
        except OSError as e:
            with suppress(OSError):
                partial.unlink()  # a full disk must not keep half a copy
            self.copy_error = f"could not keep a copy of the export in {printable(state)} ({e.strerror})"
            log.warning(
                "%s; a restart after a bad export would fall back to an older copy, if any; tried again at every poll",
                self.copy_error,
            )

    def last_good_copy(self):
        """The copy of the last accepted export, if there is one."""
        state = self.settings.state
        copies = sorted(state.glob("last-good.*")) if state.is_dir() else []
        return copies[0] if copies else None

    def unavailable(self):
        """The JSON body of a fault: contexts.toml's `unavailable`, or the shipped wording before any load."""
        snapshot = self.snapshot
        return UNAVAILABLE if snapshot is None else message_body(snapshot.config, "unavailable")

    def health(self, now=None):
        """(healthy, reasons, age in seconds) of the data being served."""
        now = time.time() if now is None else now
        snapshot = self.snapshot
        if snapshot is None:
            return False, ["no data loaded"], None
        age = max(0.0, now - snapshot.made)
        reasons = []
        if snapshot.made > now + FUTURE_SLACK:
            reasons.append(
                f"the export's modification time ({iso_time(snapshot.made)}) is in the future, "
                "so its age is unknown: check the clock of the machine that wrote it"
            )
        elif age > snapshot.config.max_age_hours * 3600:
            reasons.append(
                f"the data is older than {snapshot.config.max_age_hours:g} hours: the nightly export did not "
                "arrive. Check the job that "
                + ("ORDERS_URL fetches it from (see the last fetch)" if self.fetcher else "writes or uploads it")
            )
        if self.from_last_good:
            reasons.append(
                f"serving the last good copy after a refused export: {self.refused['reason']}"
                if self.refused
                else "serving the last good copy after a refused export"
            )
        elif self.refused and self.refused["source"] != "fetch":  # a fetch's failures count in its job's trouble
            reasons.append(
                f"the last {'upload' if self.refused['source'] == 'upload' else 'export'} was refused: "
                f"{self.refused['reason']}"
            )
        if self.config_error:
            reasons.append(
                f"the last contexts.toml edit was refused, and the wording before it is served: {self.config_error}"
            )
        if self.copy_error:
            reasons.append(self.copy_error)
        for job in self.background:
            # Following the shared database is behind the other instances at once: a minute, not the data's age.
            stale_after = FOLLOWER_STALE_SECONDS if job is self.following else snapshot.config.max_age_hours * 3600
            if trouble := job.trouble(now, stale_after):
                reasons.append(trouble)
        if self.store_error:
            reasons.append(self.store_error)
        elif self.store:
            reasons.extend(self.store.trouble(now))
        return not reasons, reasons, age

    def status(self, now=None):
        """The details shown to a key holder: files, counts, timings, refusals; no customer data."""
        healthy, reasons, age = self.health(now)
        out = {
            "status": "ok" if healthy else "degraded",
            "reasons": reasons,
            "data_age_seconds": None if age is None else round(age),
        }
        snapshot = self.snapshot
        if snapshot:
            out.update(
                file=shown_name(snapshot.source),
                file_modified=iso_time(snapshot.made),
                from_last_good_copy=self.from_last_good,
                layout=snapshot.layout,
                orders=snapshot.orders,
                rows=snapshot.rows,
                loaded_at=iso_time(snapshot.loaded_at),
                load_seconds=round(snapshot.seconds, 3),
                max_age_hours=snapshot.config.max_age_hours,
            )
            if snapshot.packer.plan.detected:  # read because of their content, not a header: check them
                out["columns_found_by_content"] = {field: header for field, header, _ in snapshot.packer.plan.detected}
            out["rows_read"] = reading_counts(snapshot)
            if changed := (snapshot.reading or {}).get(
                "columns_changed"
            ):  # the header row changed: check the new choice
                out["columns_changed"] = [{"field": f, "was": was, "now": now} for f, was, now in changed]
            if relay := (snapshot.reading or {}).get("relay"):
                out["relay_addresses"] = relay
            out["notes"] = list(data_notes(snapshot))
        out["last_refused"] = self.refused
        out["config"] = "ok" if not self.config_error else self.config_error
        if self.webhooks:
            out["webhooks"] = self.webhooks.status()
        if self.settings.database_url:  # where the events and uploads are shared; never the user or password
            out["shared_database"] = {
                "url": shown_database(self.settings.database_url),
                "reachable": isinstance(self.store, SharedStore) and self.store.lost_since is None,
            }
        if self.fetcher:
            out["fetch"] = self.fetcher.status()
        return out


FOLLOWER_STALE_SECONDS = 60  # a follower failing this long makes /healthz degraded: this instance answers behind


def upload_time(stated, newest_day, served, now=None):
    """When an uploaded export was made, as well as it can be told, and never after its arrival.

    The sender's Last-Modified first; else the newest day its orders name (a file sent
    again shows its age); else no newer than the export it replaces.
    """
    now = time.time() if now is None else now
    for moment in (stated, newest_day, served.data_time if served else None):
        if moment is not None:
            return min(moment, now)
    return now


def with_made_at(snapshot, moment):
    """snapshot of an upload, dated when it was made (its file's own time is its arrival)."""
    snapshot = replace(snapshot, made_at=moment)
    dated_by(snapshot)
    return snapshot


UPLOADED_FILE = "uploaded.json"  # in STATE_DIR: when the upload being served was made, for a restart


def write_upload_record(path, snapshot):
    """Note when an accepted upload was made, so that a restart dates it the same (see dated_upload)."""
    with suppress(OSError):
        path.write_text(
            json.dumps(
                {"file_size": snapshot.file_size, "file_mtime_ns": snapshot.file_mtime_ns, "made_at": snapshot.made_at}
            )
        )


def dated_upload(snapshot, path):
    """snapshot dated as its upload was, when it reads the file that write_upload_record noted; else as it is."""
    try:
        record = json.loads(path.read_text())
        if (record["file_size"], record["file_mtime_ns"]) == (snapshot.file_size, snapshot.file_mtime_ns):
            return with_made_at(snapshot, float(record["made_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return snapshot


def same_file_state(path, snapshot):
    """True when path has the size and mtime the snapshot was read from."""
    return file_state(path)[1:] == (snapshot.file_size, snapshot.file_mtime_ns)


###############################################################################
# Status page #################################################################
###############################################################################
#
# /status: the state of the service in plain words for the merchant, the reason of a
# degraded state first, with what to do; a lookup form. Uses the serving state above.

PAGE_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    # One page, no external assets: nothing may load, frame it, or be sent elsewhere.
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" with the form's
    # own POST, and over plain HTTP no Sec-Fetch-Site either, so same_origin() could not tell.
    ("Referrer-Policy", "same-origin"),
]

# Made-up values to show each template the way the chat agent would read it.
SAMPLE_VALUES = {
    "order_id": "#1001",
    "items": "2 x Merino Wool Socks, 1 x Beanie",
    "item_count": "3",
    "shipped_items": "2 x Merino Wool Socks",
    "unshipped_items": "1 x Beanie",
    "tracking_number": "1Z999AA10123456784",
    "tracking_numbers": "1Z999AA10123456784",
    "tracking_url": "https://www.ups.com/track?tracknum=1Z999AA10123456784",
    "carrier": "UPS",
    "estimated_delivery": "2026-12-02",
    "order_date": "2026-11-27",
    "shipped_at": "2026-11-28",
    "status": "fulfilled",
    "financial_status": "paid",
    "missing": "the email address used for the order",
    "records_updated": "28 Nov 2026, 02:15 UTC",
}


FRESHNESS_WORDS = {"green": "healthy", "amber": "degraded", "red": "stale"}


def freshness(service):
    """(green, amber or red; why; the data's age) for the page's badge."""
    healthy, reasons, age = service.health()
    if service.snapshot is None:
        return "red", ["no data loaded"], age
    limit = service.snapshot.config.max_age_hours * 3600
    if age > limit:
        return "red", reasons, age
    if not healthy:
        return "amber", reasons, age
    if age > limit * 0.75:
        return "amber", ["the data will be stale soon: is tonight's export on its way?"], age
    return "green", ["data loaded and fresh"], age


def public_view(service):
    """What anyone may see: healthy or not, and the data's age."""
    color, _, age = freshness(service)
    return {"color": color, "word": FRESHNESS_WORDS[color], "age": describe_age(age)}


def status_view(service, tried):
    """Everything a key holder sees; customer data only in the lookup they asked for."""
    color, reasons, age = freshness(service)
    config = service.snapshot.config if service.snapshot else None
    status, snapshot = service.status(), service.snapshot
    view = {
        "color": color,
        "word": FRESHNESS_WORDS[color],
        "reasons": reasons,
        "status": status,
        "age": describe_age(age),
        "tried": tried,
        "rules": [],
        "templates": [],
        "day": service.insights.day() if service.insights else None,
        "times": {},
    }
    refused = status["last_refused"]
    view["times"] = {
        "exported": plain_time(snapshot.made) if snapshot else "",
        "records": snapshot.renderer.records_text if snapshot else "",
        "loaded": plain_time(snapshot.loaded_at) if snapshot else "",
        "refused": plain_time(moment_of(refused["at"])) if refused else "",
        "fetched": plain_time(moment_of(status["fetch"]["last_success"])) if status.get("fetch") else "",
        "lag": f" (the file's time less export_lag_hours = {config.export_lag_hours:g})"
        if config and config.export_lag_hours
        else "",
        "events": {
            platform: plain_time(moment_of(counts["last_event"])) if counts["last_event"] else "none yet"
            for platform, counts in (status.get("webhooks") or {}).items()
        },
    }
    view["rules_said"] = f"{plural(len(config.rules), 'rule')}, then the default" if config else ""
    if config:
        view["rules"] = [(rule.number, describe_when(rule), rule.template) for rule in config.rules]
        view["rules"].append(("", "no rule matches: the default answer", config.default_template))
        view["templates"] = [(name, sample_text(template)) for name, template in config.templates.items()]
    return view


def describe_when(rule):
    """A rule's conditions in words: status is shipped or delivered, tracking_url is filled."""
    if not rule.conditions:
        return "always"
    parts = [
        f"{name} is filled" if wanted is None else f"{name} is {' or '.join(sorted(wanted))}"
        for name, wanted in rule.conditions
    ]
    return ", and ".join(parts)


def sample_text(template):
    """A template rendered on made-up values (any other column shows as its name)."""
    return template.render({f: SAMPLE_VALUES.get(f, f"[{f}]") for f in template.fields})


def describe_age(age):
    """'3 min', '5 h 12 min', '3 days': an age in seconds as a person says it."""
    if age is None:
        return "no data"
    minutes = int(age // 60)
    if minutes < 1:
        return "less than a minute"
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"
    return f"{minutes // 1440} days"


def plain_time(timestamp, now=None):
    """'3 Dec, 03:35 UTC (3 min ago)': a moment as a person reads it; the year only when it is not this one."""
    if timestamp is None:
        return "never"
    now = time.time() if now is None else now
    moment, today = datetime.fromtimestamp(timestamp, UTC), datetime.fromtimestamp(now, UTC)
    day = f"{moment.day} {moment:%b}" + (f" {moment.year}" if moment.year != today.year else "")
    away = now - timestamp
    when = f"in {describe_age(-away)}" if away < -60 else "just now" if away < 60 else f"{describe_age(away)} ago"
    return f"{day}, {moment:%H:%M} UTC ({when})"


def moment_of(iso):
    """The timestamp of an ISO 8601 time that status() gave, or None."""
    return datetime.fromisoformat(iso).timestamp() if iso else None


def try_lookup(service, order_id, email):
    """The status and JSON the chat platform would get for this lookup."""
    if service.snapshot is None:
        return {"status": "503 Service Unavailable", "body": service.unavailable().decode()}
    status, body = answer(service.snapshot, order_id, email, service.overlay)
    return {
        "status": STATUS_LINES[status],
        "body": body.decode(),
        "order_id": order_id,
        "email": email,
    }


PAGE_STYLE = """<style>
body{font:16px/1.5 system-ui,sans-serif;margin:0 auto;max-width:52rem;padding:1rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
.badge{display:inline-block;padding:.2rem .7rem;border-radius:1rem;color:#fff;font-weight:600}
.green{background:#1a7f37}.amber{background:#b35900}.red{background:#c62828}
table{border-collapse:collapse;width:100%}td,th{text-align:left;vertical-align:top;padding:.35rem;border-bottom:1px solid #ddd}
td,th,li,code{overflow-wrap:break-word}
#data td,#templates td,#webhooks td,#not-found td:not(:first-child),#not-found code{overflow-wrap:anywhere}
#tried{scroll-margin-top:1rem}
@media (max-width:40rem){
#webhooks,#hours,#not-found{font-size:.85rem}
#webhooks :is(td,th),#hours :is(td,th),#not-found :is(td,th){padding:.35rem .2rem}
.wide{overflow-x:auto}
#rules tr:first-child{display:none}
#data tr{display:block;border-bottom:1px solid #ddd;padding:.35rem 0}
#data th,#data td{display:block;border:0;padding:.1rem .35rem}
#data th{font-weight:600;color:#555;font-size:.9rem}
#rules tr,#templates tr{display:block;border-bottom:1px solid #ddd;padding:.35rem 0}
#rules td,#templates th,#templates td{display:block;border:0;padding:.1rem .35rem}
#rules td:first-child,#rules td:nth-child(2){display:inline}
#rules td:last-child::before{content:"answer: "}
}
pre{background:#f4f4f4;padding:.7rem;white-space:pre-wrap;overflow-wrap:anywhere}
input{font:inherit;padding:.4rem;width:100%;box-sizing:border-box;margin:.2rem 0 .6rem}
button{font:inherit;padding:.5rem 1rem}code{background:#f4f4f4;padding:0 .2rem}
summary{cursor:pointer;font-weight:600;margin-top:1.5rem}
</style>"""  # noqa: E501 - CSS rules kept one to a line


def html_page(title, body):
    """An HTML page: the doctype first (else browsers render in quirks mode), then the head, then body."""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
        f"{PAGE_STYLE}</head><body>{body}</body></html>\n"
    )


PUBLIC_PAGE = bottle.SimpleTemplate(
    html_page(
        "Order lookup",
        """
<h1>Order lookup <span class="badge {{color}}" id="freshness">{{word}}</span></h1>
<p>Data age: {{age}}.</p>
<p>Details are for the shop's staff: <a href="/?login">sign in</a> with any user name and the
API key as the password.</p>
""",
    )
)

# Freshness, its problem and the lookup form first: what a merchant checks on a phone. The
# form posts to #tried, so the browser lands on the result; rules and answers are folded.
STATUS_PAGE = bottle.SimpleTemplate(
    html_page(
        "Order lookup status",
        """
<h1>Order lookup <span class="badge {{color}}" id="freshness">{{word}}</span></h1>
<ul id="reasons">
% for reason in reasons:
<li>{{reason}}</li>
% end
</ul>
% if status.get("notes"):
<ul id="notes">
% for note in status["notes"]:
<li>{{note}}</li>
% end
</ul>
% end
<h2 id="try">Try a lookup</h2>
<form method="post" action="/#tried" autocomplete="off">
<label>Order number <input name="order_id" value="{{tried["order_id"] if tried and "order_id" in tried else ""}}"></label>
<label>Email <input name="customer_email" type="email" value="{{tried["email"] if tried and "email" in tried else ""}}"></label>
<button>Look up</button></form>
% if tried:
<div id="tried">
<p>The chat platform would get <strong id="tried-status">{{tried["status"]}}</strong> and:</p>
<pre id="tried-body">{{tried["body"]}}</pre>
</div>
% end
<h2>Data</h2>
<table id="data">
<tr><th>File served</th><td>{{status.get("file", "none")}}{{" (the last good copy)" if status.get("from_last_good_copy") else ""}}</td></tr>
<tr><th>Kind of export</th><td>{{status.get("layout", "")}}</td></tr>
<tr><th>Exported (the file's time)</th><td id="exported">{{times["exported"]}}</td></tr>
<tr><th>Records hold orders until about (said when not found)</th><td id="records">{{times["records"]}}{{times["lag"]}}</td></tr>
<tr><th>Orders / rows</th><td>{{status.get("orders", 0)}} / {{status.get("rows", 0)}}</td></tr>
<tr><th>Last load</th><td id="loaded">{{times["loaded"]}}, took {{status.get("load_seconds", "")}} s</td></tr>
% if status.get("fetch"):
<tr><th>Last fetch from ORDERS_URL</th><td id="fetched">{{times["fetched"]}}{{"; failing: " + status["fetch"]["last_error"] if status["fetch"]["failures_in_a_row"] else ""}}</td></tr>
% end
<tr><th>Last refused</th><td id="refused">{{(times["refused"] + (", for the reason at the top" if any(status["last_refused"]["reason"] in r for r in reasons) else ": " + status["last_refused"]["reason"])) if status["last_refused"] else "none since the last export was served"}}</td></tr>
<tr><th>contexts.toml</th><td>{{status["config"]}}</td></tr>
</table>
% if status.get("webhooks"):
<h2>Webhook events</h2>
<table id="webhooks"><tr><th>shop</th>
% for platform in status["webhooks"]:
<th>{{platform}}</th>
% end
</tr>
% for label, key in (("received since the service started", "received"), ("applied since the service started", "applied"), ("rejected since the service started", "rejected"), ("last event (stored)", "last_event"), ("orders answered from stored events", "orders_from_events")):
<tr><th>{{label}}</th>
% for platform, counts in status["webhooks"].items():
<td>{{counts[key] if key != "last_event" else times["events"][platform]}}</td>
% end
</tr>
% end
</table>
% end
% if day:
<h2>Lookups, last 24 hours</h2>
<p id="day-summary">{{day["lookups"]}} lookups{{"" if day["not_found_share"] is None else f"; {day['not_found_share']:.0%} of those answered were not found"}}{{"" if day["p50_ms"] is None else f"; answered in {day['p50_ms']:g} ms or less at the median, {day['p99_ms']:g} ms or less at the 99th percentile"}}. Counted since the service started, at most a day back.</p>
% if day["hours"]:
<div class="wide"><table id="hours"><tr><th>UTC</th>{{!"".join(f"<th>{heading}</th>" for _, heading in day["columns"])}}</tr>
% for hour, counts in day["hours"]:
<tr><td>{{hour}}</td>{{!"".join(f"<td>{counts[o]}</td>" for o, _ in day["columns"])}}</tr>
% end
</table></div>
% end
% if day["recent_not_found"]:
<details id="not-found-fold" open><summary>The last {{len(day["recent_not_found"])}} not found: the number as typed (letters and digits only), and the email</summary>
<p>A number customers type otherwise than the export writes it (SO-1001 for 1001) shows here: fix [columns] or the order format given to the chat platform.</p>
<table id="not-found"><tr><th>time (UTC)</th><th>number</th><th>email</th></tr>
% for moment, number, email in day["recent_not_found"]:
<tr><td>{{moment[:19].replace("T", " ")}}</td><td><code>{{number or "-"}}</code></td><td>{{email}}</td></tr>
% end
</table>
</details>
% end
% end
<details id="rules-fold"><summary>Rules: the first that matches picks the answer ({{rules_said}})</summary>
<table id="rules"><tr><th>#</th><th>when</th><th>answer</th></tr>
% for number, when, template in rules:
<tr><td>{{number}}</td><td>{{when}}</td><td><code>{{template}}</code></td></tr>
% end
</table>
</details>
<details id="templates-fold"><summary>Answers, shown on a made-up order ({{len(templates)}})</summary>
<table id="templates">
% for name, text in templates:
<tr><th><code>{{name}}</code></th><td>{{text}}</td></tr>
% end
</table>
</details>
""",  # noqa: E501 - the template's HTML kept one element to a line
    )
)


FORBIDDEN_PAGE = html_page(
    "Order lookup",
    """
<h1>Not sent from this page</h1><p>The lookup form works only from the status page itself.
<a href="/">Open it</a> and try again.</p>
""",
)


ERROR_TEXTS = {
    404: "There is nothing at this address. Orders are looked up at /lookup.",
    429: "Too many wrong API keys from this address. Try again later with the right key.",
}


def json_error(error, service):
    """Bottle's errors (404, 405, 500, ...) as JSON, never an HTML page or a traceback."""
    bottle.response.content_type = JSON
    if error.status_code >= 500:
        return service.unavailable()
    text = ERROR_TEXTS.get(error.status_code, "The request could not be handled.")
    if error.status_code == 405:  # the methods the address does answer, as its Allow header says
        allowed = [m for m in error.headers.get("Allow", "GET").split(",") if m.strip() not in ("HEAD", "")]
        text = f"This address only answers {' or '.join(m.strip() for m in allowed)} requests."
    return json.dumps({"context": text})


###############################################################################
# HTTP routes #################################################################
###############################################################################
#
# The app factory: Bottle routes for /lookup, /healthz, /metrics, /export, /webhooks and the
# status page, API keys compared in constant time, throttling of guessing clients, every
# error as JSON. Uses everything above.


def key_ok(keys, given):
    """Constant-time check of a raw x-api-key header value against every configured key (as bytes)."""
    if not given or not keys:
        return False
    given = given.encode("latin-1", "replace")  # WSGI hands headers over as Latin-1 text
    ok = False
    for key in keys:  # no early exit: the time taken does not tell which key matched
        ok |= hmac.compare_digest(given, key)
    return ok


class Throttle:
    """Counts wrong keys per client (an IPv6 client per /64); past the limit it gets 429 for a while.

    Clients sit in the order their window began: finished windows leave from the front,
    and under a spray of addresses the oldest make room. O(1) a request, and never more
    than max_clients entries. The right key is checked first and never throttled.
    """

    def __init__(self, limit, window=60.0, max_clients=10_000):
        self.limit, self.window, self.max_clients = limit, window, max_clients
        self.failures = OrderedDict()  # client -> [window start, count]
        self.lock = threading.Lock()

    def retry_after(self, address, now=None):
        """Seconds until address may try a key again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        start, count = self.failures.get(client_of(address), (now, 0))
        if count < self.limit or now - start >= self.window:
            return 0
        return max(1, round(start + self.window - now))

    def failed(self, address, now=None):
        """Count one wrong key from address."""
        now = time.monotonic() if now is None else now
        client = client_of(address)
        with self.lock:
            failures = self.failures
            while failures and now - next(iter(failures.values()))[0] >= self.window:
                failures.popitem(last=False)
            entry = failures.get(client)
            if entry is not None:
                entry[1] += 1
                return
            if len(failures) >= self.max_clients:
                failures.popitem(last=False)
            failures[client] = [now, 1]


def client_of(address):
    """Who a wrong key is counted against: the address, or for IPv6 its /64 (one subscriber's range)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


LOOKUP_PARAMS = ("order_id", "customer_email")


def request_body(environ, limit):
    """The request's body, at most limit bytes (waitress has refused a longer one with 413 already)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit:
        raise bottle.HTTPError(413)
    return environ["wsgi.input"].read(length) if length > 0 else b""


def lookup_params(query_string):
    """(order_id, customer_email) from a raw query string: the first of each, None if not UTF-8.

    Bottle's request.query would decode every parameter; a lookup needs two, and this
    is on every request's path.
    """
    found = {}
    for pair in query_string.split("&"):
        name, _, value = pair.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if name in LOOKUP_PARAMS and name not in found:
            # The usual value escapes only '#' and '@' ("%231001", "jane%40example.com"): two C-speed
            # replaces then, where the general decoding below costs a microsecond more a lookup.
            plain = value.replace("%23", "#").replace("%40", "@")
            if "%" not in plain and "+" not in plain and plain.isascii():
                found[name] = plain
                continue
            try:  # WSGI gives the query as Latin-1 text: back to its bytes, then strict UTF-8
                found[name] = unquote_to_bytes(value.encode("latin-1").replace(b"+", b" ")).decode("utf-8")
            except UnicodeError:
                found[name] = None
    return found.get("order_id", ""), found.get("customer_email", "")


CONTEXT_BODY = {
    "type": "object",
    "required": ["context"],
    "additionalProperties": False,
    "properties": {
        "context": {
            "type": "string",
            "description": "What the chat agent words its answer from; always says whether the order was found.",
        }
    },
}
FOUND_BODY = {
    "type": "object",
    "required": ["context", "tracking_url"],
    "additionalProperties": False,
    "properties": {
        "context": {"type": "string"},
        "tracking_url": {
            "type": ["string", "null"],
            "pattern": "^https?://",
            "description": "A tracking link, or null.",
        },
    },
}
HEALTH_BODY = {
    "type": "object",
    "required": ["status", "data_age_seconds"],
    "properties": {
        "status": {"enum": ["ok", "degraded"]},
        "data_age_seconds": {"type": ["integer", "null"]},
        "reasons": {"type": "array", "items": {"type": "string"}},
        "file": {"type": "string"},
        "file_modified": {"type": "string"},
        "from_last_good_copy": {"type": "boolean"},
        "layout": {"type": "string"},
        "orders": {"type": "integer"},
        "rows": {"type": "integer"},
        "loaded_at": {"type": "string"},
        "load_seconds": {"type": "number"},
        "max_age_hours": {"type": "number"},
        "webhooks": {
            "type": "object",
            "description": "Per shop platform: events received, applied, rejected, the "
            "last event's time, orders answered from events.",
        },
        "last_refused": {"type": ["object", "null"]},
        "config": {"type": "string"},
        "columns_found_by_content": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Fields read from a column chosen by its content, not a header.",
        },
        "fetch": {"type": "object", "description": "ORDERS_URL: the last fetch, its outcome, failures."},
        "rows_read": {
            "type": "object",
            "description": "What reading the export left out (rows by reason: no order "
            "number, a footer, lines before the header), item rows "
            "attached to the order above, cells withheld as damaged.",
        },
        "columns_changed": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "was": {"type": "string"}, "now": {"type": "string"}},
            },
            "description": "The export's header row changed since the last export accepted, and these fields are "
            "now read from another column: check that each is right.",
        },
        "relay_addresses": {
            "type": "object",
            "description": "A marketplace's relay e-mail addresses in the export: "
            "customers do not know them, so lookups by their own "
            "address will not find those orders.",
        },
        "notes": {
            "type": "array",
            "items": {"type": "string"},
            "description": "What to know about the export served that is no fault (relay addresses, a "
            "changed header row), as check and the status page say it.",
        },
    },
}


def json_response(description, schema, headers=None):
    """One OpenAPI response object with a JSON body."""
    response = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


OPENAPI = {
    "openapi": "3.1.0",
    "info": {
        "title": "Order lookup",
        "version": __version__,
        "description": "Answers a chat agent's order-tracking lookups from a shop's orders export.",
    },
    "components": {"securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
    "paths": {
        "/lookup": {
            "get": {
                "summary": "Look an order up by its number and the customer's email",
                "security": [{"apiKey": []}],
                "parameters": [
                    {
                        "name": "order_id",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "maxLength": MAX_ORDER_ID},
                        "example": "#1001",
                        "description": "The order number; '#', spaces, punctuation and case are ignored.",
                    },
                    {
                        "name": "customer_email",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "maxLength": MAX_EMAIL},
                        "example": "jane@example.com",
                        "description": "The email of the order; case and surrounding spaces are ignored.",
                    },
                ],
                "responses": {
                    "200": json_response("The order was found.", FOUND_BODY),
                    "400": json_response(
                        "A parameter is missing, blank or not valid; the context says what to ask for.", CONTEXT_BODY
                    ),
                    "401": {
                        "description": "The x-api-key header is missing or wrong. Empty body.",
                        "content": {JSON: {"schema": {"type": "string", "maxLength": 0}}},
                    },
                    "404": json_response(
                        "No order with that number and that email. The same whether or not the number exists.",
                        CONTEXT_BODY,
                    ),
                    "429": json_response(
                        "Too many wrong keys from this address.",
                        CONTEXT_BODY,
                        {"Retry-After": {"schema": {"type": "string"}}},
                    ),
                    "500": json_response("The service has a fault.", CONTEXT_BODY),
                    "503": json_response("No data is loaded yet.", CONTEXT_BODY),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Health and data age for uptime monitors; details with a valid key",
                "security": [{}, {"apiKey": []}],
                "responses": {
                    "200": json_response("Healthy: data loaded, fresh, nothing refused.", HEALTH_BODY),
                    "503": json_response("Degraded: stale data, a refused export or config, or no data.", HEALTH_BODY),
                    "429": json_response("Too many wrong keys from this address.", CONTEXT_BODY),
                },
            }
        },
    },
}


class Gate:
    """The keys a request may carry, and the throttle that stops a client guessing them."""

    def __init__(self, settings):
        self.keys = tuple(key.encode("utf-8") for key in settings.api_keys)
        self.upload_keys = tuple(key.encode("utf-8") for key in settings.upload_keys)
        self.throttle = Throttle(settings.key_failures_per_minute)

    def check_key(self, environ, required):
        """True for a valid key; counts wrong ones and stops a guessing client with 429."""
        # The raw value: Bottle's headers decode as UTF-8 and raise on any other byte.
        given = environ.get("HTTP_X_API_KEY")
        if key_ok(self.keys, given):
            return True  # the right key is never throttled
        if given:
            self.failed(environ)
        if required:
            raise bottle.HTTPResponse(b"", 401, content_type=JSON)
        return False

    def signed_in(self, environ):
        """(key valid, a password given): the key in x-api-key or as the password of HTTP Basic (any user name)."""
        password = (bottle.parse_auth(environ.get("HTTP_AUTHORIZATION", "")) or ("", ""))[1]
        if password:
            environ["HTTP_X_API_KEY"] = password.encode("utf-8").decode("latin-1")
        return self.check_key(environ, required=False), bool(password)

    def failed(self, environ):
        """Count a wrong key or signature from this client; 429 once it has had too many."""
        # REMOTE_ADDR, not Bottle's remote_addr, which believes any X-Forwarded-For: waitress
        # rewrites REMOTE_ADDR from the proxy's headers only for a TRUSTED_PROXY.
        address = environ.get("REMOTE_ADDR") or "-"
        if wait := self.throttle.retry_after(address):
            raise bottle.HTTPError(429, retry_after=str(wait))
        self.throttle.failed(address)


def lookup_answer(service, environ):
    """(HTTP status, JSON body) of GET /lookup whose key was checked."""
    order_id, email = lookup_params(environ.get("QUERY_STRING", ""))
    environ["orders.lookup"] = (order_id, email)  # for the log line, worked out off the request's path
    snapshot = service.snapshot
    if snapshot is None:
        return 503, service.unavailable()
    return answer(snapshot, order_id, email, service.overlay)


def create_app(service, write_request=None):
    """The WSGI application: Bottle routes wrapped in the request log (see RequestLog for write_request).

    Without write_request (tests, `quiet`), each request is logged and counted as it ends;
    `serve` passes the log thread's queue, which counts them off the request's path.
    """
    if write_request is None:
        write_request = (
            RequestLog.log_request
            if service.insights is None
            else (lambda entry: (RequestLog.log_request(entry), service.insights.observe((entry,))))
        )
    app = bottle.Bottle()
    app.config["catchall"] = True
    # Every route returns its body ready-made: the JSON and template plugins would only wrap
    # each call in one more function.
    app.uninstall(True)
    gate = Gate(service.settings)
    add_lookup_routes(app, service, gate)
    add_source_routes(app, service, gate)
    add_page_routes(app, service, gate)
    app.default_error_handler = lambda error: json_error(error, service)
    keys = gate.keys

    def lookup(environ):
        """A lookup with a valid key, answered before Bottle; None leaves the others to its route."""
        return lookup_answer(service, environ) if key_ok(keys, environ.get("HTTP_X_API_KEY")) else None

    return RequestLog(app, write_request, service.unavailable, lookup)


def add_lookup_routes(app, service, gate):
    """/lookup for the chat platform; /healthz, /livez and /openapi.json for monitors and tools."""

    @app.get("/lookup")
    def lookup():
        """A lookup without a valid key (RequestLog answers the others first), and HEAD."""
        environ = bottle.request.environ  # once: each bottle.request attribute goes through a thread-local
        bottle.response.content_type = JSON
        gate.check_key(environ, required=True)
        status, body = lookup_answer(service, environ)
        if status != 200:  # a response starts as 200
            bottle.response.status = status
        return body

    @app.get("/healthz")
    def healthz():
        bottle.response.content_type = JSON
        detailed = gate.check_key(bottle.request.environ, required=False)
        healthy, _, age = service.health()
        bottle.response.status = 200 if healthy else 503
        if detailed:
            return json.dumps(service.status())
        return json.dumps(
            {"status": "ok" if healthy else "degraded", "data_age_seconds": None if age is None else round(age)}
        )

    @app.get("/livez")
    def livez():
        bottle.response.content_type = JSON
        bottle.response.status = 200 if service.snapshot else 503
        return json.dumps({"serving": service.snapshot is not None})

    @app.get("/openapi.json")
    def openapi():
        bottle.response.content_type = JSON
        return json.dumps(OPENAPI)


def add_source_routes(app, service, gate):
    """The ways data arrives over HTTP: the shops' webhooks and uploads of the export."""

    @app.route("/webhooks/<platform>", method=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    def webhook(platform):
        environ = bottle.request.environ
        bottle.response.content_type = JSON
        if platform not in service.settings.webhook_secrets:
            raise bottle.HTTPError(404)  # exactly as any unknown address, while its secret is unset
        if environ["REQUEST_METHOD"] != "POST":
            raise bottle.HTTPError(405, Allow="POST")
        body = request_body(environ, WEBHOOK_MAX_BYTES)
        status, payload = service.webhooks.receive(platform, environ, body)
        if status == 401:  # a signed event is never throttled: a shop's addresses are shared by many shops
            gate.failed(environ)
        bottle.response.status = status
        return payload

    @app.route("/export", method=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    def export_upload():
        environ = bottle.request.environ
        bottle.response.content_type = JSON
        if not gate.upload_keys:
            raise bottle.HTTPError(404)  # exactly as any unknown address, while UPLOAD_KEY is unset
        if environ["REQUEST_METHOD"] not in ("PUT", "POST"):
            raise bottle.HTTPError(405, Allow="PUT,POST")
        # The key first, as for lookups: the right one is never throttled, whoever else shares its address.
        if not key_ok(gate.upload_keys, environ.get("HTTP_X_UPLOAD_KEY")):  # the chat platform's key changes no data
            gate.failed(environ)
            log.warning(
                "upload: %s bytes: refused, a wrong or missing x-upload-key", environ.get("CONTENT_LENGTH") or 0
            )
            raise bottle.HTTPResponse(b"", 401, content_type=JSON)
        status, body = receive_upload(service, environ)
        bottle.response.status = status
        return body


def add_page_routes(app, service, gate):
    """What people and Prometheus read, behind the key: the status page at / and /metrics."""
    # Made at the first scrape: importing prometheus_client takes 70 ms, which every start
    # would otherwise spend before its first answer.
    made, making = [], threading.Lock()

    @app.get("/metrics")
    def metrics():
        if service.insights is None:
            raise bottle.HTTPError(404)  # METRICS=no: no such address
        if not gate.signed_in(bottle.request.environ)[0]:  # Prometheus: basic_auth with the key as password
            raise bottle.HTTPResponse(
                b"", 401, content_type=JSON, WWW_Authenticate='Basic realm="Order lookup metrics", charset="UTF-8"'
            )
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        with making:
            if not made:
                made.append(metrics_registry(service))
        bottle.response.content_type = CONTENT_TYPE_LATEST
        return generate_latest(made[0])

    @app.route("/", method=["GET", "POST"])
    def status_page():
        for name, value in PAGE_HEADERS:
            bottle.response.set_header(name, value)
        allowed, password = gate.signed_in(bottle.request.environ)
        if not allowed:
            if "login" in bottle.request.query or password:
                bottle.response.status = 401
                bottle.response.set_header("WWW-Authenticate", 'Basic realm="Order lookup status", charset="UTF-8"')
            return PUBLIC_PAGE.render(public_view(service))
        tried = None
        if bottle.request.method == "POST":
            environ = bottle.request.environ
            if not same_origin(environ):  # a page elsewhere must not make a signed-in browser look orders up
                bottle.response.status = 403
                return FORBIDDEN_PAGE
            form = bottle.request.forms
            order_id, email = form.getunicode("order_id", ""), form.getunicode("customer_email", "")
            environ["orders.lookup"] = (order_id, email)  # logged as a lookup is
            tried = try_lookup(service, order_id, email)
        return STATUS_PAGE.render(status_view(service, tried))


def same_origin(environ):
    """True when a form was posted from this service's own page: the browser says so, or its Origin is this host."""
    site = environ.get("HTTP_SEC_FETCH_SITE")
    if site:
        return site == "same-origin"
    source = environ.get("HTTP_ORIGIN") or environ.get("HTTP_REFERER") or ""
    host = environ.get("HTTP_HOST", "")
    return bool(host) and urlsplit(source).netloc == host


###############################################################################
# The server: waitress and its limits #########################################
###############################################################################
#
# Serving the app with waitress: threads, request and header limits, the real client
# address behind a proxy, a clean stop on SIGTERM.


def keep_to_one_cpu(chosen=None, port=0):
    """Keep every thread of this process on one CPU: chosen, else the one fewest other instances hold.

    Returns that CPU, or None when there is no choice (or no way) to make.
    """
    # Only one thread runs Python at a time, so a second CPU adds little but the cost of
    # waking threads across CPUs for every request. Measured by bench/run.py (ONE_CPU=yes and
    # no in turn, 2-CPU virtual machine, 2026-12-03): 3,474 lookups a second against 2,519
    # (1.38x), p99 13 ms against 18; behind nginx, by hand, about twice as many.
    if not hasattr(os, "sched_getaffinity"):  # not Linux: leave it to the system
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if chosen is not None and chosen not in allowed:
        raise SettingsError(
            f"CPU={chosen}: this process may use CPU {', '.join(map(str, allowed))} only; choose one of them."
        )
    if chosen is None and len(allowed) < 2:
        return None
    if chosen is None:
        # Instances of several shops, or replicas, must not pile onto one CPU. Ties go by the
        # port, so that two instances started at the same moment still part.
        held = Counter(other_instances_cpus())
        chosen = min(allowed, key=lambda c: (held[c], (allowed.index(c) - port) % len(allowed)))
    cpu = chosen
    try:
        os.sched_setaffinity(0, {cpu})  # this thread, and so every thread it starts from now on
    except OSError:  # not allowed here (a sandbox): leave it to the system, and say nothing
        return None
    for thread in os.listdir("/proc/self/task"):  # threads already started (the log's)
        with suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(thread), {cpu})
    return cpu


def other_instances_cpus():
    """The CPU each other running instance of this service keeps to (from /proc); those free to move left out."""
    ours = os.path.realpath(__file__)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            if not any(
                arg.endswith("app.py")
                and os.path.realpath(
                    os.path.join(os.readlink(f"/proc/{entry.name}/cwd") if not os.path.isabs(arg) else "/", arg)
                )
                == ours
                for arg in argv
            ):
                continue
            with open(f"/proc/{entry.name}/status") as f:
                allowed = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list:"))
        except (OSError, StopIteration):  # gone meanwhile, or another user's
            continue
        if allowed.isdigit():  # kept to one CPU
            yield int(allowed)


M_ARENA_MAX = -8  # glibc's mallopt parameter for how many malloc arenas threads may spread over


def limit_malloc_arenas(arenas=2):
    """Have glibc's malloc keep to a few arenas, so that memory freed by one thread is reused by the next."""
    # By default glibc gives threads up to 8 arenas a CPU; waitress's threads each take
    # one, and buffers freed in one arena are not reused by a thread in another. Over a
    # soak with steady lookups, events and uploads, resident memory grew 83 MB an hour;
    # with two arenas it levelled off (bench/soak.py, docs/PERFORMANCE.md#soak). The GIL
    # already serialises the threads, so they lose nothing by sharing.
    with suppress(OSError, AttributeError):  # not glibc (musl, macOS): its malloc has no such knob
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)


def make_server(app, settings, **overrides):
    """A waitress server for app, chosen so stalled clients cannot lock the platform out."""
    import waitress.server

    options = waitress_options(settings)
    options.update(overrides)
    server = waitress.server.create_server(app, **options)
    # A host with several addresses (localhost: ::1 and 127.0.0.1) makes one server per address.
    listening = (
        [server] if hasattr(server, "maintenance") else [s for s in server.map.values() if hasattr(s, "maintenance")]
    )
    channel = guarded_channel(settings)
    for each in listening:
        each.channel_class = channel
        close_slow_requests(each, settings.request_seconds)
    return server


def cannot_listen(settings, error):
    """Why the server cannot listen, and what to do, in one line."""
    import errno

    where = f"{settings.host}:{settings.port}"
    if error.errno == errno.EADDRINUSE:
        return (
            f"port {settings.port} on {settings.host} is already in use (another instance of this service, or "
            f"another program: `ss -ltnp 'sport = :{settings.port}'` names it). Stop it, or set PORT to a free port."
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"not allowed to listen on {where}: ports below 1024 need root. Set PORT to 1024 or above (8080)."
    if error.errno == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
        return f"cannot listen on {where}: {settings.host} is not an address of this machine. Set HOST (127.0.0.1)."
    return f"cannot listen on {where}: {error.strerror or error}. Check HOST and PORT."


def listen_port(server):
    """The port a server listens on (a host with several addresses makes several servers)."""
    return getattr(server, "effective_port", None) or server.effective_listen[0][1]


def guarded_channel(settings):
    """Waitress's channel, timing each request's arrival and answering what it rejects itself in JSON.

    Bodies are limited to 64 KB, but for webhooks of a platform whose secret is set (2 MB) and an
    upload that carries the upload key (MAX_EXPORT_MB, and all the time it needs to arrive): an
    unknown client cannot make the server take in a large body.
    """
    upload_keys = tuple(key.encode("utf-8") for key in settings.upload_keys)
    webhook_paths = frozenset(settings.webhook_secrets or ())
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            body = json.dumps({"context": f"The request was rejected: {error.reason}."}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.extend([("Content-Type", JSON), *COMMON_HEADERS])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class TimedParser(HTTPRequestParser):
        """Remembers when a request's first byte arrived (see close_slow_requests); lets webhooks, uploads be larger."""

        patient = False  # an upload with the right key: no deadline for its body to arrive

        def __init__(self, adj):
            super().__init__(adj)
            self.began = time.monotonic()

        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            limit = None
            if self.path.startswith("/webhooks/") and self.path[10:] in webhook_paths:  # a platform with a secret
                limit = WEBHOOK_MAX_BYTES + 1
            elif self.path == "/export" and key_ok(upload_keys, self.headers.get("X_UPLOAD_KEY", "")):
                limit, self.patient = int(settings.max_export_mb * 1e6) + 1, True
            if limit:
                self.adj = copy.copy(self.adj)
                self.adj.max_request_body_size = limit

    class GuardedChannel(HTTPChannel):
        error_task_class = JsonErrorTask
        parser_class = TimedParser

        def handle_read(self):
            # An upload's body is read 1 MB at a time, not waitress's 8 KB: under lookups, each read in the
            # server's thread waits its turn for the GIL (147 MB took 4.7 s to arrive, 18,000 reads).
            if getattr(self.request, "patient", False) and self.adj.recv_bytes < READ_BUFFER:
                self.adj = copy.copy(self.adj)
                self.adj.recv_bytes = READ_BUFFER
            super().handle_read()

    return GuardedChannel


def close_slow_requests(server, seconds):
    """Have waitress's periodic sweep also close connections whose request is still arriving after seconds.

    Waitress closes a connection after CHANNEL_TIMEOUT of silence, but a client sending
    one byte every few seconds is never silent: a thousand of them would hold every
    connection. A request that has not arrived whole in REQUEST_SECONDS is closed.
    """
    sweep = server.maintenance

    def maintenance(now):
        sweep(now)
        cutoff = time.monotonic() - seconds
        for channel in list(server.active_channels.values()):
            request = channel.request
            if (
                request is not None
                and not request.completed
                and getattr(request, "began", cutoff) < cutoff
                and not getattr(request, "patient", False)
            ):
                channel.will_close = True

    server.maintenance = maintenance


def waitress_options(settings):
    """The server's settings, chosen so stalled clients cannot lock the platform out."""
    options = dict(
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        ident="orders",
        connection_limit=settings.connection_limit,
        channel_timeout=settings.channel_timeout,
        # The sweep that closes idle and slow connections runs this often (whole seconds).
        cleanup_interval=max(1, int(min(settings.channel_timeout, settings.request_seconds) / 2)),
        asyncore_use_poll=True,
        max_request_header_size=16384,
        max_request_body_size=65536,
        clear_untrusted_proxy_headers=True,
    )
    if settings.trusted_proxy:
        options.update(trusted_proxy=settings.trusted_proxy, trusted_proxy_headers=settings.trusted_proxy_headers)
    return options


###############################################################################
# Command line ################################################################
###############################################################################
#
# python app.py serve | check | lookup | probe | purge: each a small function over Settings
# and the sections above; every start-up failure is one line that says what to do.


def build_parser():
    """python app.py [serve|check|lookup|probe|purge] with the options each takes."""
    files = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option not given must not hide the environment variable.
    files.add_argument(
        "--data",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="export file, or folder whose newest .csv/.xlsx is served (env ORDERS_FILE; default data/)",
    )
    files.add_argument(
        "--contexts",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="answers and column mapping (env CONTEXTS_FILE; default contexts.toml beside app.py)",
    )
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--host", default=argparse.SUPPRESS, help="address to listen on (env HOST; default 127.0.0.1)")
    listen.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port (env PORT; default 8080)")
    parser = argparse.ArgumentParser(
        prog="app.py",
        parents=[files, listen],
        description="Answer a chat agent's order lookups from a shop's orders export.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", parents=[files, listen], help="serve the lookup endpoint (the default)")
    commands.add_parser("check", parents=[files], help="check contexts.toml and the export, print a summary")
    lookup = commands.add_parser("lookup", parents=[files], help="print the status and JSON the platform would get")
    lookup.add_argument("order_id")
    lookup.add_argument("email")
    probe = commands.add_parser("probe", help="check a deployed endpoint the way the chat platform calls it")
    probe.add_argument("url", help="the lookup endpoint, e.g. https://orders.example.com/lookup")
    probe.add_argument("--key", required=True, help="the API key given to the chat platform")
    probe.add_argument("--order", help="an order number that exists, to check a found answer")
    probe.add_argument("--email", help="that order's email")
    probe.add_argument(
        "--webhook",
        choices=sorted(WEBHOOK_SECRETS),
        help="also send a signed test event to /webhooks/PLATFORM (it changes no order)",
    )
    probe.add_argument("--secret", help="the webhook's secret, as the shop shows it")
    purge = commands.add_parser("purge", help="delete every stored webhook event of an e-mail address (env STATE_DIR)")
    purge.add_argument("email", help="the address the customer ordered with")
    return parser


def main(argv=None):
    """Run one command; user errors print one clear line and exit 1, never a traceback."""
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    try:
        settings = settings_from(vars(args))
        setup_logging(settings.log_format, quiet=command != "serve")
        return COMMANDS[command](settings, args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        if command == "check" and getattr(error, "detail", ""):
            print(f"       {error.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run_check(settings, args):
    """Load config and export as serving would; print what was found and what to fix."""
    config = load_config(settings.contexts)
    path = find_export(settings.data, settings.follow_symlinks)
    # As the service reads it: the columns of the export it accepted last are kept while the header row is the same.
    snapshot = build_snapshot(
        config, path, settings.memory_limit_mb, previous=read_choice(settings.state / ACCEPTED_FILE)
    )
    surveyed = survey(snapshot)
    # Said only now: a placeholder or rule field is checked against the export's columns.
    print(
        f"config   {printable(settings.contexts)}: ok ({plural(len(config.templates), 'template')}, "
        f"{plural(len(config.rules), 'rule')})"
    )
    if settings.data.is_dir() and (stray := passed_over(settings.data)):
        print(f"files    passed over, as they hold no table: {', '.join(map(printable, stray))}")
    for line in check_summary(snapshot, surveyed):
        print(line)
    for warning in chain(check_warnings(snapshot, surveyed), unpinned_warnings(settings)):
        print(f"warning  {warning}")
    plan = snapshot.packer.plan
    if plan.found:
        print(proposal_text(config, plan.header, plan.found).lstrip("\n"))
    if pasted := status_paste(config, surveyed):
        print(pasted.lstrip("\n"))
    if not snapshot.index:
        print("error    no order can be found: none has both an order number and an email", file=sys.stderr)
        print("FAILED")
        return 1
    print("OK")
    return 0


def run_lookup(settings, args):
    """Print the status line and the exact JSON body the chat platform would get."""
    config = load_config(settings.contexts)
    snapshot = build_snapshot(config, find_export(settings.data, settings.follow_symlinks), settings.memory_limit_mb)
    overlay, path = None, settings.state / "webhooks.sqlite3"
    # As served: events newer than the export answer first (without the secrets in this shell).
    rows = [
        *(shared_rows(settings, snapshot.covers) if settings.database_url else ()),
        *(WebhookStore.read(path, snapshot.covers) if path.exists() else ()),  # the store, or the shared one's spool
    ]
    if rows:
        overlay = Overlay(snapshot).fill(rows)
    status, body = answer(snapshot, args.order_id, args.email, overlay)
    print(STATUS_LINES[status])
    print(body.decode())
    return 0


PROBE_SLOW = 2.0  # seconds; the platform gives up at 5


def run_probe(settings, args):
    """Call a deployed endpoint as the chat platform does; a PASS/FAIL line per check."""
    from urllib.parse import urlencode

    if bool(args.order) != bool(args.email):
        raise SettingsError("give --order and --email together, for an order that exists.")
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(
            f"{args.url!r} is not an http(s) URL; give the lookup endpoint, e.g. https://orders.example.com/lookup."
        )
    base = args.url.split("?", 1)[0]
    unknown = "PROBE" + secrets.token_hex(4).upper()
    checks = [
        ("no key is refused with 401", {"order_id": "1", "customer_email": "probe@example.invalid"}, None, 401, None),
        ("missing parameters get 400 and a context", {}, args.key, 400, "context"),
        (
            "an unknown order gets 404 and a context",
            {"order_id": unknown, "customer_email": "probe@example.invalid"},
            args.key,
            404,
            "context",
        ),
    ]
    if args.order:
        checks.append(
            (
                f"order {args.order} is found: 200, context and tracking_url",
                {"order_id": args.order, "customer_email": args.email},
                args.key,
                200,
                "found",
            )
        )
    failures = answered = 0
    for what, query, key, wanted, shape in checks:
        problem, seconds = probe_once(f"{base}?{urlencode(query)}" if query else base, key, wanted, shape)
        failures += bool(problem)
        answered += not problem.startswith("no answer")
        if key and problem.startswith("got 401"):  # every check with the key would fail the same way
            print(
                f"FAIL  the key given with --key is refused (401 in {seconds * 1000:.0f} ms): it is not one of "
                "the keys in the service's API_KEY. The checks that need it were not run."
            )
            break
        print(f"{'FAIL' if problem else 'PASS'}  {what} ({seconds * 1000:.0f} ms){': ' + problem if problem else ''}")
    if args.webhook:
        problem, seconds = probe_webhook(base.rsplit("/lookup", 1)[0], args.webhook, args.secret or "")
        failures += bool(problem)
        print(
            f"{'FAIL' if problem else 'PASS'}  a signed {args.webhook} test event gets 200 ({seconds * 1000:.0f} ms)"
            + (f": {problem}" if problem else "")
        )
    failures += report_tls(parts, answered)
    print("all checks passed: give the platform this URL and key" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


def probe_webhook(base, platform, secret):
    """(problem or "", seconds) of one signed test event, of a topic that changes no order."""
    if not secret:
        raise SettingsError("give --secret with --webhook: the secret the shop shows for its webhooks.")
    body = json.dumps({"id": 0, "test": True}).encode()
    signature = signature_of(secret, body).decode()
    signature_header, topic_header, *_ = (h[5:].replace("_", "-") for h in WEBHOOK_HEADERS[platform])
    request = urllib.request.Request(
        f"{base}/webhooks/{platform}",
        data=body,
        method="POST",
        headers={"Content-Type": JSON, signature_header: signature, topic_header: "probe/test"},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        return f"no answer ({getattr(e, 'reason', e)})", time.perf_counter() - started
    problem = {
        401: "the signature was refused: check --secret against the service's webhook secret",
        404: "not enabled on the service: set its webhook secret",
    }.get(status, f"got {status}")
    return ("" if status == 200 else problem), time.perf_counter() - started


def probe_once(url, key, wanted, shape):
    """(problem or "", seconds) for one GET: status, JSON content type, body shape, time."""
    import ssl

    request = urllib.request.Request(url, headers={"x-api-key": key} if key else {})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=5, context=ssl.create_default_context()) as response:
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, headers, body = e.code, e.headers, e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"no answer ({reason})", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if status != wanted:
        return f"got {status}, expected {wanted}", seconds
    if headers.get_content_type() != JSON:
        return f"Content-Type is {headers.get('Content-Type')!r}, not application/json", seconds
    if seconds > PROBE_SLOW:
        return f"took {seconds:.1f} s; the platform gives up at 5 s", seconds
    return probe_shape(body, shape), seconds


def probe_shape(body, shape):
    """What is wrong with a body's JSON for the check, or ""."""
    if shape is None:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return "the body is not JSON"
    if not isinstance(data, dict) or not isinstance(data.get("context"), str) or not data["context"]:
        return "the body has no context text"
    if shape == "found":
        url = data.get("tracking_url")
        if url is not None and not safe_url(url):
            return f"tracking_url {url!r} is not an http(s) link"
    return ""


def report_tls(parts, answered):
    """Print the TLS check; 1 if it failed. Plain HTTP passes only on this machine."""
    if parts.scheme == "https":
        if not answered:
            print(
                "FAIL  TLS: no request got an answer over TLS (see above: a certificate not valid for "
                "the host, or nothing listening)"
            )
            return 1
        print("PASS  TLS certificate is valid for the host (checked on every request above)")
        return 0
    if parts.hostname in ("localhost", "127.0.0.1", "::1"):
        print("SKIP  TLS: plain HTTP on this machine; the chat platform needs an https:// URL")
        return 0
    print("FAIL  TLS: the URL is plain HTTP; the API key would cross the internet readable. Use https://.")
    return 1


def run_serve(settings, args):
    """Load, then serve with waitress and reload on changes until stopped."""
    limit_malloc_arenas()
    if settings.one_cpu and (cpu := keep_to_one_cpu(settings.cpu, settings.port)) is not None:
        log.info(
            "kept on CPU %s (%s; ONE_CPU=no lets it move between CPUs)",
            cpu,
            "as CPU= says" if settings.cpu is not None else "the one fewest other instances hold",
        )
    check_keys(settings)
    for warning in unpinned_warnings(settings):
        log.warning("%s", warning)
    # systemd and docker stop with SIGTERM: leave through the same door as Ctrl-C, logs flushed,
    # and a load in progress unmarked (it did not kill the service), also during the first load.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    service = Service(settings)
    if service.fetcher:
        prepare_fetching(settings)
        # At start, so that a fresh export is what the first load reads.
        if not service.fetcher.fetch() and not any(is_export_name(p.name) for p in settings.data.iterdir()):
            raise SettingsError(
                f"the first fetch of ORDERS_URL ({shown_url(settings.orders_url)}) failed, and "
                f"{printable(settings.data)} holds no export yet: {service.fetcher.job.last_error.rstrip('.')}. "
                "Check the link in a browser; the service serves once one fetch has succeeded."
            )
    service.start()
    if settings.api_keys:
        key_status = f"{len(settings.api_keys)} key(s) from API_KEY"
    else:
        key = secrets.token_urlsafe(24)
        settings = service.settings = replace(settings, api_keys=(key,))
        print(
            f"\nWARNING: API_KEY is not set. For trying out only, this run accepts the key:\n\n    {key}\n\n"
            "Set API_KEY before serving real traffic.\n",
            file=sys.stderr,
            flush=True,
        )
        key_status = "generated for this run"
    try:
        server = make_server(create_app(service, request_writer(service.insights)), settings)
    except OSError as error:  # the port is taken, or the address is not this machine's
        service.stopped()
        raise SettingsError(cannot_listen(settings, error)) from None
    watcher = Watcher(service).start()
    fetcher = service.fetcher.start() if service.fetcher else None
    log.info(
        "serving %s on http://%s:%s/lookup (key: %s)",
        printable(service.snapshot.source),
        settings.host,
        listen_port(server),
        key_status,
    )
    if not is_loopback(settings.host) and not settings.trusted_proxy:
        log.warning(
            "EXPOSED: listening on %s with no reverse proxy declared (TRUSTED_PROXY). Clients reach "
            "waitress directly, without TLS, and thousands of slow connections can hold it up. Put "
            "Caddy or nginx in front (deploy/) and keep HOST=127.0.0.1.",
            settings.host,
        )
    try:
        server.run()
    finally:
        watcher.stop()
        if fetcher:
            fetcher.stop()
        server.close()
        service.stopped()
    return 0


def prepare_fetching(settings):
    """ORDERS_URL fetches into the data folder: it must be a folder; other exports in it would compete."""
    if not settings.data.is_dir():
        raise SettingsError(
            f"ORDERS_URL is set, so ORDERS_FILE ({printable(settings.data)}) must be a folder for the "
            "fetched export, e.g. /srv/orders/data."
        )
    others = [p.name for p in settings.data.iterdir() if is_export_name(p.name) and not p.name.startswith("fetched.")]
    if others:
        log.warning(
            "ORDERS_URL is set, and %s also holds %s: the newest file is served, which may not be the "
            "fetched one. Keep the fetched export in a folder of its own.",
            printable(settings.data),
            ", ".join(map(printable, others[:3])),
        )


MAKE_KEY = 'python3 -c "import secrets; print(secrets.token_urlsafe(32))"'


# Why a secret may sign more than one shop's events, where the platform makes that likely.
SHARED_SECRET_NOTE = {"shopify": " (a Shopify app's client secret is shared by every shop that installs the app)"}


def unpinned_warnings(settings):
    """Webhook secrets set with no SHOP_DOMAIN: another shop whose events that secret signs would be believed."""
    for platform in (settings.webhook_secrets or {}) if not settings.shop_domains else ():
        yield (
            f"{WEBHOOK_SECRETS[platform]} is set but SHOP_DOMAIN is not: if that secret also signs another "
            f"shop's {PLATFORM_NAMES[platform]} webhooks{SHARED_SECRET_NOTE.get(platform, '')}, that shop's events "
            "would change the answers here. Set SHOP_DOMAIN to this shop's domain(s)"
        )


def check_keys(settings):
    """Refuse to serve with a key or secret shared between roles, or short or a placeholder (unless ALLOW_WEAK_KEY)."""
    if shared := list(shared_key_errors(settings)):
        raise SettingsError(f"{'; '.join(shared)} (make one with {MAKE_KEY}).")
    for role, variable, keys in key_roles(settings):
        weak = list(weak_key_warnings(keys, role))
        if weak and not settings.allow_weak_key:
            raise SettingsError(
                f"{'; '.join(weak)}: anyone could guess it. Make one with {MAKE_KEY} and put it in "
                f"{variable}"
                + (" and in the shop's webhook settings" if "webhook" in role else "")
                + " (ALLOW_WEAK_KEY=yes serves with it anyway, for trying out only)."
            )
        for warning in weak:
            log.warning("WEAK KEY (allowed by ALLOW_WEAK_KEY): %s; make one with: %s", warning, MAKE_KEY)


def run_purge(settings, args):
    """Delete every stored webhook event of one e-mail address: the customer asked to be forgotten."""
    import sqlite3

    email = normalise_email(args.email)
    if "@" not in email:
        raise SettingsError(f"{args.email!r} is not an e-mail address. Give the address the customer ordered with.")
    if settings.database_url:
        purge_database(settings, email)
    path = settings.state / "webhooks.sqlite3"
    if not path.exists():
        print(
            f"purge    no webhook events are stored here ({printable(path)} does not exist): nothing of "
            f"{mask_email(email)} is kept"
        )
        return 0
    try:
        with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as db:
            db.execute("PRAGMA secure_delete=ON")  # the deleted rows' bytes are overwritten, not left in free pages
            gone = db.execute("DELETE FROM orders WHERE email_key = ?", (email,)).rowcount
            db.executescript("PRAGMA incremental_vacuum;")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and no copy stays in the write-ahead log
    except sqlite3.Error as e:
        raise StoreError(f"{shown_name(path)}: cannot be changed ({e}). Check STATE_DIR and the disk.") from None
    print(
        f"purge    {plural(gone, 'stored order')} of {mask_email(email)} deleted from {printable(path)}; a running "
        f"service forgets {'it' if gone == 1 else 'them'} within {UPKEEP_SECONDS} s. The export itself is the shop's: "
        "remove the customer there, and the next export no longer holds them"
    )
    return 0


def purge_database(settings, email):
    """`purge` in the shared database (DATABASE_URL): every instance forgets the address's events at once."""
    import psycopg

    where = shown_database(settings.database_url)
    try:
        with shop_database(settings, "purge") as db:
            gone = purge_shared(db, email)
    except psycopg.Error as e:
        raise StoreError(
            f"{where}: cannot be changed ({database_error(e)}). "
            "Check DATABASE_URL and that the database is up, then run purge again."
        ) from None
    print(
        f"purge    {plural(gone, 'stored order')} of {mask_email(email)} deleted from {where}; every instance forgets "
        f"{'it' if gone == 1 else 'them'} at once"
    )


COMMANDS = {"serve": run_serve, "check": run_check, "lookup": run_lookup, "probe": run_probe, "purge": run_purge}

if __name__ == "__main__":
    sys.exit(main())
