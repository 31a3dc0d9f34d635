"""Configuration: a Butler SOS YAML file plus a `senseflow` section of our own.

The `Butler-SOS.*` sections keep Butler SOS's key names and meanings, so an operator
points us at the file they already have; keys we do not use are ignored there. Our own
section is strict: an unknown key there is a typo and is reported.

Any string value may reference an environment variable as `${NAME}` (or
`${NAME:-default}`), which is how secrets stay out of the file.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

BUTLER_SECTION = "Butler-SOS"
OWN_SECTION = "senseflow"
SECRET_KEYS = frozenset(
    {"password", "token", "insertApiKey", "clientCertPassphrase", "keyPassword"}
)
"""Keys whose values are secrets: a config error names their type, never their value."""


class Base(msgspec.Struct, frozen=True, rename="camel", kw_only=True):
    """Butler SOS sections: camelCase keys, unknown keys ignored."""


class Own(msgspec.Struct, frozen=True, rename="camel", kw_only=True, forbid_unknown_fields=True):
    """Our own section: camelCase keys, unknown keys are errors."""


class NameValue(Base, frozen=True):
    name: str
    value: str


class ExcludeUser(Base, frozen=True):
    directory: str
    user_id: str


class MessageQueue(Base, frozen=True):
    max_concurrent: int = 10
    max_size: int = 200
    backpressure_threshold: int = 80


class RateLimit(Base, frozen=True):
    enable: bool = False
    max_messages_per_minute: int = 600


class QueueMetricsInflux(Base, frozen=True):
    enable: bool = False
    write_frequency: int = 20000
    measurement_name: str = "user_events_queue"
    tags: list[NameValue] | None = None


class QueueMetrics(Base, frozen=True):
    influxdb: QueueMetricsInflux = QueueMetricsInflux()


class UdpServerConfig(Base, frozen=True):
    server_host: str = "0.0.0.0"
    port_user_activity_events: int = 9997
    message_queue: MessageQueue = MessageQueue()
    rate_limit: RateLimit = RateLimit()
    max_message_size: int = 65507
    enable_source_validation: bool = False
    allowed_sources: list[str] | None = None
    queue_metrics: QueueMetrics = QueueMetrics()


class Topic(Base, frozen=True):
    enable: bool = True
    topic: str = ""


class PostTo(Base, frozen=True):
    everything_topic: Topic = Topic(topic="qliksense/userevent")
    session_start_topic: Topic = Topic(topic="qliksense/userevent/session/start")
    session_stop_topic: Topic = Topic(topic="qliksense/userevent/session/stop")
    connection_open_topic: Topic = Topic(topic="qliksense/userevent/connection/open")
    connection_close_topic: Topic = Topic(topic="qliksense/userevent/connection/close")


class SendToMqtt(Base, frozen=True):
    enable: bool = False
    post_to: PostTo = PostTo()


class Enable(Base, frozen=True):
    enable: bool = False


class SendToInflux(Base, frozen=True):
    enable: bool = True


class SendToNewRelic(Base, frozen=True):
    enable: bool = False
    destination_account: list[str] | None = None
    scramble: bool = True


class UserEvents(Base, frozen=True):
    enable: bool = True
    exclude_user: list[ExcludeUser] | None = None
    udp_server_config: UdpServerConfig = UdpServerConfig()
    tags: list[NameValue] | None = None
    send_to_mqtt: SendToMqtt = msgspec.field(default=SendToMqtt(), name="sendToMQTT")
    send_to_influxdb: SendToInflux = SendToInflux()
    send_to_new_relic: SendToNewRelic = SendToNewRelic()


class InfluxAuth(Base, frozen=True):
    enable: bool = False
    username: str = ""
    password: str = ""


class RetentionPolicy(Base, frozen=True):
    name: str = "autogen"
    duration: str = "0s"


class InfluxV1(Base, frozen=True):
    auth: InfluxAuth = InfluxAuth()
    db_name: str = "senseops"
    retention_policy: RetentionPolicy = RetentionPolicy()


class InfluxV2(Base, frozen=True):
    org: str = ""
    bucket: str = ""
    token: str = ""


class InfluxV3(Base, frozen=True):
    database: str = ""
    token: str = ""
    write_timeout: int = 10000


class InfluxdbConfig(Base, frozen=True):
    enable: bool = False
    host: str = "127.0.0.1"
    port: int = 8086
    version: Literal[1, 2, 3] = 1
    max_batch_size: int = 1000
    v1_config: InfluxV1 = InfluxV1()
    v2_config: InfluxV2 = InfluxV2()
    v3_config: InfluxV3 = InfluxV3()


class MqttConfig(Base, frozen=True):
    enable: bool = False
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    base_topic: str = "butler-sos/"


class NewRelicEventAttributes(Base, frozen=True):
    static: list[NameValue] | None = None


class NewRelicEvent(Base, frozen=True):
    url: str = "https://insights-collector.eu01.nr-data.net"
    header: list[NameValue] | None = None
    attribute: NewRelicEventAttributes = NewRelicEventAttributes()


class NewRelic(Base, frozen=True):
    enable: bool = False
    event: NewRelicEvent = NewRelicEvent()


class NewRelicAccount(Base, frozen=True):
    account_name: str
    insert_api_key: str
    account_id: str


class ThirdPartyCredentials(Base, frozen=True):
    new_relic: list[NewRelicAccount] | None = None


class AppNames(Base, frozen=True):
    enable_app_name_extract: bool = False
    extract_interval: int = 60000
    host_ip: str = msgspec.field(default="", name="hostIP")


class Cert(Base, frozen=True):
    client_cert: str = ""
    client_cert_key: str = ""
    client_cert_ca: str = msgspec.field(default="", name="clientCertCA")
    # Butler SOS allows an empty (null) passphrase, as in its Docker example.
    client_cert_passphrase: str | None = ""


class EventCountInflux(Base, frozen=True):
    measurement_name: str = "event_count"
    tags: list[NameValue] | None = None


class EventCount(Base, frozen=True):
    enable: bool = False
    influxdb: EventCountInflux = EventCountInflux()


class QlikSenseEvents(Base, frozen=True):
    influxdb: QueueMetricsInflux = QueueMetricsInflux()
    event_count: EventCount = EventCount()


class ButlerSOS(Base, frozen=True):
    user_events: UserEvents = UserEvents()
    influxdb_config: InfluxdbConfig = InfluxdbConfig()
    mqtt_config: MqttConfig = MqttConfig()
    new_relic: NewRelic = NewRelic()
    third_party_tools_credentials: ThirdPartyCredentials = ThirdPartyCredentials()
    app_names: AppNames = AppNames()
    cert: Cert = Cert()
    qlik_sense_events: QlikSenseEvents = QlikSenseEvents()


class MqttTls(Own, frozen=True):
    enable: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    key_password: str = ""
    """Passphrase of an encrypted `keyFile`."""
    insecure: bool = False


class MqttOptions(Own, frozen=True):
    qos: Literal[0, 1, 2] = 1
    username: str = ""
    password: str = ""
    client_id: str = ""
    tls: MqttTls = MqttTls()
    max_inflight: int = 2000
    max_pending: int = 50_000


class NatsTls(Own, frozen=True):
    """TLS to the NATS servers (`tls://` URLs, or any URL once `caFile` is set)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


