"""Enrichment of parsed events (SPEC 1): app id and name, user agent, exclusion."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import msgspec
import ua_parser
import yaml
from ua_parser import Domain

from shared.config import Config, ConfigError
from shared.events import UserEvent

_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# A GUID has 36 characters and neither `?` nor `/`: after `/app/` (5), it is the slot
# context[5:41], followed by `?`, `/` or nothing.
_GUID_SLOT = slice(5, 41)
_AFTER_GUID = ("", "?", "/")
_APP_KEY_CACHE_SIZE = 4096
_UA_MARKER = "UserAgent:"

UaFields = tuple[str, str, str, str]
_NO_UA: UaFields = ("", "", "", "")
_Value = TypeVar("_Value")


def app_id_from_context(context: str) -> str:
    """The GUID after `/app/` at the start of the context, or ''."""
    if not context.startswith("/app/") or context[41:42] not in _AFTER_GUID:
        return ""
    slot = context[_GUID_SLOT]
    return slot if _GUID.fullmatch(slot) else ""


def user_agent_from_message(message: str) -> str:
    """The text after the first `UserAgent:`, trimmed, single quotes removed."""
    _, marker, tail = message.partition(_UA_MARKER)
    return _clean_agent(tail) if marker else ""


def _clean_agent(tail: str) -> str:
    return tail.strip().replace("'", "").strip()


def _store(cache: dict[str, _Value], key: str, value: _Value, size: int) -> None:
    """Cache `value`, dropping the oldest entry when full (keys come from outside)."""
    if len(cache) >= size:
        del cache[next(iter(cache))]
    cache[key] = value


_BUILTIN_RESOLVER: list[ua_parser.Resolver] = []


def builtin_resolver() -> ua_parser.Resolver:
    """ua-parser's resolver for its built-in rules, built once per process: built in the
    fork server (senseflow/preload.py), its ~25 MB of compiled rules are shared by every
    worker forked from there, copy-on-write."""
    if not _BUILTIN_RESOLVER:
        _BUILTIN_RESOLVER.append(ua_parser.BestAvailableResolver(ua_parser.load_builtins()))
    return _BUILTIN_RESOLVER[0]


class UserAgentParser:
    """ua-parser (its Rust resolver when installed) behind a bounded cache.

    Real traffic repeats a few hundred agents, so nearly every lookup is a dict hit.
    When full, the oldest entry goes (insertion order): cheap and good enough here.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        self._parser = ua_parser.Parser(builtin_resolver())
        self._cache: dict[str, UaFields | None] = {}
        self._cache_size = cache_size

    def from_tail(self, tail: str) -> UaFields | None:
        """The fields of the agent in `tail` (the text after `UserAgent:`), None if empty.

        Cached by the raw tail, so that a hit skips trimming the agent too.
        """
        try:
            return self._cache[tail]
        except KeyError:
            pass
        agent = _clean_agent(tail)
        found = self.parse_uncached(agent) if agent else None
        if self._cache_size:
            _store(self._cache, tail, found, self._cache_size)
        return found

    def parse_uncached(self, agent: str) -> UaFields:
        if not agent:
            return _NO_UA
        result = self._parser(agent, Domain.USER_AGENT | Domain.OS)
        name = major = os_name = os_version = ""
        browser, os_ = result.user_agent, result.os
        if browser is not None and browser.family != "Other":
            name, major = browser.family, browser.major or ""
        if os_ is not None and os_.family != "Other":
            os_name = os_.family
            os_version = ".".join(p for p in (os_.major, os_.minor, os_.patch) if p)
        return (name, major, os_name, os_version)


class Enricher:
    """Turns a parsed event into a complete one, or says it is excluded."""

    def __init__(self, config: Config, app_names: Mapping[str, str] | None = None) -> None:
        user_events = config.butler.user_events
        self.excluded = frozenset(
            (u.directory.casefold(), u.user_id.casefold()) for u in user_events.exclude_user or []
        )
        self.app_names: Mapping[str, str] = app_names or {}
        self.user_agents = UserAgentParser(config.pipeline.ua_cache_size)
        self._app_keys: dict[str, str] = {}  # GUID slot -> key of app_names, '' if no GUID

    def is_excluded(self, event: UserEvent) -> bool:
        if not self.excluded:
            return False
        return (event.user_directory.casefold(), event.user_id.casefold()) in self.excluded

    def enrich(self, event: UserEvent) -> None:
        context = event.context
        if context.startswith("/app/") and context[41:42] in _AFTER_GUID:
            self._add_app(event, context[_GUID_SLOT])
        _, marker, tail = event.message.partition(_UA_MARKER)
        if marker:
            found = self.user_agents.from_tail(tail)
            if found is not None:
                (
                    event.ua_browser_name,
                    event.ua_browser_major,
                    event.ua_os_name,
                    event.ua_os_version,
                ) = found

    def _add_app(self, event: UserEvent, slot: str) -> None:
        key = self._app_keys.get(slot)
        if key is None:
            key = slot.lower() if _GUID.fullmatch(slot) else ""
            _store(self._app_keys, slot, key, _APP_KEY_CACHE_SIZE)
        if key:
            event.app_id = slot
            event.app_name = self.app_names.get(key, "")


def load_app_names(path: str | Path) -> dict[str, str]:
    """An app id -> name mapping from a YAML mapping / list of {id, name}, or a CSV file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].startswith("#")]
        if rows and rows[0][:2] == ["id", "name"]:
            rows = rows[1:]
        pairs = [(r[0], r[1]) for r in rows if len(r) >= 2]
    else:
        document = yaml.safe_load(text) or {}
        if isinstance(document, dict):
            pairs = [(str(k), str(v)) for k, v in document.items()]
        elif isinstance(document, list):
            pairs = [(str(d["id"]), str(d["name"])) for d in document]
        else:
            raise ValueError(f"{path}: expected a mapping of app id to name")
    return {app_id.strip().lower(): name for app_id, name in pairs}


def configured_app_names(config: Config) -> dict[str, str]:
    """The `senseflow.appNamesFile` mapping ({} when none); a bad file is a ConfigError."""
    path = config.pipeline.app_names_file
    if not path:
        return {}
    try:
        return load_app_names(path)
    except (OSError, ValueError, KeyError, msgspec.ValidationError) as exc:
        raise ConfigError([f"senseflow.appNamesFile: cannot load {path}: {exc}"]) from exc
