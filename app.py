#!/usr/bin/env python3
"""Order lookup service.

Turns a shop's nightly orders export (CSV or XLSX) into the order-tracking
endpoint that a chat agent calls with an order number and an email address.
The wording of every answer lives in contexts.toml.

The file reads top to bottom in the order data flows: settings,
configuration, reading exports, building the index, rendering answers,
serving state, HTTP, status page, watching files, command line.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
import tomllib
from collections import Counter, deque
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from itertools import groupby, starmap
from json.encoder import encode_basestring
from operator import itemgetter
from pathlib import Path
from string import Formatter
from urllib.parse import quote, unquote_plus, unquote_to_bytes

import bottle

__version__ = "1.0.0"

HERE = Path(__file__).resolve().parent
log = logging.getLogger("orders")
access_log = logging.getLogger("orders.access")  # one line per request


###############################################################################
# Errors ######################################################################
###############################################################################


class UserError(Exception):
    """A problem the user can fix; the message is exactly what they read."""


class ConfigError(UserError):
    """contexts.toml cannot be used."""


class ExportError(UserError):
    """The orders export cannot be used."""


class SettingsError(UserError):
    """A command-line option or environment variable is wrong."""


def config_error(path, where, problem, fix=""):
    """Raise a ConfigError shaped like every other one: file, key, problem, fix."""
    raise ConfigError(f"{Path(path).name}: {where}: {problem}" + (f" {fix}" if fix else ""))


###############################################################################
# Settings (command line and environment) #####################################
###############################################################################

# Words of the placeholders that people copy from documentation instead of making a key.
WEAK_KEY_WORDS = ("changeme", "yourapikey", "apikey", "example", "password", "placeholder", "secret", "replaceme")


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

    @property
    def state(self):
        """Folder for the copy of the last accepted export."""
        if self.state_dir:
            return self.state_dir
        base = self.data if self.data.is_dir() else self.data.parent
        return base / ".last-good"


def env_number(env, name, default):
    """A numeric environment variable (of default's type), or a SettingsError that names it."""
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        number = type(default)(value)
    except ValueError:
        number = None
    if number is None or number <= 0:
        raise SettingsError(f"{name}={value!r} is not a {'whole ' if isinstance(default, int) else ''}number "
                            f"above 0; set it to e.g. {default}.")
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
    return Settings(
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
    )


def weak_key_warnings(keys):
    """Why each configured key is too easy to guess (never the key itself)."""
    for number, key in enumerate(keys, 1):
        letters = re.sub(r"[\W_]+", "", key.casefold())
        if len(key) < 16:
            yield f"API key {number} of {len(keys)} is shorter than 16 characters"
        elif any(word in letters for word in WEAK_KEY_WORDS) or len(set(key)) < 5:
            yield f"API key {number} of {len(keys)} is a well-known placeholder or repeats one character"


###############################################################################
# Configuration (contexts.toml) ###############################################
###############################################################################

# Placeholders computed from an order rather than read from one column.
DERIVED = {
    "order_id": "the order number as written in the export, e.g. #1001",
    "items": "the line items, e.g. 1 x Hat, 2 x Socks",
    "item_count": "how many items in all",
    "shipped_items": "the items whose own status says they shipped",
    "unshipped_items": "the items not shipped yet",
    "tracking_number": "the first tracking number",
    "tracking_numbers": "every tracking number, comma-separated",
    "tracking_url": "the tracking link (from a column, or built from [carriers])",
}
# Templates the service answers with before or without finding an order.
MESSAGES = {
    "not_found": {"order_id"},
    "missing": {"missing"},
    "invalid": set(),
    "unavailable": set(),
}
REQUIRED_FIELDS = ("order_id", "email")
# Fields read per line item; every other field is per order.
ITEM_FIELDS = ("item_name", "item_quantity", "item_status")
# Fields read from every row of an order: its items and any tracking numbers.
ROW_FIELDS = (*ITEM_FIELDS, "tracking_number")
# Fields that derived placeholders are made from: always read when present.
SOURCE_FIELDS = ("tracking_number", "carrier", "tracking_url")
SECTIONS = ("settings", "columns", "items", "rules", "templates", "carriers")


@dataclass(frozen=True)
class Template:
    """One answer text and the placeholders it names."""

    name: str
    text: str
    fields: tuple[str, ...]

    def render(self, values):
        """The text with each placeholder filled, dates made readable."""
        return self.text.format_map({f: readable(values[f].strip()) for f in self.fields})


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
    item_separator: str
    no_items: str
    shipped_item_statuses: frozenset
    max_age_hours: float
    min_orders_ratio: float
    sheet: str

    @property
    def fields_used(self):
        """Every placeholder or rule field that some order answer needs."""
        used = set(REQUIRED_FIELDS) | set(SOURCE_FIELDS) | set(ITEM_FIELDS)
        for name, template in self.templates.items():
            if name not in MESSAGES:
                used.update(template.fields)
        for rule in self.rules:
            used.update(name for name, _ in rule.conditions)
        return used


def status_word(value):
    """Status words compare loosely: 'On-Hold', 'on hold' and 'ON_HOLD' are one."""
    return " ".join(re.split(r"[\s_\-]+", value.strip().casefold())).strip()


def snake_case(header):
    """The placeholder name of a column: 'Financial Status' -> financial_status."""
    return re.sub(r"[^0-9a-z]+", "_", header.casefold()).strip("_")


def header_key(header):
    """Headers compare without case and stray spaces."""
    return " ".join(str(header).split()).casefold()


def load_config(path):
    """Read and check contexts.toml; raise ConfigError naming file, key and fix."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found. Copy contexts.toml from the project or set CONTEXTS_FILE.") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: is not UTF-8 text. Save it as UTF-8.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"{path.name}: {e}. Fix the TOML syntax there; text values need quotes, "
            'e.g. processing = "Order {order_id} was found."'
        ) from None
    return parse_config(path, doc)


def parse_config(path, doc):
    """Turn a parsed TOML document into a Config, checking every key."""
    for key in doc:
        if key not in SECTIONS:
            config_error(path, f"[{key}]", "is not a known section.", f"Known sections: {', '.join(SECTIONS)}.")
    settings = parse_settings(path, doc.get("settings", {}))
    columns = parse_columns(path, doc.get("columns", {}))
    items = parse_items(path, doc.get("items", {}))
    templates = parse_templates(path, doc.get("templates", {}))
    rules = parse_rules(path, doc.get("rules", []), templates)
    default = settings["default_template"]
    if default not in templates:
        config_error(path, "[settings] default_template", f"names the template {default!r}, which does not exist.",
                     f"Templates: {', '.join(templates)}.")
    return Config(
        path=path, columns=columns, rules=rules, templates=templates,
        carriers=parse_carriers(path, doc.get("carriers", {})), default_template=default,
        item_format=items["format"], item_separator=items["separator"], no_items=items["none"],
        shipped_item_statuses=frozenset(status_word(s) for s in items["shipped"]),
        max_age_hours=settings["max_age_hours"], min_orders_ratio=settings["min_orders_ratio"],
        sheet=settings["sheet"],
    )


def expect(path, where, value, kind, example):
    """Check a value's TOML type; the error shows a correct example."""
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        config_error(path, where, f"should be {example}, not {value!r}.")
    return value


def table(path, name, value):
    """A section must be a table, e.g. [columns]."""
    return expect(path, f"[{name}]", value, dict, f"a table such as [{name}]")


SETTING_DEFAULTS = {
    "default_template": "processing",
    "max_age_hours": 26.0,
    "min_orders_ratio": 0.5,
    "sheet": "",
}


def parse_settings(path, raw):
    """[settings]: default template, freshness, shrink guard, XLSX sheet."""
    raw = table(path, "settings", raw)
    out = dict(SETTING_DEFAULTS)
    for key, value in raw.items():
        if key not in SETTING_DEFAULTS:
            config_error(path, f"[settings] {key}", "is not a known setting.", f"Known: {', '.join(SETTING_DEFAULTS)}.")
        default = SETTING_DEFAULTS[key]
        kind = (int, float) if isinstance(default, float) else str
        out[key] = expect(path, f"[settings] {key}", value, kind, f"like {default!r}")
    if out["max_age_hours"] <= 0:
        config_error(path, "[settings] max_age_hours", "must be more than 0.", "A nightly export wants 26.")
    if not 0 <= out["min_orders_ratio"] <= 1:
        config_error(path, "[settings] min_orders_ratio", "must be between 0 and 1.", "0.5 refuses an export half the size.")
    return out


def parse_columns(path, raw):
    """[columns]: field -> the headers to look for, the first present wins."""
    columns = {}
    for name, headers in table(path, "columns", raw).items():
        where = f"[columns] {name}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            config_error(path, where, "field names are lower case letters, digits and _.", "e.g. tracking_number.")
        if isinstance(headers, str):
            headers = [headers]
        expect(path, where, headers, list, 'a list of headers such as ["Order Number", "Name"]')
        for header in headers:
            expect(path, where, header, str, 'a list of headers such as ["Order Number", "Name"]')
        columns[name] = tuple(headers)
    for name in REQUIRED_FIELDS:
        if not columns.get(name):
            config_error(path, f"[columns] {name}", "is missing; the service cannot match orders without it.",
                         f'Add e.g. {name} = ["Order Number"].' if name == "order_id" else f'Add e.g. {name} = ["Email"].')
    return columns


ITEM_DEFAULTS = {
    "format": "{quantity} x {name}",
    "separator": ", ",
    "none": "the items ordered",
    "shipped": ["fulfilled", "shipped", "delivered"],
}


def parse_items(path, raw):
    """[items]: how line items are listed and which item statuses mean shipped."""
    out = dict(ITEM_DEFAULTS)
    for key, value in table(path, "items", raw).items():
        if key not in ITEM_DEFAULTS:
            config_error(path, f"[items] {key}", "is not a known setting.", f"Known: {', '.join(ITEM_DEFAULTS)}.")
        kind = list if key == "shipped" else str
        out[key] = expect(path, f"[items] {key}", value, kind, f"like {ITEM_DEFAULTS[key]!r}")
    placeholders(path, "[items] format", out["format"], {"quantity", "name"})
    return out


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
            config_error(path, where, f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                         "is not a placeholder.", "Placeholders are plain names such as {order_id}.")
        if allowed is not None and name not in allowed:
            config_error(path, where, f"uses the unknown placeholder {{{name}}}.",
                         f"Available here: {', '.join('{%s}' % a for a in sorted(allowed)) or 'none'}.")
        names.append(name)
    return tuple(dict.fromkeys(names))


def parse_templates(path, raw):
    """[templates]: name -> text; the message templates must be present."""
    templates = {}
    for name, text in table(path, "templates", raw).items():
        where = f"[templates] {name}"
        expect(path, where, text, str, 'a text in quotes, e.g. "Order {order_id} was found."')
        allowed = MESSAGES.get(name)
        templates[name] = Template(name, text, placeholders(path, where, text, allowed))
    for name, allowed in MESSAGES.items():
        if name not in templates:
            shown = f" It may use {', '.join('{%s}' % a for a in sorted(allowed))}." if allowed else ""
            config_error(path, f"[templates] {name}", "is missing; the service needs it to answer.",
                         f"Add {name} = \"...\".{shown}")
    return templates


def parse_rules(path, raw, templates):
    """[[rules]]: in order; each names a template and the conditions for it."""
    expect(path, "[[rules]]", raw, list, "a list of [[rules]] tables")
    rules = []
    for number, rule in enumerate(raw, 1):
        where = f"[[rules]] number {number}"
        expect(path, where, rule, dict, "a table with when and template")
        unknown = set(rule) - {"when", "template"}
        if unknown:
            config_error(path, where, f"has the unknown key {sorted(unknown)[0]!r}.", "A rule has only when and template.")
        name = expect(path, f"{where} template", rule.get("template"), str, 'a template name, e.g. "shipped"')
        if name not in templates or name in MESSAGES:
            config_error(path, f"{where} template", f"names the template {name!r}, which does not exist.",
                         f"Templates: {', '.join(t for t in templates if t not in MESSAGES)}.")
        conditions = []
        for field_name, wanted in expect(path, f"{where} when", rule.get("when", {}), dict, "a table, e.g. { status = \"shipped\" }").items():
            conditions.append((field_name, condition(path, f"{where} when.{field_name}", wanted)))
        rules.append(Rule(number, tuple(conditions), name))
    return tuple(rules)


def condition(path, where, wanted):
    """'*' means any non-empty value; a text or a list means one of those words."""
    if wanted == "*":
        return None
    if isinstance(wanted, str):
        wanted = [wanted]
    expect(path, where, wanted, list, 'a word, a list of words, or "*" for any value')
    for word in wanted:
        expect(path, where, word, str, 'a word, a list of words, or "*" for any value')
    return frozenset(status_word(w) for w in wanted)


def parse_carriers(path, raw):
    """[carriers]: carrier name -> tracking page with {tracking_number}; longest name first."""
    carriers = []
    for name, url in table(path, "carriers", raw).items():
        where = f"[carriers] {name}"
        expect(path, where, url, str, 'a URL such as "https://www.ups.com/track?tracknum={tracking_number}"')
        if not url.startswith("https://"):
            config_error(path, where, "must start with https://.", "The chat agent only shows secure links.")
        placeholders(path, where, url, {"tracking_number"})
        carriers.append((carrier_key(name), url))
    return tuple(sorted(carriers, key=lambda c: -len(c[0])))


def carrier_key(name):
    """Carrier names compare on letters and digits only: 'DHL Express' -> dhlexpress."""
    return re.sub(r"[\W_]+", "", name.casefold())


###############################################################################
# Reading exports #############################################################
###############################################################################

EXPORT_SUFFIXES = (".csv", ".xlsx")
READ_BUFFER = 1 << 20
# An order is kept as one string (see Packer): these separate its cells, and its rows.
FIELD, RECORD = "\x1f", "\x1e"
DELIMITERS = ",;\t|"


def find_export(location):
    """The file to serve: the location itself, or the newest export in a folder."""
    location = Path(location)
    if location.is_dir():
        candidates = [p for p in location.iterdir() if is_export_name(p.name) and p.is_file()]
        if not candidates:
            raise ExportError(f"{location}: no .csv or .xlsx export in this folder. "
                              "Drop the export there, or point ORDERS_FILE / --data at the file.")
        return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name))
    if not location.exists():
        raise ExportError(f"{location}: no such file or folder. Check ORDERS_FILE / --data.")
    if location.suffix.lower() not in EXPORT_SUFFIXES:
        raise ExportError(f"{location.name}: not a .csv or .xlsx file. Export the orders as CSV or XLSX.")
    return location