class NatsOptions(Own, frozen=True):
    """The NATS JetStream destination (workers/writer/sinks/nats.py)."""

    enable: bool = False
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    stream: str = "QLIKSENSE_USER_EVENTS"
    replicas: int = 1
    """Replicas of the stream when senseflow creates it (an existing stream is kept)."""
    duplicate_window: float = 120.0
    """Seconds JetStream remembers a `Nats-Msg-Id` (when senseflow creates the stream)."""
    subject_prefix: str = "qliksense.userevent"
    msg_id_prefix: str = ""
    """First part of every `Nats-Msg-Id` ('' : this machine's host name)."""
    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    tls: NatsTls = NatsTls()
    max_pending: int = 10_000
    """Publishes awaiting JetStream's acknowledgement at most (the writer waits then)."""
    ack_timeout: float = 5.0
    """Seconds without any acknowledgement before the unacknowledged are published again."""


class InfluxTls(Own, frozen=True):
    """HTTPS to InfluxDB (1.x, 2.x, 3.x); the server's certificate is verified unless
    `insecure`."""

    enable: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure: bool = False


class SpoolOptions(Own, frozen=True):
    """The writer's on-disk spool (workers/writer/spool.py): everything waits there, bounded."""

    directory: str = ""
    """Relative paths are relative to the working directory; empty: this instance's own
    directory under the state directory (workers/writer/spooldir.py)."""
    max_bytes: int = 1 << 30
    segment_bytes: int = 64 << 20
    fsync: Literal["never", "interval", "always"] = "interval"
    fsync_interval: int = 1000
    """ms between fsyncs with `fsync: interval`."""
    discard_mismatch: bool = False
    """Skip, for a destination, the records spooled for a different one (issue 12)."""


