"""A deterministic corpus of realistic Qlik Sense user-event datagrams (SPEC 1).

Shared by `senseflow send`, the benchmarks and the tests, so that both measure the same
traffic. Everything is derived from a seeded `random.Random`: the same arguments give
the same list of datagrams, byte for byte, on every machine and Python version >= 3.11.

What the traffic looks like:

- 300 users in three user directories (`LAB`, `CORP`, `PARTNER`); a few users do most of
  the work (Zipf-like activity), each mostly uses one browser and one Sense node.
- 50 apps (`APP_IDS`, names from `app_names()`), a few of them popular; contexts are
  `/app/<guid>`, `/app/<guid>?reloadUri=<url-encoded sheet url>`, `/hub/...`, `/qmc/...`.
- ~30 real user agents (`USER_AGENTS`): Chrome / Edge / Firefox / Safari on Windows 10/11,
  macOS, iOS, Android and Linux, recent ones and a few old ones.
- Connections open and close far more often than sessions start and stop (each session
  opens several websocket connections). Open-connection and start-session messages carry
  a `UserAgent:`; close and stop messages do not.
- Both wire formats: Butler SOS's (format A, 70 % with `formats="both"`) and the short
  format of the user-events documentation (format B).
- Hosts `sense1` .. `sense4` (format A sends the bare host name, format B the FQDN).
- `invalid_share` replaces exactly `round(n * invalid_share)` datagrams, at random
  positions, by invalid ones: unknown source, too few fields, or a missing user.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "ACTION_WEIGHTS",
    "APP_IDS",
    "DIRECTORIES",
    "HOSTS",
    "USER_AGENTS",
    "app_names",
    "make_corpus",
]

HOSTS: tuple[str, ...] = ("sense1", "sense2", "sense3", "sense4")
_DOMAIN = "lab.ptarmiganlabs.net"
DIRECTORIES: tuple[str, ...] = ("LAB", "CORP", "PARTNER")
_DIRECTORY_WEIGHTS = (0.5, 0.35, 0.15)
_USER_COUNT = 300

ACTION_WEIGHTS: dict[str, float] = {
    "Open connection": 0.40,
    "Close connection": 0.40,
    "Start session": 0.10,
    "Stop session": 0.10,
}
"""Share of each action in the valid traffic."""

_SHORT_VERBS = {
    "Start session": "Start session",
    "Stop session": "Stop session",
    "Open connection": "Opening connection",
    "Close connection": "Closing connection",
}

USER_AGENTS: tuple[str, ...] = (
    # Chrome, Windows 10 / 11 (both report Windows NT 10.0)
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Safari/537.36",
    # Edge (Chromium), Windows
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36 Edg/130.0.2849.80",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91",
    # Firefox, Windows
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Firefox/115.0",
    # macOS
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.6 Safari/605.1.15",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14.7; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    # iOS / iPadOS
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS 16_7_10 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
    # Android
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.6723.107 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SAMSUNG SM-A536B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/23.0 Chrome/115.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Android 14; Mobile; rv:132.0) Gecko/132.0 Firefox/132.0",
    # Linux desktop
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    # Old ones that are still seen in corporate networks
    "Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/70.0.3538.102 Safari/537.36 Edge/18.17763",
    "Mozilla/5.0 (Windows NT 6.1; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/109.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 6.1; Win64; x64; rv:52.0) Gecko/20100101 Firefox/52.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_11_6) AppleWebKit/601.7.7 (KHTML, like Gecko) "
    "Version/9.1.2 Safari/601.7.7",
)
"""Real browser user agents, the most common first (the weights below follow this order)."""

# Popularity of each agent as a user's main browser: Chrome and Edge on Windows dominate.
# fmt: off
_UA_WEIGHTS: tuple[float, ...] = (
    20, 8, 3, 1.5,  # Chrome Windows
    16, 6, 2,  # Edge Windows
    4, 2, 1.5,  # Firefox Windows
    4, 3, 3, 1, 1,  # macOS
    3, 3, 1, 1,  # iOS
    2, 2, 1, 0.5,  # Android
    1, 0.5,  # Linux
    0.3, 0.2, 0.5, 0.2, 0.1,  # old
)
# fmt: on


def _make_app_ids() -> tuple[str, ...]:
    rng = random.Random(0x5E45E)
    return tuple(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(50))


APP_IDS: tuple[str, ...] = _make_app_ids()
"""The 50 app ids (lower-case GUIDs, as Qlik Sense writes them)."""

_APP_NAMES: tuple[str, ...] = (
    "Sales Dashboard",
    "Sales Dashboard (EMEA)",
    "Finance - P&L",
    "Finance, Budget vs Actual",
    "HR Headcount",
    "Operations Monitor",
    "Butler SOS metrics",
    "Supply Chain Overview",
    "Customer 360",
    "Marketing Campaigns 2024",
    "Inventory Levels",
    "Procurement Spend",
    "IT Service Desk",
    "Qlik Sense Operations Monitor",
    "License Monitor",
    "Reloads Monitor",
    "Sessions Monitor",
    "Executive KPIs",
    "Manufacturing OEE",
    "Quality = Yield",
    'Logistics "Live"',
    "Fleet Tracking",
    "Energy Consumption",
    "Retail Store Performance",
    "E-commerce Funnel",
    "Web Analytics",
    "Call Center",
    "Claims Analysis",
    "Risk & Compliance",
    "Audit Trail",
    "Project Portfolio",
    "Time Reporting",
    "Payroll",
    "Recruitment Pipeline",
    "Training Records",
    "Asset Management",
    "Maintenance Planning",
    "Sales Forecast",
    "Pricing Analysis",
    "Margin Analysis",
    "Product Mix",
    "Customer Churn",
    "Net Promoter Score",
    "Support Tickets",
    "Cash Flow",
    "Accounts Receivable",
    "Accounts Payable",
    "Treasury",
    "Tax Reporting",
    "Åre Ski Resort Bookings",
)


def app_names() -> dict[str, str]:
    """App id -> app name, keyed like `workers.enrich.load_app_names` (lower-case id)."""
    return dict(zip(APP_IDS, _APP_NAMES, strict=True))


# fmt: off
_FIRST = (
    "anna", "erik", "lars", "maria", "karin", "johan", "sara", "peter", "emma", "nils",
    "joe", "jane", "mike", "linda", "david", "susan", "chris", "laura", "tom", "nina",
    "ahmed", "fatima", "wei", "li", "raj", "priya", "jörg", "zoë", "françois", "ola",
)
_LAST = (
    "berg", "svensson", "smith", "johnson", "lee", "müller", "garcia", "nilsson", "brown",
    "wilson", "khan", "patel", "chen", "wang", "lund", "dubois", "rossi", "novak",
)
# fmt: on


@dataclass(frozen=True, slots=True)
class _User:
    directory: str
    user_id: str
    agent: int  # index of the main user agent
    host: int  # index of the usual Sense node


def _make_users(rng: random.Random) -> list[_User]:
    users: list[_User] = []
    seen: set[tuple[str, str]] = set()
    service = [("LAB", "sa_repository"), ("LAB", "sa_scheduler"), ("CORP", "svc_qliksense")]
    for directory, user_id in service:
        seen.add((directory, user_id))
        users.append(_User(directory, user_id, 0, 0))
    while len(users) < _USER_COUNT:
        directory = rng.choices(DIRECTORIES, _DIRECTORY_WEIGHTS)[0]
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        style = rng.random()
        if directory == "PARTNER":
            user_id = f"{first}.{last}@partner-{rng.randint(1, 9)}.example"
        elif style < 0.6:
            user_id = f"{first}.{last}"
        elif style < 0.9:
            user_id = f"{first[:1]}{last}{rng.randint(1, 99)}"
        else:
            user_id = f"{first} {last}"  # display-name style ids exist, and need escaping
        if (directory, user_id) in seen:
            continue
        seen.add((directory, user_id))
        agent = rng.choices(range(len(USER_AGENTS)), _UA_WEIGHTS)[0]
        users.append(_User(directory, user_id, agent, rng.randrange(len(HOSTS))))
    return users


def _zipf(count: int, exponent: float) -> list[float]:
    return [1.0 / (rank + 1) ** exponent for rank in range(count)]


class _Generator:
    def __init__(self, rng: random.Random, formats: str) -> None:
        self.rng = rng
        self.formats = formats
        self.users = _make_users(rng)
        self.user_weights = _zipf(len(self.users), 0.9)
        order = list(range(len(APP_IDS)))
        rng.shuffle(order)
        self.apps = [APP_IDS[i] for i in order]
        self.app_weights = _zipf(len(self.apps), 1.0)
        self.actions = tuple(ACTION_WEIGHTS)
        self.action_weights = tuple(ACTION_WEIGHTS.values())
        self.sheets = [
            "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz", k=6))
            for _ in range(8)
        ]

    def valid(self) -> bytes:
        rng = self.rng
        user = rng.choices(self.users, self.user_weights)[0]
        action = rng.choices(self.actions, self.action_weights)[0]
        host = user.host if rng.random() < 0.9 else rng.randrange(len(HOSTS))
        agent = USER_AGENTS[user.agent if rng.random() < 0.85 else rng.randrange(len(USER_AGENTS))]
        context, origin = self._context(host)
        short = self.formats == "b" or (self.formats == "both" and rng.random() < 0.3)
        if short:
            return self._short(user, action, HOSTS[host], context, agent)
        return self._butler(user, action, HOSTS[host], origin, context, agent)

    def _context(self, host: int) -> tuple[str, str]:
        rng = self.rng
        draw = rng.random()
        if draw < 0.80:
            app = rng.choices(self.apps, self.app_weights)[0]
            if rng.random() < 0.25:
                return f"/app/{app}", "AppAccess"
            sheet = rng.choice(self.sheets)
            url = f"https://{HOSTS[host]}.{_DOMAIN}/sense/app/{app}/sheet/{sheet}/state/analysis"
            return f"/app/{app}?reloadUri={quote(url, safe='')}", "AppAccess"
        if draw < 0.94:
            return rng.choice(("/hub/", "/hub/my/work", "/hub/stream/aaec8d41-5201-43ab")), "Hub"
        return rng.choice(("/qmc/", "/qmc/apps", "/qmc/tasks")), "ManagementConsole"

    @staticmethod
    def _butler(
        user: _User, action: str, host: str, origin: str, context: str, agent: str
    ) -> bytes:
        source = (
            "/qseow-proxy-session/" if action.endswith("session") else "/qseow-proxy-connection/"
        )
        who = f"{user.directory}\\{user.user_id}"
        message = f"{action} for user '{who}'"
        if action in ("Open connection", "Start session"):
            message += f" with UserAgent: '{agent}'"
        fields = (source, host, action, user.directory, user.user_id, origin, context, message)
        return ";".join(fields).encode()

    def _short(self, user: _User, action: str, host: str, context: str, agent: str) -> bytes:
        verb = _SHORT_VERBS[action]
        message = f"{verb} for user '{user.directory}\\{user.user_id}'"
        if action in ("Open connection", "Start session") and self.rng.random() < 0.9:
            message += f" with UserAgent: '{agent}'"
        subsystem = "Audit.Proxy" if action.endswith("session") else "Proxy.WebSocket"
        fields = ("/proxy-user-event/", f"{host}.{_DOMAIN}", subsystem, context, message)
        return ";".join(fields).encode()

    def invalid(self) -> bytes:
        """An invalid datagram: unknown source, too few fields, or a missing user."""
        good = self.valid().decode()
        kind = self.rng.randrange(3)
        if kind == 0:  # unknown source: another appender, or a plain log line
            if self.rng.random() < 0.5:
                return ("/qseow-proxy-audit/" + good[good.index(";") :]).encode()
            return b"2024-11-25 14:50:04.123 INFO Proxy.Audit Heartbeat ok"
        fields = good.split(";")
        if kind == 1:  # too few fields: truncated datagram
            keep = 3 if fields[0] == "/proxy-user-event/" else self.rng.randint(2, 6)
            return ";".join(fields[:keep]).encode()
        # missing user
        if fields[0] == "/proxy-user-event/":
            verb = fields[4].split(" for user ", 1)[0]
            fields[4] = f"{verb} for user ''"
            return ";".join(fields[:5]).encode()
        fields[4] = ""
        return ";".join(fields).encode()


def make_corpus(
    n: int, seed: int = 1, invalid_share: float = 0.0, formats: str = "both"
) -> list[bytes]:
    """`n` datagrams; `formats` is "both", "a" (Butler SOS) or "b" (short)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= invalid_share <= 1.0:
        raise ValueError(f"invalid_share must be within 0..1, got {invalid_share}")
    if formats not in ("both", "a", "b"):
        raise ValueError(f"formats must be 'both', 'a' or 'b', got {formats!r}")
    rng = random.Random(seed)
    generator = _Generator(rng, formats)
    invalid = set(rng.sample(range(n), round(n * invalid_share)))
    return [generator.invalid() if i in invalid else generator.valid() for i in range(n)]