def is_export_name(name):
    """Exports end in .csv/.xlsx; hidden files and Excel's ~$ lock files are not exports."""
    return name.lower().endswith(EXPORT_SUFFIXES) and not name.startswith((".", "~$"))


@contextmanager
def open_table(path, sheet="", is_header=None, encoding=None):
    """(rows, line, plain): rows iterates the export's rows as lists of cell texts, header
    first; line() tells where reading is, for error messages; plain is True when no cell
    can hold FIELD or RECORD."""
    if path.suffix.lower() == ".xlsx":
        with open_xlsx(path, sheet, is_header) as table:
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
    if b"\0" in head:
        raise ExportError(f"{path.name}: is a binary file, not a CSV. Export the orders as CSV or XLSX.")
    encoding = encoding or ("utf-8-sig" if head.startswith(b"\xef\xbb\xbf") else "utf-8")
    with open(path, newline="", encoding=encoding, buffering=READ_BUFFER) as f, utf8_or_retry(encoding):
        # Read 1 MB at a time, not 8 KB: each read releases the GIL for a moment, and when
        # that happens every few dozen rows the request threads' claim to the GIL is reset
        # before it is due, so they starve: 700 ms stalls during a reload of 500,000 orders.
        # TextIOWrapper reads _CHUNK_SIZE bytes whatever the buffer; CPython lets us set it.
        with suppress(AttributeError):
            f._CHUNK_SIZE = READ_BUFFER
        # A cell holding a separator of packed orders would shift its order's other cells,
        # so each order is checked unless the file has neither: one pass over the bytes
        # (memchr: 20 ms for 150 MB) saves a count of every order (160 ms). The same open
        # file is then parsed, so a file replaced meanwhile cannot slip past the check.
        # Every encoding read here writes both characters as the same single byte.
        plain = not holds_any(f.buffer, (FIELD.encode(), RECORD.encode()))
        f.seek(0)
        first = f.readline()
        offset = 0
        if re.fullmatch(r"sep=.\r?\n?", first, re.I | re.S):  # Excel's own hint, a line of its own
            delimiter, offset = first[4], 1
        else:
            f.seek(0)
            delimiter = sniff_delimiter(first, f.read(65536))
            f.seek(0)
        reader = csv.reader(f, delimiter=delimiter)
        yield reader, lambda: reader.line_num + offset, plain


def holds_any(binary, needles):
    """True when a binary file, from where it is, holds any of the single bytes in needles."""
    chunk = bytearray(READ_BUFFER)  # one buffer, filled again and again
    while size := binary.readinto(chunk):
        if any(chunk.find(needle, 0, size) >= 0 for needle in needles):
            return True
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