class HttpOptions(Own, frozen=True):
    """The supervisor's HTTP server (senseflow/httpserver.py); the port is `metricsPort`."""

    host: str = ""
    """Overrides `metricsHost` when set."""
    token: str = ""
    """Bearer token required for every path but /healthz ('' : none)."""
    username: str = ""
    password: str = ""
    """Basic auth required for every path but /healthz (with `username` set)."""
    max_connections: int = 64
    request_timeout: float = 10.0


class SessionOptions(Own, frozen=True):
    """Live sessions derived from the events (SPEC 3a, shared/sessions.py)."""

    enable: bool = True
    max_idle: int = 86_400
    """Seconds without an event after which a user is removed from a host."""
    snapshot_interval: int = 30
    """Seconds between session snapshots written to InfluxDB."""
    virtual_proxy: str = "events"
    """`user_session_virtual_proxy` tag value: events do not carry the virtual proxy."""
    mqtt_topic: str = ""
    """Retained per-host summaries go to `<mqttTopic>/<host>`; '' means
    `<everythingTopic>/sessions`."""
    app_metrics_limit: int = 20
    """Prometheus: per-app gauges for the top N apps by connections, the rest as `other`."""


class Pipeline(Own, frozen=True):
    """Pipeline tuning, the `senseflow` section; CLI flags override these."""

    readers: int = 1
    workers: int = 2
    batch_size: int = 5000
    flush_interval: int = 200
    queue_size: int = 64
    reader_batch_size: int = 500
    reader_flush_ms: int = 10
    reader_coalesce_ms: int = 2
    """While datagrams flow (>= 8 per this many ms), a reader reads its socket every this
    many ms (at most `reader_flush_ms`) rather than on every datagram's wake-up
    (receiver/polling.py); 0: off."""
    receive_buffer: int = 32 * 1024 * 1024
    summary_interval: int = 0
    on_unreachable: Literal["fail", "wait"] = "fail"
    startup_timeout: float = 10.0
    app_names_file: str = ""
    new_relic_ca_file: str = ""
    """PEM CA certificate(s) trusted for the New Relic URL, on top of the system's trust
    (a TLS-inspecting proxy, or a local stand-in in tests)."""
    ua_cache_size: int = 4096
    pending_events: int = 100_000
    """Events a destination holds in memory; the rest waits in the spool."""
    metrics_port: int = 0
    http_port: int = 0
    """The HTTP server's port (/metrics, /healthz, /api/sessions); overrides `metricsPort`,
    its older name, when > 0."""
    metrics_host: str = "127.0.0.1"
    health_deadline: float = 30.0
    """/healthz: seconds a destination may acknowledge nothing while events wait for it."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    influx_schema: Literal["seed", "butler-sos"] = "seed"
    """user_events names: `seed` (SPEC 3) or what Butler SOS 15 writes (workers/encode.py)."""
    heartbeat_timeout: float = 30.0
    """Seconds a child may go without a heartbeat before the supervisor kills and restarts
    it (a wedged process: alive, not working); 0 turns the check off."""
    mqtt: MqttOptions = MqttOptions()
    spool: SpoolOptions = SpoolOptions()
    http: HttpOptions = HttpOptions()
    rate_limit_max_sources: int = 1024
    """Source addresses the UDP rate limit tracks at once (each gets its fair share)."""
    new_relic_allow_http: bool = False
    """Send to an `http://` New Relic event URL (API keys in clear): only for a local proxy."""
    influx_tls: InfluxTls = InfluxTls()
    qrs_server_name: str = ""
    """The name the QRS server's certificate must show ('' : `appNames.hostIP` itself)."""
    sessions: SessionOptions = SessionOptions()
    influx_inflight: int = 2
    """InfluxDB writes in flight at once; acknowledged to the spool in order all the same."""
    influx_min_write_interval: int = 50
    """ms between InfluxDB writes of partial batches (a full one goes at once); at most
    `flush_interval`. The first events after a quiet spell go at once."""
    nats: NatsOptions = NatsOptions()
    instance: str = ""
    """This instance's name in its telemetry ('' : the host name); several instances
    behind a load balancer (docs/OPERATIONS.md "Several instances")."""
    instance_index: int = 0
    instances: int = 1
    """Receive times of instance i of n are congruent to i modulo n (times readers), so
    two instances never stamp the same nanosecond."""
    peers: list[str] = []
    """Base URLs (http://host:port) of the other instances; /api/sessions merges theirs."""
    peer_token: str = ""
    """Bearer token sent to the peers ('' : none)."""
    peer_timeout: float = 2.0
    start_method: Literal["spawn", "forkserver"] = "forkserver"
    """How children start: `forkserver` forks them from a server that loaded the code and
    ua-parser's rules once (shared memory, docs/OPERATIONS.md); `spawn`: a fresh interpreter.
    Default forkserver since issue 15: ~28 MB less per worker, same counts after crashes."""


