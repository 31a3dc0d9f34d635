"""Enrichment of parsed events (SPEC 1): app id and name, user agent, exclusion."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path

import ua_parser
import yaml
from ua_parser import Domain

from shared.config import Config
from shared.events import UserEvent

_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_UA_MARKER = "UserAgent:"

UaFields = tuple[str, str, str, str]
_NO_UA: UaFields = ("", "", "", "")


def app_id_from_context(context: str) -> str:
    """The GUID after `/app/` at the start of the context, or ''."""
    if not context.startswith("/app/"):
        return ""
    segment = context[5:]
    for stop in ("?", "/"):
        segment = segment.partition(stop)[0]
    return segment if _GUID.fullmatch(segment) else ""


def user_agent_from_message(message: str) -> str:
    """The text after the first `UserAgent:`, trimmed, single quotes removed."""
    _, marker, rest = message.partition(_UA_MARKER)
    return rest.strip().replace("'", "").strip() if marker else ""


class UserAgentParser:
    """ua-parser (its Rust resolver when installed) behind a bounded cache.

    Real traffic repeats a few hundred agents, so nearly every lookup is a dict hit.
    When full, the oldest entry goes (insertion order): cheap and good enough here.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        resolver = ua_parser.BestAvailableResolver(ua_parser.load_builtins())
        self._parser = ua_parser.Parser(resolver)
        self._cache: dict[str, UaFields] = {}
        self._cache_size = cache_size

    def __call__(self, agent: str) -> UaFields:
        found = self._cache.get(agent)
        if found is None:
            found = self.parse_uncached(agent)
            if self._cache_size:
                if len(self._cache) >= self._cache_size:
                    del self._cache[next(iter(self._cache))]
                self._cache[agent] = found
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

    def is_excluded(self, event: UserEvent) -> bool:
        if not self.excluded:
            return False
        return (event.user_directory.casefold(), event.user_id.casefold()) in self.excluded

    def enrich(self, event: UserEvent) -> None:
        app_id = app_id_from_context(event.context)
        if app_id:
            event.app_id = app_id
            event.app_name = self.app_names.get(app_id.lower(), "")
        agent = user_agent_from_message(event.message)
        if agent:
            (
                event.ua_browser_name,
                event.ua_browser_major,
                event.ua_os_name,
                event.ua_os_version,
            ) = self.user_agents(agent)


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