def sniff_delimiter(header_line, sample):
    """The delimiter csv.Sniffer finds, if the header uses it; else the one the header uses most."""
    try:
        found = csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
        if found in header_line:
            return found
    except csv.Error:
        pass
    counts = {d: header_line.count(d) for d in DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


@contextmanager
def open_xlsx(path, sheet, is_header):
    """The rows of a workbook's orders sheet, streamed; the workbook is closed after."""
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises many kinds on a damaged file; all mean the same here
        raise ExportError(f"{path.name}: not a readable XLSX workbook ({type(e).__name__}). "
                          "Re-export it; it may have been cut off while being written.") from None
    try:
        worksheet = pick_sheet(path, book, sheet, is_header)

        def rows():
            width = 0
            for row in worksheet.iter_rows(values_only=True):
                cells = [cell_text(v) for v in row]
                width = width or len(cells)
                # Read-only sheets may end a row early; every row is as wide as the header.
                yield cells + [""] * (width - len(cells)) if len(cells) < width else cells

        # Line numbers are for CSV parse errors only; a workbook is not scanned, so each order is checked.
        yield rows(), lambda: None, False
    finally:
        book.close()


def pick_sheet(path, book, sheet, is_header):
    """The sheet named in [settings] sheet, or the first whose header has the order columns."""
    if sheet:
        if sheet not in book.sheetnames:
            raise ExportError(f"{path.name}: has no sheet {sheet!r}. Sheets: {', '.join(book.sheetnames)}. "
                              "Fix [settings] sheet in contexts.toml.")
        return book[sheet]
    for worksheet in book.worksheets:
        for row in worksheet.iter_rows(values_only=True, max_row=20):
            cells = [cell_text(v) for v in row]
            if any(cells):
                if is_header is None or is_header(cells):
                    return worksheet
                break
    return book.worksheets[0]


def cell_text(value):
    """A spreadsheet cell as text: 1001.0 -> '1001', dates as ISO so they render readably."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == datetime.min.time() else value.isoformat(" ", "minutes")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


###############################################################################
# Building the index ##########################################################
###############################################################################

LAYOUTS = (  # (name, headers that identify it), most specific first
    ("Shopify orders export", {"name", "lineitem name", "financial status"}),
    ("WooCommerce orders export", {"order number", "order status"}),
)


@dataclass(frozen=True)
class Plan:
    """Which column feeds which field, worked out once from the header row."""

    chosen: dict  # field -> header text
    order_fields: tuple[str, ...]  # per-order fields, in the order they are packed
    order_columns: tuple[int, ...]
    row_fields: tuple[str, ...]  # per-row fields (items, tracking numbers) present in the export
    row_columns: tuple[int, ...]
    layout: str


def normalise_order_id(value):
    """'#1001', ' # 1001 ', '1001' and the spreadsheet's '1001.0' are all '1001'."""
    if value.isalnum():  # the usual case, without a regex: 1001, SO12
        return value.casefold()
    if value[1:].isalnum() and value[0] == "#":  # Shopify's #1001
        return value[1:].casefold()
    value = value.strip()
    value = re.sub(r"^(#?\s*\d+)\.0+$", r"\1", value)
    return re.sub(r"[\W_]+", "", value).casefold()


def normalise_email(value):
    """Emails compare trimmed and without case."""
    return value.strip().casefold()


def index_key(order_key, email_key):
    """The index's key from a normalised order number and email: one probe finds both or neither."""
    return f"{order_key}\x1f{email_key}"


def make_plan(config, header, name):
    """Match the mapping's headers to the file's; ConfigError/ExportError name what is missing."""
    positions = {}
    for index, text in enumerate(header):
        positions.setdefault(header_key(text), index)
    chosen, taken = {}, set()
    for field_name, candidates in config.columns.items():
        for candidate in candidates:
            index = positions.get(header_key(candidate))
            if index is not None and index not in taken:  # one column feeds one field
                chosen[field_name] = index
                taken.add(index)
                break
    for field_name in REQUIRED_FIELDS:
        if field_name not in chosen:
            looked = ", ".join(f'"{c}"' for c in config.columns[field_name])
            raise ExportError(
                f"{name}: no column for {field_name} (looked for {looked}). "
                f"The file's columns are: {shown_headers(header)}. "
                f"Add the right header to [columns] {field_name} in contexts.toml."
            )
    by_snake = {}
    for index, text in enumerate(header):
        by_snake.setdefault(snake_case(text), index)
    check_placeholders(config, by_snake)
    # Per order, beside its number: every field used that a column feeds. Derived names
    # (items, tracking_url, ...) are computed, unless mapped to a column of their own.
    per_row = {"order_id", *ROW_FIELDS}
    order_fields = [f for f in sorted(config.fields_used - per_row)
                    if f in chosen or (f not in DERIVED and f in by_snake)]
    return Plan(
        chosen={f: header[i].strip() for f, i in chosen.items()},
        order_fields=("order_id", *order_fields),
        order_columns=(chosen["order_id"], *(chosen.get(f, by_snake.get(f)) for f in order_fields)),
        row_fields=tuple(f for f in ROW_FIELDS if f in chosen),
        row_columns=tuple(chosen[f] for f in ROW_FIELDS if f in chosen),
        layout=detect_layout(positions),
    )


def shown_headers(header, limit=40):
    """The file's headers for an error message, shortened; headers are not customer data."""
    texts = [h.strip()[:40] for h in header if h and h.strip()]
    if any("@" in t for t in texts):  # a file without a header row: its first row is a customer's
        return "none: the first row holds data (an email address), not headers; export with a header row"
    more = f" and {len(texts) - limit} more" if len(texts) > limit else ""
    return ", ".join(f'"{t}"' for t in texts[:limit]) + more if texts else "(none: the first row is empty)"


def check_placeholders(config, by_snake):
    """Every placeholder and rule field must be derived, mapped, or a column of this file."""
    known = set(DERIVED) | set(config.columns) | set(by_snake)
    available = sorted(set(DERIVED) | set(config.columns)) + sorted(set(by_snake) - set(config.columns))
    for name, template in config.templates.items():
        for placeholder in template.fields:
            if name not in MESSAGES and placeholder not in known:
                config_error(config.path, f"[templates] {name}", f"uses {{{placeholder}}}, which is neither a field "
                             "in [columns] nor a column of the export.",
                             f"Available: {', '.join('{%s}' % a for a in available)}.")
    for rule in config.rules:
        for field_name, _ in rule.conditions:
            if field_name not in known:
                config_error(config.path, f"[[rules]] number {rule.number} when.{field_name}",
                             "is neither a field in [columns] nor a column of the export.",
                             f"Available: {', '.join(available)}.")


def detect_layout(positions):
    """Name the kind of export by its telltale headers, for `check`."""
    for name, headers in LAYOUTS:
        if headers <= positions.keys():
            return name
    return "generic export"


class Irregular(Exception):
    """Rows of one order lie apart, or a row is shorter than the header: read again, carefully."""


def getter(columns):
    """A C-speed function from a row to the tuple of its cells at columns."""
    if len(columns) == 1:
        return lambda row, i=columns[0]: (row[i],)
    return itemgetter(*columns) if columns else (lambda row: ())


class OrderReader:
    """Reads an export into orders: per order, its rows; the plan says which cells matter."""

    def __init__(self, config, path, encoding=None):
        self.config, self.path, self.encoding = config, path, encoding
        self.plan = None
        self.rows = self.skipped = 0
        self.line = lambda: 0
        self.plain = False  # True once open_table finds no cell can hold a packing separator

    def is_header(self, cells):
        """A row is the header when it has one of the order-number headers."""
        wanted = {header_key(h) for h in self.config.columns["order_id"]}
        return any(header_key(c) in wanted for c in cells)

    def orders(self, careful=False):
        """Yield (order number key, rows) per order.

        Exports list an order's rows together and every row as wide as the header, so
        rows are grouped as they stream by, at C speed, and memory holds one order. If
        that does not hold, Irregular is raised: read again with careful=True, which
        pads short rows and holds every order until the end of the file.
        """
        with open_table(self.path, self.config.sheet, self.is_header, self.encoding) as (rows, self.line, self.plain):
            rows = iter(rows)
            header = next((r for r in rows if any(c.strip() for c in r)), None)
            if header is None:
                raise ExportError(f"{self.path.name}: is empty. Re-export the orders; "
                                  "the last good data stays served.")
            self.plan = make_plan(self.config, header, self.path.name)
            groups = self.gathered(rows, len(header)) if careful else self.adjacent(rows)
            # One loop, no layers: this runs for every order of a file of hundreds of thousands.
            progress, next_tick = Progress(self.path.name), PROGRESS_ROWS
            for key, group in groups:
                if not key:
                    self.skipped += sum(1 for row in group if any(row))
                    continue
                self.rows += len(group)
                if self.rows >= next_tick:
                    progress.tick(self.rows)
                    next_tick += PROGRESS_ROWS
                yield key, group

    def adjacent(self, rows):
        """Groups of adjacent rows with the same order number: (key, rows) at C speed.

        A row too short for a needed cell makes itemgetter raise IndexError, here or when
        the order is packed: both mean Irregular. An order number seen again after others
        is found at the end, by one set() over all of them rather than a check per order.
        """
        keys = []
        groups = groupby(filter(None, rows), itemgetter(self.plan.order_columns[0]))
        for key, group in map(keyed, groups):
            keys.append(key)
            yield key, group
        if len(set(keys)) != len(keys):
            raise Irregular("rows of one order are apart")

    def gathered(self, rows, width):
        """Every order's rows, wherever they are in the file, each row padded to the header."""
        groups = {}
        for row in rows:
            if any(row):
                row = row + [""] * (width - len(row)) if len(row) < width else row
                groups.setdefault(normalise_order_id(row[self.plan.order_columns[0]]), []).append(row)
        return groups.items()


def keyed(group):
    """(normalised order number, list of rows) of one groupby group."""
    try:
        return normalise_order_id(group[0]), list(group[1])
    except IndexError:  # itemgetter found a row too short for the order-number column
        raise Irregular("a row is shorter than the header") from None


PROGRESS_ROWS = 50_000
PROGRESS_SECONDS = 5.0


class Progress:
    """Logs rows read so far every few seconds, so a long load is seen to be alive."""

    def __init__(self, name):
        self.name, self.every = name, PROGRESS_SECONDS
        self.started = self.last = time.monotonic()

    def tick(self, rows):
        """Called every PROGRESS_ROWS rows; logs when `every` seconds have passed."""
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info("reading %s: %d rows so far (%.0fs)", self.name, rows, now - self.started)


class Packer:
    """Packs an order's rows into one compact string, and unpacks it for rendering."""

    def __init__(self, plan, plain=False):
        self.plan = plan
        self.plain = plain  # no cell holds FIELD or RECORD: open_table looked
        self.order_cells = getter(plan.order_columns)
        self.row_cells = getter(plan.row_columns)
        fields = plan.row_fields
        self.row_positions = tuple(fields.index(f) if f in fields else None for f in ROW_FIELDS)
        # How many FIELD separators a packed order holds: its head, and each row.
        self.fields_per_head, self.fields_per_row = len(plan.order_fields) - 1, max(0, len(fields) - 1)

    def pack(self, rows):
        """(order values, packed string); each order value from the first row that has it."""
        values = self.order_cells(rows[0])
        if len(rows) > 1 and "" in values:
            for other in map(self.order_cells, rows[1:]):
                values = [v or o for v, o in zip(values, other)]
                if "" not in values:
                    break
        records = [values, *map(self.row_cells, rows)]
        packed = RECORD.join(map(FIELD.join, records))
        if self.plain:
            return values, packed
        # One count says whether a cell held a separator (never in real data, but a cell must not
        # be able to shift the others); only then is every cell cleaned.
        expected = self.fields_per_head + len(rows) * self.fields_per_row
        if packed.count(FIELD) != expected or packed.count(RECORD) != len(rows):
            packed = RECORD.join(FIELD.join(clean_cell(c) for c in record) for record in records)
        return values, packed

    def unpack(self, packed):
        """(order cells in plan.order_fields' order, items, tracking numbers) from a packed order."""
        head, *lines = packed.split(RECORD)
        items, tracking = [], []
        name_at, quantity_at, status_at, tracking_at = self.row_positions
        for line in lines:
            cells = line.split(FIELD)
            if name_at is not None and (name := cells[name_at].strip()):
                items.append((quantity_text(cells[quantity_at].strip()) if quantity_at is not None else "1", name,
                              cells[status_at].strip() if status_at is not None else ""))
            if tracking_at is not None and (numbers := cells[tracking_at].strip()):
                for number in SEVERAL.split(numbers):
                    number = number.strip()
                    if number and number not in tracking:
                        tracking.append(number)
        return head.split(FIELD), items, tracking


SEVERAL = re.compile(r"[,;\n]+")  # several tracking numbers in one cell


def clean_cell(text):
    """A cell without the characters that separate packed cells and records."""
    return text.replace(FIELD, " ").replace(RECORD, " ")


def quantity_text(value):
    """Quantities read '2', never '2.0'; no quantity reads 1."""
    return (value[:-2] if value.endswith(".0") else value) or "1"


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
    rows_without_order: int
    loaded_at: float
    seconds: float
    layout: str
    columns: dict
    example_order_id: str
    packer: Packer
    renderer: Renderer
    encoding: str | None = None  # a CSV's, when it is not UTF-8

    def describe(self):
        """What was loaded, for logs and for `check`; no customer data."""
        return (f"{self.source.name}: {self.rows} rows, {self.orders} orders "
                f"({self.layout}) in {self.seconds:.2f}s")

    def render(self, packed):
        """(template name, JSON body) of a packed order's answer."""
        return self.renderer.answer(*self.packer.unpack(packed))


def build_snapshot(config, path):
    """Read the export at path into an index of packed orders, ready to serve.

    The fast reading assumes what nearly every export is (UTF-8, an order's rows
    together, rows as wide as the header); when the file says otherwise, it is
    read again the way it needs.
    """
    careful, encoding = False, None
    while True:
        try:
            return build(config, path, careful, encoding)
        except Irregular as why:
            log.info("%s: %s; reading it again, holding all orders", path.name, why)
            careful = True
        except NotUTF8:
            encoding = legacy_encoding(path)
            log.info("%s: not UTF-8; reading it again as %s", path.name, encoding)


def build(config, path, careful, encoding):
    """One pass over the export: each order packed and indexed by (order number, email)."""
    started = time.perf_counter()
    try:
        stat = path.stat()
    except OSError as e:
        raise ExportError(f"{path.name}: cannot be read ({e.strerror}).") from None
    reader = OrderReader(config, path, encoding)
    index, without_email, example = {}, 0, ""
    packer = None
    try:
        for key, rows in reader.orders(careful):
            if packer is None:  # the first order: the plan is known now
                packer, email_at = Packer(reader.plan, reader.plain), reader.plan.order_fields.index("email")
                example = packer.order_cells(rows[0])[0].strip()  # its number as written, for `check`
            values, packed = packer.pack(rows)
            email = normalise_email(values[email_at])
            if email:
                index[index_key(key, email)] = packed
            else:
                without_email += 1  # such an order can never be matched
    except (UserError, Irregular, NotUTF8):
        raise
    except IndexError:  # a row too short for a needed cell
        raise Irregular("a row is shorter than the header") from None
    except csv.Error as e:
        raise ExportError(f"{path.name}: line {reader.line()}: not a readable CSV ({e}). "
                          "Re-export the file; it may have been cut off while being written.") from None
    except (OSError, UnicodeError, ValueError, KeyError, EOFError) as e:
        raise ExportError(f"{path.name}: could not be read ({type(e).__name__}). "
                          "Re-export it; it may have been cut off while being written.") from None
    plan = reader.plan
    return Snapshot(
        config=config, index=index, source=path, file_mtime=stat.st_mtime, file_mtime_ns=stat.st_mtime_ns,
        file_size=stat.st_size, rows=reader.rows, orders=len(index) + without_email,  # order numbers are unique: Irregular otherwise
        orders_without_email=without_email,
        rows_without_order=reader.skipped, loaded_at=time.time(), seconds=time.perf_counter() - started,
        layout=plan.layout, columns=plan.chosen, example_order_id=example,
        packer=packer or Packer(plan), renderer=Renderer(config, plan), encoding=encoding,
    )


def survey(snapshot):
    """For `check`: how many orders get each answer, and the status words seen per rule field."""
    for careful in (False, True):  # streamed like a load, so a big export fits in memory
        templates = Counter()
        fields = {f: Counter() for f in survey_fields(snapshot.config, snapshot.packer.plan)}
        reader = OrderReader(snapshot.config, snapshot.source, snapshot.encoding)
        try:
            for _, rows in reader.orders(careful):  # every order, those without an email too
                cells, items, tracking = snapshot.packer.unpack(snapshot.packer.pack(rows)[1])
                order = dict(zip(snapshot.packer.plan.order_fields, cells))
                for name, counter in fields.items():
                    counter[status_word(order.get(name, ""))] += 1
                if order.get("email"):
                    templates[snapshot.renderer.answer(cells, items, tracking)[0]] += 1
            return templates, fields
        except (Irregular, IndexError):  # as in build(): read again, carefully
            continue


def survey_fields(config, plan):
    """The fields that rules compare with words (statuses), as `check` reports them."""
    fields = [name for rule in config.rules for name, wanted in rule.conditions if wanted is not None]
    return [f for f in dict.fromkeys(fields) if f in plan.order_fields]


###############################################################################
# Rendering answers ###########################################################
###############################################################################

ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?\s*(?:Z|[+-]\d{2}:?\d{2}|UTC)?")


def readable(value):
    """Dates read as people write them: '2026-11-28 10:00 -0400' -> '28 Nov 2026'."""
    # The pattern only where a date can start: most values ('#1001', '1 x Hat') skip it.
    match = ISO_DATE.fullmatch(value) if value[4:5] == "-" and value[:4].isdigit() else None
    if not match:
        return value
    try:
        return date(*map(int, match.groups())).strftime("%-d %b %Y")
    except ValueError:
        return value


SAFE_URL = re.compile(r"https?://[^\s<>\"']+$")


def safe_url(value):
    """Only http(s) links go to the agent; anything else in a cell is dropped."""
    return value if SAFE_URL.match(value) else None


class Renderer:
    """Words the answer of one order: the tracking link, the rule, the template.

    This runs on every lookup, so what depends only on contexts.toml and the export's
    columns is worked out once, here: where each placeholder's value comes from (a
    cell's position, or a method for a derived one), and which rules an order's
    status words allow.
    """

    def __init__(self, config, plan):
        self.config = config
        at = {name: i for i, name in enumerate(plan.order_fields)}
        self.own_url_at = at.pop("tracking_url", None)  # the column's text; {tracking_url} is derived from it
        self.carrier_at = at.get("carrier")
        derived = {name: getattr(self, name) for name in DERIVED if name != "order_id"}
        self.source = {**at, **derived}  # a field -> its cell's position, or the method that derives it
        # Rules look at the words in a few fields, and an export has a handful of words per
        # field: the words narrow the rules down once. Whether a field is filled is checked
        # per order, only as far as the rules in order need it.
        wanted = (c for rule in config.rules for c in rule.conditions)
        names = [name for name in dict.fromkeys(n for n, words in wanted if words is not None)
                 if name in self.source]  # a field the export lacks reads "" in every order
        columns = [name for name in names if name in at]
        self.words_of = getter(tuple(at[name] for name in columns))
        # Words compared with a derived value (item_count = "1") are worked out per order.
        self.derived_words = tuple(derived[name] for name in names if name not in at)
        self.word_fields = (*columns, *(name for name in names if name not in at))
        self.fills = {name: tuple((field, self.source.get(field, self.nothing)) for field in template.fields)
                      for name, template in config.templates.items() if name not in MESSAGES}
        self.choices = {}  # the word fields' values as exported -> ((sources to be filled, Template), ...)
        self.words = {}  # memo of status_word
        self.carrier_pages = {}  # carrier name as exported -> its tracking page ("" when none)
        # [items] format with numbered places, so an item tuple (quantity, name, status) fills it as is.
        self.item_text = numbered(config.item_format, ("quantity", "name")).format

    def answer(self, cells, items, tracking):
        """(template name, JSON body) for an order's cells, items and tracking numbers (Packer.unpack's)."""
        url = self.link(cells, tracking)
        template = self.pick(cells, items, tracking, url)
        # A source is a cell's position or a method: the one test that tells them apart, inline.
        text = template.text.format_map({
            field: readable(cells[source].strip()) if source.__class__ is int else source(cells, items, tracking, url)
            for field, source in self.fills[template.name]})
        body = f'{{"context": {json_text(text)}, "tracking_url": {json_text(url) if url else "null"}}}'
        return template.name, body.encode()

    def pick(self, cells, items, tracking, url):
        """The first rule that matches picks the template; else the default."""
        words = self.words_of(cells)
        if self.derived_words:
            words += tuple(make(cells, items, tracking, url) for make in self.derived_words)
        choices = self.choices.get(words)
        if choices is None:
            choices = self.choices[words] = self.narrow(words)
        for needed, template in choices:
            for source in needed:
                if not (cells[source].strip() if source.__class__ is int else source(cells, items, tracking, url)):
                    break
            else:
                return template
        raise AssertionError("narrow() always ends with a choice that needs nothing")

    def narrow(self, words):
        """The rules that these words allow, in order, each with the sources it needs filled; the default last."""
        seen = dict(zip(self.word_fields, map(self.word, words)))
        choices = []
        for rule in self.config.rules:
            needed = tuple(self.source.get(name) for name in rule.needs_filled)
            if None in needed:
                continue  # it needs a column this export lacks: it never matches
            if rule.allows(seen):
                choices.append((needed, self.config.templates[rule.template]))
                if not needed:
                    return tuple(choices)  # no rule after this one can be reached
        choices.append(((), self.config.templates[self.config.default_template]))
        return tuple(choices)

    def word(self, value):
        """status_word, remembered: an export repeats a handful of status words."""
        word = self.words.get(value)
        if word is None:
            word = self.words[value] = status_word(value)
        return word

    def link(self, cells, tracking):
        """The export's own tracking link when it is a safe one, else one built from [carriers], else ""."""
        if self.own_url_at is not None and (own := safe_url(cells[self.own_url_at].strip())):
            return own
        if not tracking or self.carrier_at is None:
            return ""
        carrier = cells[self.carrier_at]
        page = self.carrier_pages.get(carrier)
        if page is None:
            page = self.carrier_pages[carrier] = carrier_page(self.config.carriers, carrier)
        return tracking_link(page, tracking[0]) if page else ""

    # The derived placeholders, each (cells, items, tracking numbers, tracking link) -> text.

    def tracking_url(self, cells, items, tracking, url):
        """The tracking link."""
        return url

    def items(self, cells, items, tracking, url):
        """Every line item, or [items] none when the order lists none."""
        return self.listing(items) or self.config.no_items

    def shipped_items(self, cells, items, tracking, url):
        """The items whose own status is one of [items] shipped."""
        return self.listing([i for i in items if self.word(i[2]) in self.config.shipped_item_statuses])

    def unshipped_items(self, cells, items, tracking, url):
        """The items not shipped yet."""
        return self.listing([i for i in items if self.word(i[2]) not in self.config.shipped_item_statuses])

    def item_count(self, cells, items, tracking, url):
        """How many items in all; an item with no number counts as one."""
        return str(sum(int(q) if q.isdigit() else 1 for q, _, _ in items))

    def tracking_number(self, cells, items, tracking, url):
        """The first tracking number."""
        return tracking[0] if tracking else ""

    def tracking_numbers(self, cells, items, tracking, url):
        """Every tracking number, comma-separated."""
        return ", ".join(tracking)

    def nothing(self, cells, items, tracking, url):
        """A mapped field that this export lacks."""
        return ""

    def listing(self, items):
        """'1 x Hat, 2 x Socks' as [items] format and separator say."""
        return self.config.item_separator.join(starmap(self.item_text, items))


def numbered(text, names):
    """text with each {name} as {i}, i its place in names: str.format(*values) then fills it."""
    return "".join(literal.replace("{", "{{").replace("}", "}}") + ("" if name is None else f"{{{names.index(name)}}}")
                   for literal, name, _, _ in Formatter().parse(text))


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


def message(config, name, **values):
    """A JSON body from one of the message templates (not found, missing, ...)."""
    return json.dumps({"context": config.templates[name].render(values)}, ensure_ascii=False).encode()


MAX_ORDER_ID = 64
MAX_EMAIL = 254
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
NOT_FOUND_ID_LENGTH = 20


def answer(snapshot, order_id, email):
    """(HTTP status, JSON body) for a lookup; the same function serves HTTP and the CLI."""
    config = snapshot.config
    if order_id is None or email is None:  # not valid UTF-8
        return 400, message(config, "invalid")
    order_id, email = order_id.strip(), email.strip()
    if len(order_id) > MAX_ORDER_ID or len(email) > MAX_EMAIL or CONTROL.search(order_id + email):
        return 400, message(config, "invalid")
    wanted = normalise_order_id(order_id)
    if not wanted or not email:
        missing = [what for what, given in (("the order number", wanted), ("the email address used for the order", email))
                   if not given]
        return 400, message(config, "missing", missing=" and ".join(missing))
    packed = snapshot.index.get(index_key(wanted, normalise_email(email)))
    if packed is not None:
        return 200, snapshot.render(packed)[1]
    # Never the caller's raw text: an AI reads this, and the caller may be hostile.
    return 404, message(config, "not_found", order_id=wanted[:NOT_FOUND_ID_LENGTH])


def mask_email(email):
    """'jane@example.com' -> 'j***@example.com' for logs."""
    local, _, domain = email.strip().partition("@")
    if not domain.replace(".", "").replace("-", "").isalnum():  # anything that could forge a log line
        domain = re.sub(r"[^\w.-]", "", domain)
    domain = domain[:64]
    return f"{local[:1]}***@{domain}" if local and domain else "***"


###############################################################################
# Serving state: loads, refusals, freshness ###################################
###############################################################################


class Service:
    """Holds the Snapshot being served and replaces it only with a good one."""

    def __init__(self, settings):
        self.settings = settings
        self.snapshot = None  # replaced by one assignment; readers never see a mix
        self.refused = None  # {"at", "file", "reason"} of the last refused load
        self.config_error = None  # why the last contexts.toml edit was refused
        self.from_last_good = False
        self.tried = None  # files_state() when a load last began, good or refused
        self._lock = threading.Lock()  # one load at a time

    def files_state(self):
        """The config and the export a load would read now, with sizes and times."""
        try:
            export = find_export(self.settings.data)
        except (UserError, OSError):
            export = None
        return file_state(self.settings.contexts), file_state(export)

    def build(self):
        """A new Snapshot from the configured files, checked by guard(); raises UserError."""
        # Taken before reading: a file that changes while it is read differs from this,
        # so the watcher reads it again.
        self.tried = self.files_state()
        config = load_config(self.settings.contexts)
        snapshot = build_snapshot(config, find_export(self.settings.data))
        self.guard(snapshot)
        return snapshot

    def start(self):
        """First load: the export, else the last good copy, else the export's error."""
        try:
            self.install(self.build())
        except ExportError as error:
            fallback = self.last_good_copy()
            if fallback is None:
                raise
            self.install(build_snapshot(load_config(self.settings.contexts), fallback), keep_copy=False)
            self.from_last_good = True
            self.note_refusal(error)
            log.error("SERVING THE LAST GOOD COPY of the export (%s, modified %s): %s",
                      fallback, iso_time(self.snapshot.file_mtime), error)
        return self.snapshot

    def reload(self):
        """Rebuild from the files; keep serving the current Snapshot if the new one is bad."""
        with self._lock, yielding():
            try:
                snapshot = self.build()
            except UserError as error:
                self.refuse(error)
                return False
            self.install(snapshot)
            return True

    def guard(self, snapshot):
        """Refuse an export with no orders, or far fewer than the one being served."""
        if not snapshot.orders:
            raise ExportError(f"{snapshot.source.name}: holds no orders (only a header?). "
                              "Re-export the orders; the last good data stays served.")
        current = self.snapshot
        ratio = snapshot.config.min_orders_ratio
        if current and snapshot.orders < current.orders * ratio:
            raise ExportError(
                f"{snapshot.source.name}: holds {snapshot.orders} orders, fewer than {ratio:.0%} of the "
                f"{current.orders} being served, so it looks cut off. If the shrink is real, lower "
                "[settings] min_orders_ratio in contexts.toml or restart the service."
            )

    def refuse(self, error):
        """Keep what is served; remember and log why the new files were refused."""
        if isinstance(error, ConfigError):
            self.config_error = str(error)
        else:  # the config loaded before the export failed, so it is fine now
            self.config_error = None
            self.note_refusal(error)
        log.error("refused, still serving %s: %s",
                  self.snapshot.source.name if self.snapshot else "nothing", error)

    def note_refusal(self, error):
        """Remember a refused export for /healthz: when, which file, why."""
        name = str(error).split(":", 1)[0]
        self.refused = {"at": iso_time(time.time()), "file": Path(name).name, "reason": str(error)}

    def install(self, snapshot, keep_copy=True):
        """Serve snapshot from now on (one assignment) and keep a copy of its file."""
        self.snapshot = snapshot
        self.refused = None
        self.config_error = None
        self.from_last_good = False
        log.info("loaded %s", snapshot.describe())
        if keep_copy:
            self.keep_copy(snapshot)

    def keep_copy(self, snapshot):
        """Copy an accepted export to the state folder, for a restart after a bad night."""
        source, state = snapshot.source, self.settings.state
        target = state / ("last-good" + source.suffix.lower())
        try:
            if same_file_state(target, snapshot):
                return  # only contexts.toml changed
            state.mkdir(parents=True, exist_ok=True)
            partial = state / (".partial" + source.suffix.lower())
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
        except OSError as e:
            log.warning("could not keep a copy of %s in %s (%s); a restart after a bad export "
                        "would have no fallback", source.name, state, e.strerror)

    def last_good_copy(self):
        """The copy of the last accepted export, if there is one."""
        state = self.settings.state
        copies = sorted(state.glob("last-good.*")) if state.is_dir() else []
        return copies[0] if copies else None

    def unavailable(self):
        """The JSON body of a fault: contexts.toml's `unavailable`, or the shipped wording before any load."""
        snapshot = self.snapshot
        return UNAVAILABLE if snapshot is None else message(snapshot.config, "unavailable")

    def health(self, now=None):
        """(healthy, reasons, age in seconds) of the data being served."""
        now = time.time() if now is None else now
        snapshot = self.snapshot
        if snapshot is None:
            return False, ["no data loaded"], None
        age = max(0.0, now - snapshot.file_mtime)
        reasons = []
        if age > snapshot.config.max_age_hours * 3600:
            reasons.append(f"data is older than {snapshot.config.max_age_hours:g} hours")
        if self.from_last_good:
            reasons.append("serving the last good copy after a refused export")
        elif self.refused:
            reasons.append("the last export was refused")
        if self.config_error:
            reasons.append("the last contexts.toml edit was refused")
        return not reasons, reasons, age

    def status(self, now=None):
        """The details shown to a key holder: files, counts, timings, refusals; no customer data."""
        healthy, reasons, age = self.health(now)
        out = {"status": "ok" if healthy else "degraded", "reasons": reasons,
               "data_age_seconds": None if age is None else round(age)}
        snapshot = self.snapshot
        if snapshot:
            out.update(
                file=snapshot.source.name, file_modified=iso_time(snapshot.file_mtime),
                from_last_good_copy=self.from_last_good, layout=snapshot.layout,
                orders=snapshot.orders, rows=snapshot.rows, loaded_at=iso_time(snapshot.loaded_at),
                load_seconds=round(snapshot.seconds, 3), max_age_hours=snapshot.config.max_age_hours,
            )
        out["last_refused"] = self.refused
        out["config"] = "ok" if not self.config_error else self.config_error
        return out


RELOAD_SWITCH_INTERVAL = 0.0005


@contextmanager
def yielding():
    """While a reload runs, hand the GIL to request threads after 0.5 ms instead of 5 ms.

    A reload is seconds of pure Python; each request needs the GIL several times, and
    waiting the default 5 ms for it each time adds up to hundreds of milliseconds.
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(RELOAD_SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def same_file_state(path, snapshot):
    """True when path has the size and mtime the snapshot was read from."""
    return file_state(path)[1:] == (snapshot.file_size, snapshot.file_mtime_ns)


def iso_time(timestamp):
    """A UTC timestamp as ISO 8601."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


###############################################################################
# HTTP ########################################################################
###############################################################################

JSON = "application/json"
COMMON_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]


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
    """Counts wrong keys per client address; past the limit that address gets 429 for a while."""

    def __init__(self, limit, window=60.0, max_clients=10_000):
        self.limit, self.window, self.max_clients = limit, window, max_clients
        self.failures = {}  # address -> [window start, count]
        self.lock = threading.Lock()

    def retry_after(self, address, now=None):
        """Seconds until address may try a key again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        start, count = self.failures.get(address, (now, 0))
        if count < self.limit or now - start >= self.window:
            return 0
        return max(1, round(start + self.window - now))

    def failed(self, address, now=None):
        """Count one wrong key from address."""
        now = time.monotonic() if now is None else now
        with self.lock:
            entry = self.failures.get(address)
            if entry is None or now - entry[0] >= self.window:
                if len(self.failures) >= self.max_clients:  # bounded memory under a spray of addresses
                    self.failures = {a: e for a, e in self.failures.items() if now - e[0] < self.window}
                self.failures[address] = [now, 1]
            else:
                entry[1] += 1


LOOKUP_PARAMS = ("order_id", "customer_email")


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
            try:  # WSGI gives the query as Latin-1 text: back to its bytes, then strict UTF-8
                found[name] = unquote_to_bytes(value.encode("latin-1").replace(b"+", b" ")).decode("utf-8")
            except UnicodeError:
                found[name] = None
    return found.get("order_id", ""), found.get("customer_email", "")


CONTEXT_BODY = {
    "type": "object", "required": ["context"], "additionalProperties": False,
    "properties": {"context": {"type": "string", "description": "What the chat agent words its answer from; "
                                                                "always says whether the order was found."}},
}
FOUND_BODY = {
    "type": "object", "required": ["context", "tracking_url"], "additionalProperties": False,
    "properties": {
        "context": {"type": "string"},
        "tracking_url": {"type": ["string", "null"], "pattern": "^https?://", "description": "A tracking link, or null."},
    },
}
HEALTH_BODY = {
    "type": "object", "required": ["status", "data_age_seconds"],
    "properties": {
        "status": {"enum": ["ok", "degraded"]},
        "data_age_seconds": {"type": ["integer", "null"]},
        "reasons": {"type": "array", "items": {"type": "string"}},
        "file": {"type": "string"}, "file_modified": {"type": "string"},
        "from_last_good_copy": {"type": "boolean"}, "layout": {"type": "string"},
        "orders": {"type": "integer"}, "rows": {"type": "integer"},
        "loaded_at": {"type": "string"}, "load_seconds": {"type": "number"},
        "max_age_hours": {"type": "number"},
        "last_refused": {"type": ["object", "null"]}, "config": {"type": "string"},
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
    "info": {"title": "Order lookup", "version": __version__,
             "description": "Answers a chat agent's order-tracking lookups from a shop's orders export."},
    "components": {"securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
    "paths": {
        "/lookup": {"get": {
            "summary": "Look an order up by its number and the customer's email",
            "security": [{"apiKey": []}],
            "parameters": [
                {"name": "order_id", "in": "query", "required": True,
                 "schema": {"type": "string", "maxLength": MAX_ORDER_ID}, "example": "#1001",
                 "description": "The order number; '#', spaces, punctuation and case are ignored."},
                {"name": "customer_email", "in": "query", "required": True,
                 "schema": {"type": "string", "maxLength": MAX_EMAIL}, "example": "jane@example.com",
                 "description": "The email of the order; case and surrounding spaces are ignored."},
            ],
            "responses": {
                "200": json_response("The order was found.", FOUND_BODY),
                "400": json_response("A parameter is missing, blank or not valid; the context says what to ask for.",
                                     CONTEXT_BODY),
                "401": {"description": "The x-api-key header is missing or wrong. Empty body.",
                        "content": {JSON: {"schema": {"type": "string", "maxLength": 0}}}},
                "404": json_response("No order with that number and that email. The same whether or not the "
                                     "number exists.", CONTEXT_BODY),
                "429": json_response("Too many wrong keys from this address.", CONTEXT_BODY,
                                     {"Retry-After": {"schema": {"type": "string"}}}),
                "500": json_response("The service has a fault.", CONTEXT_BODY),
                "503": json_response("No data is loaded yet.", CONTEXT_BODY),
            },
        }},
        "/healthz": {"get": {
            "summary": "Health and data age for uptime monitors; details with a valid key",
            "security": [{}, {"apiKey": []}],
            "responses": {
                "200": json_response("Healthy: data loaded, fresh, nothing refused.", HEALTH_BODY),
                "503": json_response("Degraded: stale data, a refused export or config, or no data.", HEALTH_BODY),
                "429": json_response("Too many wrong keys from this address.", CONTEXT_BODY),
            },
        }},
    },
}


def create_app(service, write_request=None):
    """The WSGI application: Bottle routes wrapped in the request log (see RequestLog for write_request)."""
    app = bottle.Bottle()
    app.config["catchall"] = True
    # Every route returns its body ready-made: the JSON and template plugins would only wrap
    # each call in one more function.
    app.uninstall(True)
    keys = tuple(key.encode("utf-8") for key in service.settings.api_keys)
    throttle = Throttle(service.settings.key_failures_per_minute)

    def check_key(environ, required):
        """True for a valid key; counts wrong ones and stops a guessing client with 429."""
        # The raw value: Bottle's headers decode as UTF-8 and raise on any other byte.
        given = environ.get("HTTP_X_API_KEY")
        if key_ok(keys, given):
            return True  # the right key is never throttled
        if given:
            # REMOTE_ADDR, not Bottle's remote_addr, which believes any X-Forwarded-For: waitress
            # rewrites REMOTE_ADDR from the proxy's headers only for a TRUSTED_PROXY.
            address = environ.get("REMOTE_ADDR") or "-"
            wait = throttle.retry_after(address)
            if wait:
                raise bottle.HTTPError(429, retry_after=str(wait))
            throttle.failed(address)
        if required:
            raise bottle.HTTPResponse(b"", 401, content_type=JSON)
        return False

    @app.get("/lookup")
    def lookup():
        environ = bottle.request.environ  # once: each bottle.request attribute goes through a thread-local
        bottle.response.content_type = JSON
        check_key(environ, required=True)
        order_id, email = lookup_params(environ.get("QUERY_STRING", ""))
        environ["orders.lookup"] = (order_id, email)  # for the log line, worked out off the request's path
        snapshot = service.snapshot
        if snapshot is None:
            bottle.response.status = 503
            return service.unavailable()
        status, body = answer(snapshot, order_id, email)
        if status != 200:  # a response starts as 200
            bottle.response.status = status
        return body

    @app.get("/healthz")
    def healthz():
        bottle.response.content_type = JSON
        detailed = check_key(bottle.request.environ, required=False)
        healthy, _, age = service.health()
        bottle.response.status = 200 if healthy else 503
        if detailed:
            return json.dumps(service.status())
        return json.dumps({"status": "ok" if healthy else "degraded",
                           "data_age_seconds": None if age is None else round(age)})

    @app.get("/livez")
    def livez():
        bottle.response.content_type = JSON
        bottle.response.status = 200 if service.snapshot else 503
        return json.dumps({"serving": service.snapshot is not None})

    @app.get("/openapi.json")
    def openapi():
        bottle.response.content_type = JSON
        return json.dumps(OPENAPI)

    @app.route("/", method=["GET", "POST"])
    def status_page():
        for name, value in PAGE_HEADERS:
            bottle.response.set_header(name, value)
        password = (bottle.parse_auth(bottle.request.environ.get("HTTP_AUTHORIZATION", "")) or ("", ""))[1]
        if password:  # the key is the password of HTTP Basic; the user name is ignored
            bottle.request.environ["HTTP_X_API_KEY"] = password.encode("utf-8").decode("latin-1")
        if not check_key(bottle.request.environ, required=False):
            if "login" in bottle.request.query or password:
                bottle.response.status = 401
                bottle.response.set_header("WWW-Authenticate", 'Basic realm="Order lookup status", charset="UTF-8"')
            return PUBLIC_PAGE.render(public_view(service))
        tried = None
        if bottle.request.method == "POST":
            form = bottle.request.forms
            tried = try_lookup(service, form.getunicode("order_id", ""), form.getunicode("customer_email", ""))
        return STATUS_PAGE.render(status_view(service, tried))

    app.default_error_handler = lambda error: json_error(error, service)
    return RequestLog(app, write_request, service.unavailable)


###############################################################################
# Status page #################################################################
###############################################################################

PAGE_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    # One page, no external assets: nothing may load, frame it, or be sent elsewhere.
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]

# Made-up values to show each template the way the chat agent would read it.
SAMPLE = {
    "order_id": "#1001", "items": "2 x Merino Wool Socks, 1 x Beanie", "item_count": "3",
    "shipped_items": "2 x Merino Wool Socks", "unshipped_items": "1 x Beanie",
    "tracking_number": "1Z999AA10123456784", "tracking_numbers": "1Z999AA10123456784",
    "tracking_url": "https://www.ups.com/track?tracknum=1Z999AA10123456784", "carrier": "UPS",
    "estimated_delivery": "2026-12-02", "order_date": "2026-11-27", "shipped_at": "2026-11-28",
    "status": "fulfilled", "financial_status": "paid", "missing": "the email address used for the order",
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
    view = {"color": color, "word": FRESHNESS_WORDS[color], "reasons": reasons, "status": service.status(),
            "age": describe_age(age), "tried": tried, "rules": [], "templates": []}
    if config:
        view["rules"] = [(rule.number, describe_when(rule), rule.template) for rule in config.rules]
        view["rules"].append(("", "no rule matches", config.default_template))
        view["templates"] = [(name, sample_text(template)) for name, template in config.templates.items()]
    return view


def describe_when(rule):
    """A rule's conditions in words: status is shipped or delivered, tracking_url is filled."""
    if not rule.conditions:
        return "always"
    parts = [f"{name} is filled" if wanted is None else f"{name} is {' or '.join(sorted(wanted))}"
             for name, wanted in rule.conditions]
    return ", and ".join(parts)