class Config(msgspec.Struct, frozen=True, kw_only=True):
    butler: ButlerSOS = ButlerSOS()
    pipeline: Pipeline = Pipeline()


class ConfigError(Exception):
    """Every problem found in a config file, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(path: str | Path | None, env: dict[str, str] | None = None) -> Config:
    """Load and validate a config file (None: all defaults). Raises ConfigError."""
    if path is None:
        return Config()
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([_not_utf8(path, exc)]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}".replace("\n", " ")]) from exc
    return config_from_document(document, os.environ if env is None else env)


def _not_utf8(path: str | Path, exc: UnicodeDecodeError) -> str:
    before = exc.object[: exc.start]
    line = before.count(b"\n") + 1
    column = exc.start - (before.rfind(b"\n") + 1) + 1
    return (
        f"{path}: line {line}, column {column}: expected UTF-8 text, "
        f"found byte 0x{exc.object[exc.start]:02x}"
    )


def config_from_document(document: Any, env: Any) -> Config:
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([f"$: expected a mapping, found {_kind(document)}"])
    problems: list[str] = []
    document = _substitute_env(document, env, "$", problems)
    sections = {
        BUTLER_SECTION: (ButlerSOS, "butler"),
        OWN_SECTION: (Pipeline, "pipeline"),
    }
    values: dict[str, Any] = {}
    for key, (struct_type, attr) in sections.items():
        section = document.get(key)
        if section is None:
            continue
        problems.extend(_problems(section, msgspec.inspect.type_info(struct_type), key))
        if not problems:
            values[attr] = msgspec.convert(section, struct_type, strict=False)
    if problems:
        raise ConfigError(problems)
    config = Config(**values)
    problems.extend(check_semantics(config))
    if problems:
        raise ConfigError(problems)
    return config


MAX_READER_COALESCE_MS = 20
"""A longer pause would hold datagrams in the kernel's buffer (and delay their receive
times) for longer than the reader's own flush does."""


def check_semantics(config: Config) -> list[str]:
    """Rules that types alone cannot express."""
    problems = []
    pipe = config.pipeline
    for name in (
        "readers",
        "workers",
        "batch_size",
        "flush_interval",
        "queue_size",
        "reader_batch_size",
        "reader_flush_ms",
        "ua_cache_size",
        "pending_events",
        "rate_limit_max_sources",
        "influx_inflight",
        "influx_min_write_interval",
    ):
        value = getattr(pipe, name)
        if value < 1:
            problems.append(
                f"{OWN_SECTION}.{_camel(name)}: expected an integer >= 1, found {value}"
            )
    reserved = RESERVED_TAG_NAMES
    if pipe.influx_schema == "butler-sos":
        reserved |= BUTLER_SOS_TAG_NAMES
    problems.extend(_check_user_event_tags(config.butler.user_events.tags or [], reserved))
    port = config.butler.user_events.udp_server_config.port_user_activity_events
    if not 0 <= port <= 65535:
        problems.append(
            f"{BUTLER_SECTION}.userEvents.udpServerConfig.portUserActivityEvents: "
            f"expected a port 0-65535, found {port}"
        )
    problems.extend(_check_new_relic_accounts(config.butler))
    problems.extend(_check_new_relic_url(config))
    problems.extend(_check_metrics(pipe))
    problems.extend(_check_heartbeat(pipe))
    if not 0 <= pipe.reader_coalesce_ms <= MAX_READER_COALESCE_MS:
        problems.append(
            f"{OWN_SECTION}.readerCoalesceMs: expected 0-{MAX_READER_COALESCE_MS} (ms), "
            f"found {pipe.reader_coalesce_ms}"
        )
    problems.extend(_check_app_names(config.butler))
    problems.extend(_check_mqtt(config))
    problems.extend(_check_sessions(pipe.sessions))
    problems.extend(_check_nats(config.pipeline.nats))
    return problems


MIN_HEARTBEAT_TIMEOUT = 2.0
"""Four heartbeats (one per 0.5 s report interval): less would kill healthy children."""


def _check_heartbeat(pipe: Pipeline) -> list[str]:
    timeout = pipe.heartbeat_timeout
    if timeout == 0 or timeout >= MIN_HEARTBEAT_TIMEOUT:
        return []
    return [
        f"{OWN_SECTION}.heartbeatTimeout: expected 0 (off) or at least "
        f"{MIN_HEARTBEAT_TIMEOUT:g} seconds, found {timeout:g}"
    ]


def _check_sessions(sessions: SessionOptions) -> list[str]:
    return [
        f"{OWN_SECTION}.sessions.{_camel(name)}: expected seconds >= 1, found {value}"
        for name in ("max_idle", "snapshot_interval")
        if (value := getattr(sessions, name)) < 1
    ] + (
        [f"{OWN_SECTION}.sessions.appMetricsLimit: expected >= 0, found {limit}"]
        if (limit := sessions.app_metrics_limit) < 0
        else []
    )


def _check_metrics(pipe: Pipeline) -> list[str]:
    problems = []
    if not 0 <= pipe.http_port <= 65535:
        problems.append(f"{OWN_SECTION}.httpPort: expected a port 0-65535, found {pipe.http_port}")
    if not 0 <= pipe.metrics_port <= 65535:
        problems.append(
            f"{OWN_SECTION}.metricsPort: expected a port 0-65535 (0: off), "
            f"found {pipe.metrics_port}"
        )
    if pipe.http.max_connections < 1 or pipe.http.request_timeout <= 0:
        problems.append(
            f"{OWN_SECTION}.http: expected maxConnections >= 1 and requestTimeout > 0, found "
            f"{pipe.http.max_connections} and {pipe.http.request_timeout}"
        )
    if pipe.health_deadline <= 0:
        problems.append(
            f"{OWN_SECTION}.healthDeadline: expected seconds > 0, found {pipe.health_deadline}"
        )
    return problems + _check_instances(pipe)


def _check_instances(pipe: Pipeline) -> list[str]:
    problems = []
    if not 0 <= pipe.instance_index < pipe.instances:
        problems.append(
            f"{OWN_SECTION}.instanceIndex: expected 0 <= instanceIndex < instances, found "
            f"{pipe.instance_index} and {pipe.instances}"
        )
    if pipe.peer_timeout <= 0:
        problems.append(
            f"{OWN_SECTION}.peerTimeout: expected seconds > 0, found {pipe.peer_timeout}"
        )
    problems.extend(
        f"{OWN_SECTION}.peers: expected http(s)://host:port, found {peer!r}"
        for peer in pipe.peers
        if not peer.startswith(("http://", "https://"))
    )
    return problems


def instance_name(pipe: Pipeline) -> str:
    """`senseflow.instance`, or the host name when not set."""
    return pipe.instance or socket.gethostname()