def sample_text(template):
    """A template rendered on made-up values (any other column shows as its name)."""
    return template.render({f: SAMPLE.get(f, f"[{f}]") for f in template.fields})


def describe_age(age):
    """'3 h 12 min' for an age in seconds."""
    if age is None:
        return "no data"
    minutes = int(age // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def try_lookup(service, order_id, email):
    """The status and JSON the chat platform would get for this lookup."""
    from http import HTTPStatus

    if service.snapshot is None:
        return {"status": "503 Service Unavailable", "body": service.unavailable().decode()}
    status, body = answer(service.snapshot, order_id, email)
    return {"status": f"{status} {HTTPStatus(status).phrase}", "body": body.decode(),
            "order_id": order_id, "email": email}


PAGE_STYLE = """<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:16px/1.5 system-ui,sans-serif;margin:0 auto;max-width:52rem;padding:1rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
.badge{display:inline-block;padding:.2rem .7rem;border-radius:1rem;color:#fff;font-weight:600}
.green{background:#1a7f37}.amber{background:#b35900}.red{background:#c62828}
table{border-collapse:collapse;width:100%}td,th{text-align:left;vertical-align:top;padding:.35rem;border-bottom:1px solid #ddd}
pre{background:#f4f4f4;padding:.7rem;white-space:pre-wrap;word-break:break-word}
input{font:inherit;padding:.4rem;width:100%;box-sizing:border-box;margin:.2rem 0 .6rem}
button{font:inherit;padding:.5rem 1rem}code{background:#f4f4f4;padding:0 .2rem}
</style>"""

PUBLIC_PAGE = bottle.SimpleTemplate(PAGE_STYLE + """<!doctype html><title>Order lookup</title>
<h1>Order lookup <span class="badge {{color}}" id="freshness">{{word}}</span></h1>
<p>Data age: {{age}}.</p>
<p>Details are for the shop's staff: <a href="/?login">sign in</a> with any user name and the
API key as the password.</p>
""")

STATUS_PAGE = bottle.SimpleTemplate(PAGE_STYLE + """<!doctype html><title>Order lookup status</title>
<h1>Order lookup <span class="badge {{color}}" id="freshness">{{word}}</span></h1>
<ul>
% for reason in reasons:
<li>{{reason}}</li>
% end
</ul>
<h2>Data</h2>
<table id="data">
<tr><th>File served</th><td>{{status.get("file", "none")}}{{" (the last good copy)" if status.get("from_last_good_copy") else ""}}</td></tr>
<tr><th>Kind of export</th><td>{{status.get("layout", "")}}</td></tr>
<tr><th>Exported</th><td>{{status.get("file_modified", "")}} ({{age}} ago)</td></tr>
<tr><th>Orders / rows</th><td>{{status.get("orders", 0)}} / {{status.get("rows", 0)}}</td></tr>
<tr><th>Last load</th><td>{{status.get("loaded_at", "")}}, took {{status.get("load_seconds", "")}} s</td></tr>
<tr><th>Last refused</th><td>{{(status["last_refused"]["file"] + ": " + status["last_refused"]["reason"]) if status["last_refused"] else "none"}}</td></tr>
<tr><th>contexts.toml</th><td>{{status["config"]}}</td></tr>
</table>
<h2>Rules: the first that matches picks the answer</h2>
<table id="rules"><tr><th>#</th><th>when</th><th>answer</th></tr>
% for number, when, template in rules:
<tr><td>{{number}}</td><td>{{when}}</td><td><code>{{template}}</code></td></tr>
% end
</table>
<h2>Answers, shown on a made-up order</h2>
<table id="templates">
% for name, text in templates:
<tr><th><code>{{name}}</code></th><td>{{text}}</td></tr>
% end
</table>
<h2>Try a lookup</h2>
<form method="post" action="/" autocomplete="off">
<label>Order number <input name="order_id" value="{{tried["order_id"] if tried and "order_id" in tried else ""}}"></label>
<label>Email <input name="customer_email" type="email" value="{{tried["email"] if tried and "email" in tried else ""}}"></label>
<button>Look up</button></form>
% if tried:
<p>The chat platform would get <strong id="tried-status">{{tried["status"]}}</strong> and:</p>
<pre id="tried-body">{{tried["body"]}}</pre>
% end
""")


# Before any contexts.toml has loaded, a fault is worded as the shipped `unavailable` template.
UNAVAILABLE = json.dumps({"context": "The order could not be checked right now. Please try again in a few "
                                     "minutes or contact support."}).encode()

ERROR_TEXTS = {
    404: "There is nothing at this address. Orders are looked up at /lookup.",
    405: "This address only answers GET requests.",
    429: "Too many wrong API keys from this address. Try again later with the right key.",
}


def json_error(error, service):
    """Bottle's errors (404, 405, 500, ...) as JSON, never an HTML page or a traceback."""
    bottle.response.content_type = JSON
    if error.status_code >= 500:
        return service.unavailable()
    text = ERROR_TEXTS.get(error.status_code, "The request could not be handled.")
    return json.dumps({"context": text})


class RequestLog:
    """WSGI middleware: common headers, one log line per request, a JSON 500 whatever happens.

    The 500's body is unavailable(): contexts.toml's `unavailable` answer.

    Each request leaves a bare tuple, (time, address, method, path, status, milliseconds,
    (order number, email) or None), for write_request; request_line() makes the text.
    By default the line goes through logging at once. `serve` hands LogHandler.queue_request
    instead, whose flush thread makes the lines off the request's path.
    """

    def __init__(self, app, write_request=None, unavailable=lambda: UNAVAILABLE):
        self.app = app
        self.write_request = write_request or self.log_request
        self.unavailable = unavailable  # the body of a fault

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
            body = self.app(environ, respond)
        except Exception:
            log.exception("request failed")
            seen.append("500 Internal Server Error")
            try:
                fault = self.unavailable()
            except Exception:  # the fault's own wording must not be a second fault
                fault = UNAVAILABLE
            start_response(seen[-1], [("Content-Type", JSON), ("Content-Length", str(len(fault)))]
                           + COMMON_HEADERS, sys.exc_info())
            body = [fault]
        self.write_request((time.time(), environ.get("REMOTE_ADDR", "-"), environ.get("REQUEST_METHOD", "-"),
                            environ.get("PATH_INFO", ""), seen[-1] if seen else "-",
                            (time.perf_counter() - started) * 1000, environ.get("orders.lookup")))
        return body


def request_line(entry):
    """A request's log line (without time and level): never a query, a full email or a control character."""
    _, address, method, path, status, milliseconds, lookup = entry
    line = f"{address} {method} {sanitise_path(path)} {status.split(' ', 1)[0]} {milliseconds:.1f}ms"
    if lookup is None:
        return line
    order_id, email = lookup
    order = normalise_order_id(order_id or "")[:NOT_FOUND_ID_LENGTH] or "-"  # normalised: it cannot forge a line
    return f"{line} order={order} email={mask_email(email) if email else '-'}"


def sanitise_path(path):
    """The path for a log line: printable, short, never the query."""
    if path.isascii() and path.isprintable() and " " not in path:
        return path[:100] or "/"
    return re.sub(r"[^\x21-\x7e]", "?", path)[:100] or "/"


###############################################################################
# Watching files ##############################################################
###############################################################################


class Watcher:
    """Reloads when the export or contexts.toml changes and has stopped changing."""

    def __init__(self, service):
        self.service = service
        self.settings = service.settings
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.observer = None
        self.thread = None

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
        """Wait for a change (or poll), let the files settle, reload once."""
        self.changed.set()  # look once at the start: a change made before watching began counts
        while not self.stopping.is_set():
            self.changed.wait(self.settings.poll_seconds)
            self.changed.clear()
            if self.stopping.is_set():
                return
            # Against what the service last tried to load, not what it serves: a refused
            # file is not read again until it changes.
            if self.settle() != self.service.tried:
                self.service.reload()

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


###############################################################################
# Command line ################################################################
###############################################################################


def build_parser():
    """python app.py [serve|check|lookup|probe] with the options each takes."""
    files = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option not given must not hide the environment variable.
    files.add_argument("--data", default=argparse.SUPPRESS, metavar="PATH",
                       help="export file, or folder whose newest .csv/.xlsx is served (env ORDERS_FILE; default data/)")
    files.add_argument("--contexts", default=argparse.SUPPRESS, metavar="FILE",
                       help="answers and column mapping (env CONTEXTS_FILE; default contexts.toml beside app.py)")
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--host", default=argparse.SUPPRESS, help="address to listen on (env HOST; default 127.0.0.1)")
    listen.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port (env PORT; default 8080)")
    parser = argparse.ArgumentParser(
        prog="app.py", parents=[files, listen],
        description="Answer a chat agent's order lookups from a shop's orders export.")
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
        return 1
    except KeyboardInterrupt:
        return 130


def run_check(settings, args):
    """Load config and export as serving would; print what was found and what to fix."""
    config = load_config(settings.contexts)
    print(f"config   {settings.contexts}: ok ({len(config.templates)} templates, {len(config.rules)} rules)")
    path = find_export(settings.data)
    snapshot = build_snapshot(config, path)
    template_counts, status_values = survey(snapshot)
    print(f"export   {path} ({snapshot.layout}, modified {iso_time(snapshot.file_mtime)})")
    for field_name, header in snapshot.columns.items():
        print(f"column   {field_name:<18} <- \"{header}\"")
    missing = [f for f in config.columns if f not in snapshot.columns]
    if missing:
        print(f"no column for {', '.join(missing)} (their placeholders stay empty)")
    print(f"rows     {snapshot.rows}; orders {snapshot.orders}; read in {snapshot.seconds:.2f}s")
    print(f"format   order numbers look like {snapshot.example_order_id!r}: give this format to the chat platform")
    for field_name, counts in status_values.items():
        print(f"values   {field_name}: " + ", ".join(f"{v or '(empty)'} {n}" for v, n in counts.most_common(12)))
    print("answers  " + ", ".join(f"{t} {n}" for t, n in template_counts.most_common()))
    if snapshot.orders_without_email:
        print(f"warning  {snapshot.orders_without_email} orders have no email and can never be found")
    if snapshot.rows_without_order:
        print(f"warning  {snapshot.rows_without_order} rows have no order number and were skipped")
    if not snapshot.index:
        print("error    no order can be found: none has both an order number and an email", file=sys.stderr)
        print("FAILED")
        return 1
    print("OK")
    return 0


def run_lookup(settings, args):
    """Print the status line and the exact JSON body the chat platform would get."""
    from http import HTTPStatus

    config = load_config(settings.contexts)
    snapshot = build_snapshot(config, find_export(settings.data))
    status, body = answer(snapshot, args.order_id, args.email)
    print(f"{status} {HTTPStatus(status).phrase}")
    print(body.decode())
    return 0


PROBE_SLOW = 2.0  # seconds; the platform gives up at 5


def run_probe(settings, args):
    """Call a deployed endpoint as the chat platform does; a PASS/FAIL line per check."""
    from urllib.parse import urlencode, urlsplit

    if bool(args.order) != bool(args.email):
        raise SettingsError("give --order and --email together, for an order that exists.")
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{args.url!r} is not an http(s) URL; give the lookup endpoint, "
                            "e.g. https://orders.example.com/lookup.")
    base = args.url.split("?", 1)[0]
    unknown = "PROBE" + secrets.token_hex(4).upper()
    checks = [
        ("no key is refused with 401", {"order_id": "1", "customer_email": "probe@example.invalid"}, None, 401, None),
        ("missing parameters get 400 and a context", {}, args.key, 400, "context"),
        ("an unknown order gets 404 and a context", {"order_id": unknown, "customer_email": "probe@example.invalid"},
         args.key, 404, "context"),
    ]
    if args.order:
        checks.append((f"order {args.order} is found: 200, context and tracking_url",
                       {"order_id": args.order, "customer_email": args.email}, args.key, 200, "found"))
    failures = answered = 0
    for what, query, key, wanted, shape in checks:
        problem, seconds = probe_once(f"{base}?{urlencode(query)}" if query else base, key, wanted, shape)
        failures += bool(problem)
        answered += not problem.startswith("no answer")
        print(f"{'FAIL' if problem else 'PASS'}  {what} ({seconds * 1000:.0f} ms){': ' + problem if problem else ''}")
    failures += report_tls(parts, answered)
    print("all checks passed: give the platform this URL and key" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


def probe_once(url, key, wanted, shape):
    """(problem or "", seconds) for one GET: status, JSON content type, body shape, time."""
    import ssl
    import urllib.error
    import urllib.request

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
            print("FAIL  TLS: no request got an answer over TLS (see above: a certificate not valid for "
                  "the host, or nothing listening)")
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
    if settings.one_cpu and (cpu := keep_to_one_cpu()) is not None:
        log.info("kept on CPU %s (ONE_CPU=no lets it move between CPUs)", cpu)
    service = Service(settings)
    service.start()
    if settings.api_keys:
        for warning in weak_key_warnings(settings.api_keys):
            log.warning("WEAK KEY: %s; make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"",
                        warning)
        key_status = f"{len(settings.api_keys)} key(s) from API_KEY"
    else:
        key = secrets.token_urlsafe(24)
        settings = service.settings = replace(settings, api_keys=(key,))
        print(f"\nWARNING: API_KEY is not set. For trying out only, this run accepts the key:\n\n    {key}\n\n"
              "Set API_KEY before serving real traffic.\n", file=sys.stderr, flush=True)
        key_status = "generated for this run"
    server = make_server(create_app(service, request_writer()), settings)
    # systemd and docker stop with SIGTERM: leave through the same door as Ctrl-C, logs flushed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    watcher = Watcher(service).start()
    log.info("serving %s on http://%s:%s/lookup (key: %s)", service.snapshot.source,
             settings.host, server.effective_port, key_status)
    try:
        server.run()
    finally:
        watcher.stop()
        server.close()
    return 0


def keep_to_one_cpu():
    """Keep every thread of this process on the lowest CPU it may use; that CPU, or None when there is no choice."""
    # Only one thread runs Python at a time, so a second CPU adds little but the cost of
    # waking threads across CPUs for every request. On a 2-CPU virtual machine, kept on one
    # CPU, the service answered 60% more lookups a second, and twice as many behind nginx.
    if not hasattr(os, "sched_getaffinity"):  # not Linux: leave it to the system
        return None
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    cpu = min(allowed)
    try:
        os.sched_setaffinity(0, {cpu})  # this thread, and so every thread it starts from now on
    except OSError:  # not allowed here (a sandbox): leave it to the system, and say nothing
        return None
    for thread in os.listdir("/proc/self/task"):  # threads already started (the log's)
        with suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(thread), {cpu})
    return cpu