# Names the user_events point already uses (SPEC 3): a configured tag with one of them, or
# twice the same name, would make InfluxDB reject every point.
RESERVED_TAG_NAMES = frozenset(
    {
        "host",
        "event_action",
        "userFull",
        "userDirectory",
        "userId",
        "origin",
        "appId",
        "appName",
        "qs_uaBrowserName",
        "qs_uaBrowserMajorVersion",
        "qs_uaOsName",
        "qs_uaOsVersion",
        "userFull_field",
        "userId_field",
        "appId_field",
        "appName_field",
        "time",
    }
)
BUTLER_SOS_TAG_NAMES = frozenset(
    {"uaBrowserName", "uaBrowserMajorVersion", "uaOsName", "uaOsVersion"}
)
"""Reserved too with `influxSchema: butler-sos`, which writes these instead of `qs_ua...`."""


def _check_user_event_tags(
    tags: list[NameValue], reserved: frozenset[str] = RESERVED_TAG_NAMES
) -> list[str]:
    problems = []
    seen: set[str] = set()
    for index, tag in enumerate(tags):
        path = f"{BUTLER_SECTION}.userEvents.tags[{index}].name"
        if tag.name in reserved:
            problems.append(
                f"{path}: expected a name the user_events point does not use, found {tag.name!r}"
            )
        elif tag.name in seen:
            problems.append(f"{path}: expected a name not given before, found {tag.name!r} again")
        elif not tag.name.strip():
            problems.append(f"{path}: expected a non-empty name, found {tag.name!r}")
        seen.add(tag.name)
    return problems


def _check_new_relic_accounts(butler: ButlerSOS) -> list[str]:
    if not (butler.new_relic.enable and butler.user_events.send_to_new_relic.enable):
        return []
    known = {a.account_name for a in butler.third_party_tools_credentials.new_relic or []}
    if not butler.user_events.send_to_new_relic.destination_account:
        return [
            f"{BUTLER_SECTION}.userEvents.sendToNewRelic.destinationAccount: expected at least "
            "one accountName from thirdPartyToolsCredentials.newRelic, found nothing"
        ]
    return [
        f"{BUTLER_SECTION}.userEvents.sendToNewRelic.destinationAccount: expected an accountName "
        f"from thirdPartyToolsCredentials.newRelic, found {name!r}"
        for name in butler.user_events.send_to_new_relic.destination_account or []
        if name not in known
    ]


def _check_new_relic_url(config: Config) -> list[str]:
    butler = config.butler
    if not (butler.new_relic.enable and butler.user_events.send_to_new_relic.enable):
        return []
    url = butler.new_relic.event.url
    if url.lower().startswith("https://"):
        return []
    if url.lower().startswith("http://") and config.pipeline.new_relic_allow_http:
        return []
    return [
        f"{BUTLER_SECTION}.newRelic.event.url: expected an https:// URL (API keys must not "
        f"travel in clear; {OWN_SECTION}.newRelicAllowHttp: true allows http://), found {url!r}"
    ]


MIN_EXTRACT_INTERVAL_MS = 100


def _check_app_names(butler: ButlerSOS) -> list[str]:
    """QRS app-name extraction needs a host and the client certificate, key and CA."""
    app_names = butler.app_names
    if not app_names.enable_app_name_extract:
        return []
    problems = []
    if not app_names.host_ip:
        problems.append(
            f"{BUTLER_SECTION}.appNames.hostIP: expected the host name or IP address of a Qlik "
            "Sense server (enableAppNameExtract is true), found nothing"
        )
    if app_names.extract_interval < MIN_EXTRACT_INTERVAL_MS:
        problems.append(
            f"{BUTLER_SECTION}.appNames.extractInterval: expected milliseconds >= "
            f"{MIN_EXTRACT_INTERVAL_MS}, found {app_names.extract_interval}"
        )
    cert = butler.cert
    for key, value in (
        ("clientCert", cert.client_cert),
        ("clientCertKey", cert.client_cert_key),
        ("clientCertCA", cert.client_cert_ca),
    ):
        if not value:
            problems.append(
                f"{BUTLER_SECTION}.cert.{key}: expected a file path for the QRS API "
                "(appNames.enableAppNameExtract is true), found nothing"
            )
    return problems


MQTT_TOPIC_MAX_BYTES = 0xFFFF


def _check_mqtt(config: Config) -> list[str]:
    """Windows of at least one message; topics a broker accepts for PUBLISH (MQTT 4.7)."""
    mqtt = config.pipeline.mqtt
    problems = [
        f"{OWN_SECTION}.mqtt.{_camel(name)}: expected an integer >= 1, found {value}"
        for name, value in (("max_inflight", mqtt.max_inflight), ("max_pending", mqtt.max_pending))
        if value < 1
    ]
    butler = config.butler
    if not (butler.mqtt_config.enable and butler.user_events.send_to_mqtt.enable):
        return problems
    post_to = butler.user_events.send_to_mqtt.post_to
    for field in post_to.__struct_fields__:
        topic: Topic = getattr(post_to, field)
        problem = _topic_problem(topic.topic) if topic.enable else None
        if problem:
            path = f"{BUTLER_SECTION}.userEvents.sendToMQTT.postTo.{_camel(field)}.topic"
            problems.append(f"{path}: expected {problem}, found {_short(topic.topic).strip()}")
    return problems


_NATS_TOKEN = re.compile(r"[^.\s*>]+")
_NATS_SCHEMES = ("nats://", "tls://")


def _check_nats(nats: NatsOptions) -> list[str]:
    """Numbers in range, server URLs, a subject prefix and stream name JetStream accepts."""
    path = f"{OWN_SECTION}.nats"
    problems = [
        f"{path}.{key}: expected {expected}, found {value:g}"
        for key, value, expected, ok in (
            ("maxPending", nats.max_pending, "an integer >= 1", nats.max_pending >= 1),
            ("replicas", nats.replicas, "an integer 1-5", 1 <= nats.replicas <= 5),
            ("ackTimeout", nats.ack_timeout, "a number > 0", nats.ack_timeout > 0),
            ("duplicateWindow", nats.duplicate_window, "a number > 0", nats.duplicate_window > 0),
        )
        if not ok
    ]
    if not nats.enable:
        return problems
    if not nats.servers:
        problems.append(f"{path}.servers: expected at least one nats://host:port, found none")
    problems.extend(
        f"{path}.servers[{i}]: expected nats://host:port or tls://host:port, found {url!r}"
        for i, url in enumerate(nats.servers)
        if not url.startswith(_NATS_SCHEMES)
    )
    if not all(_NATS_TOKEN.fullmatch(t) for t in nats.subject_prefix.split(".")):
        problems.append(
            f"{path}.subjectPrefix: expected dot-separated tokens without spaces, * or >, "
            f"found {nats.subject_prefix!r}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", nats.stream):
        problems.append(
            f"{path}.stream: expected a stream name of letters, digits, _ and -, "
            f"found {nats.stream!r}"
        )
    if nats.token and (nats.user or nats.creds_file):
        problems.append(f"{path}.token: expected one of user/password, token or credsFile")
    return problems


def _topic_problem(topic: str) -> str | None:
    """What is wrong with an MQTT topic name to publish to, or None."""
    if not topic:
        return "a topic name (or enable: false)"
    if "+" in topic or "#" in topic:
        return "a topic name without the wildcards + and #"
    if "\x00" in topic:
        return "a topic name without the character U+0000"
    if len(topic.encode("utf-8", "surrogatepass")) > MQTT_TOPIC_MAX_BYTES:
        return f"a topic name of at most {MQTT_TOPIC_MAX_BYTES} bytes in UTF-8"
    return None