def make_server(app, settings, **overrides):
    """A waitress server for app, chosen so stalled clients cannot lock the platform out."""
    import waitress.server

    options = waitress_options(settings)
    options.update(overrides)
    server = waitress.server.create_server(app, **options)
    server.channel_class = json_error_channel()
    return server


def json_error_channel():
    """Waitress's channel, answering what it rejects itself (oversized headers, ...) in JSON."""
    from waitress.channel import HTTPChannel
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

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    return JsonErrorChannel


def waitress_options(settings):
    """The server's settings, chosen so stalled clients cannot lock the platform out."""
    options = dict(
        host=settings.host, port=settings.port, threads=settings.threads, ident="orders",
        connection_limit=settings.connection_limit, channel_timeout=settings.channel_timeout,
        cleanup_interval=min(10, settings.channel_timeout), asyncore_use_poll=True,
        max_request_header_size=16384, max_request_body_size=65536, clear_untrusted_proxy_headers=True,
    )
    if settings.trusted_proxy:
        options.update(trusted_proxy=settings.trusted_proxy, trusted_proxy_headers=settings.trusted_proxy_headers)
    return options


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
        self.timer = threading.Thread(target=self.flush_every, args=(interval,), name="log-flush", daemon=True)
        self.timer.start()

    def emit(self, record):
        self.write_pending()
        super().emit(record)

    def write_pending(self):
        """Write the queued request lines in one go."""
        line, lines = self.formatter.line, []
        while self.pending:
            entry = self.pending.popleft()
            try:
                text = request_line(entry)
            except Exception:  # one odd request must not stop every later line: this thread writes them all
                text = "a request whose log line could not be made"
            lines.append(line(entry[0], "INFO", access_log.name, text))
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    def flush_now(self):
        """Write out what is queued."""
        with self.lock:
            try:
                self.write_pending()
            except (OSError, ValueError):
                pass  # stderr closed: nothing to tell anyone

    def flush_every(self, interval):
        """The queue's clock."""
        while True:
            time.sleep(interval)
            self.flush_now()


def request_writer():
    """LogHandler.queue_request when serve's handler writes every line and request lines are wanted; else None."""
    handlers = logging.getLogger().handlers
    if access_log.isEnabledFor(logging.INFO) and len(handlers) == 1 and isinstance(handlers[0], LogHandler):
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


COMMANDS = {"serve": run_serve, "check": run_check, "lookup": run_lookup, "probe": run_probe}

if __name__ == "__main__":
    sys.exit(main())