def _problems(value: Any, info: msgspec.inspect.Type, path: str) -> list[str]:
    """Validate field by field, so that every problem is reported, not only the first."""
    if isinstance(info, msgspec.inspect.StructType) and isinstance(value, dict):
        problems: list[str] = []
        by_name = {f.encode_name: f for f in info.fields}
        if info.forbid_unknown_fields:
            problems.extend(
                f"{path}.{key}: unknown key (expected one of {', '.join(sorted(by_name))})"
                for key in value
                if key not in by_name
            )
        for field in info.fields:
            sub_path = f"{path}.{field.encode_name}"
            if field.encode_name in value:
                problems.extend(_problems(value[field.encode_name], field.type, sub_path))
            elif field.required:
                problems.append(f"{sub_path}: expected a value, found nothing")
        return problems
    if isinstance(info, msgspec.inspect.ListType) and isinstance(value, list):
        return [
            p
            for i, item in enumerate(value)
            for p in _problems(item, info.item_type, f"{path}[{i}]")
        ]
    if isinstance(info, msgspec.inspect.UnionType) and value is not None:
        members = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(members) == 1:
            return _problems(value, members[0], path)
    try:
        msgspec.convert(value, _python_type(info), strict=False)
    except msgspec.ValidationError as exc:
        shown = "" if path.rpartition(".")[2] in SECRET_KEYS else _short(value)
        return [f"{path}: expected {_describe(info)}, found {_kind(value)}{shown}{_detail(exc)}"]
    return []


def _python_type(info: msgspec.inspect.Type) -> Any:
    mapping: dict[type, Any] = {
        msgspec.inspect.IntType: int,
        msgspec.inspect.FloatType: float,
        msgspec.inspect.StrType: str,
        msgspec.inspect.BoolType: bool,
    }
    if type(info) in mapping:
        return mapping[type(info)]
    if isinstance(info, msgspec.inspect.LiteralType):
        return Literal[tuple(info.values)]
    if isinstance(info, msgspec.inspect.StructType):
        return info.cls
    if isinstance(info, msgspec.inspect.UnionType):
        return _union(info)
    if isinstance(info, msgspec.inspect.ListType):
        return list[_python_type(info.item_type)]  # type: ignore[misc]
    if isinstance(info, msgspec.inspect.NoneType):
        return type(None)
    return Any


def _union(info: msgspec.inspect.UnionType) -> Any:
    result: Any = None
    for member in info.types:
        result = _python_type(member) if result is None else result | _python_type(member)
    return result


def _describe(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(repr(v) for v in info.values)
    if isinstance(info, msgspec.inspect.UnionType):
        return " or ".join(_describe(t) for t in info.types)
    names = {
        msgspec.inspect.IntType: "an integer",
        msgspec.inspect.FloatType: "a number",
        msgspec.inspect.StrType: "a string",
        msgspec.inspect.BoolType: "true or false",
        msgspec.inspect.StructType: "a mapping",
        msgspec.inspect.ListType: "a list",
        msgspec.inspect.NoneType: "nothing",
    }
    return names.get(type(info), "a value")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "mapping", list: "list", str: "string", int: "integer", float: "number"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    text = repr(value)
    return " " + (text if len(text) <= 60 else text[:57] + "...")


def _detail(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    at = text.find(" - at `$")
    if at < 0:
        return ""
    where = text[at + 8 : text.rfind("`")]
    return f" (at {where})" if where else ""


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _substitute_env(value: Any, env: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute_env(v, env, f"{path}.{k}", problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if default is not None and not value:
            return default  # as in the shell: `:-` also replaces a variable set but empty
        if value is not None:
            return str(value)
        problems.append(
            f"{path.removeprefix('$.')}: expected environment variable {name} to be set "
            f"(or a default, as ${{{name}:-value}}), found it unset"
        )
        return ""

    return _ENV_REF.sub(replace, value)


def redact(text: str, config: Config) -> str:
    """Remove every secret of the config from a text meant for logs."""
    # Longest first: a secret that contains a shorter one must not leak its remainder.
    for secret in sorted(secrets(config), key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def secrets(config: Config) -> list[str]:
    b = config.butler
    found = [
        b.influxdb_config.v1_config.auth.password,
        b.influxdb_config.v2_config.token,
        b.influxdb_config.v3_config.token,
        b.cert.client_cert_passphrase or "",
        config.pipeline.mqtt.password,
        config.pipeline.http.token,
        config.pipeline.http.password,
        config.pipeline.peer_token,
        config.pipeline.mqtt.tls.key_password,
        config.pipeline.nats.password,
        config.pipeline.nats.token,
    ]
    found.extend(a.insert_api_key for a in b.third_party_tools_credentials.new_relic or [])
    found.extend(h.value for h in b.new_relic.event.header or [])  # may carry credentials
    return [s for s in found if len(s) >= 3]
