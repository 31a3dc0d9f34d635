"""`make run`: senseflow in the foreground against a real local InfluxDB and Mosquitto.

With CONFIG=<file> (e.g. your Butler SOS config) it runs exactly that. Without, it starts
InfluxDB 1.x on 127.0.0.1:8086 and Mosquitto on 127.0.0.1:1883 with their data under
.run/ (git-ignored) — or uses the ones already answering there — writes .run/senseflow.yaml
once, and listens for Qlik Sense on UDP 0.0.0.0:9997. Ctrl-C drains and stops everything.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / ".run"
INFLUX_PORT = 8086
MQTT_PORT = 1883
HTTP_PORT = 9842  # Butler SOS's Prometheus port; here our HTTP server, on loopback
UDP_PORT = int(os.environ.get("UDP_PORT", "9997"))

sys.path.insert(0, str(REPO))
from tests.localservers import InfluxServer, MosquittoServer  # noqa: E402


def influx_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as response:
            return int(response.status) == 204
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def default_config() -> dict[str, object]:
    return {
        "Butler-SOS": {
            "userEvents": {
                "udpServerConfig": {"serverHost": "0.0.0.0", "portUserActivityEvents": UDP_PORT},
                "tags": [{"name": "qs_env", "value": "dev"}],
                "sendToMQTT": {"enable": True},
                "sendToInfluxdb": {"enable": True},
            },
            "influxdbConfig": {
                "enable": True,
                "host": "127.0.0.1",
                "port": INFLUX_PORT,
                "version": 1,
                "v1Config": {"dbName": "senseops", "retentionPolicy": {"name": "autogen"}},
            },
            "mqttConfig": {"enable": True, "brokerHost": "127.0.0.1", "brokerPort": MQTT_PORT},
        },
        "senseflow": {
            "summaryInterval": 10,
            "spool": {"directory": str(RUN_DIR / "spool")},
            "httpPort": HTTP_PORT,  # 127.0.0.1 only: /api/sessions, /metrics, /healthz
        },
    }


def start_local_servers() -> list[InfluxServer | MosquittoServer]:
    started: list[InfluxServer | MosquittoServer] = []
    if influx_answers(INFLUX_PORT):
        print(f"make run: using the InfluxDB already on 127.0.0.1:{INFLUX_PORT}")
    else:
        influx = InfluxServer(RUN_DIR / "influxdb", port=INFLUX_PORT)
        influx.start()
        started.append(influx)
        print(
            f"make run: started InfluxDB on 127.0.0.1:{INFLUX_PORT} (pid {influx.pid}), "
            "data in .run/influxdb"
        )
    if port_open(MQTT_PORT):
        print(f"make run: using the MQTT broker already on 127.0.0.1:{MQTT_PORT}")
    else:
        broker = MosquittoServer(RUN_DIR / "mosquitto", port=MQTT_PORT)
        broker.start()
        started.append(broker)
        print(f"make run: started Mosquitto on 127.0.0.1:{MQTT_PORT} (pid {broker.pid})")
    return started


def main() -> int:
    config = os.environ.get("CONFIG")
    started: list[InfluxServer | MosquittoServer] = []
    if not config:
        RUN_DIR.mkdir(exist_ok=True)
        config_path = RUN_DIR / "senseflow.yaml"
        if not config_path.exists():
            config_path.write_text(yaml.safe_dump(default_config(), sort_keys=False), "utf-8")
            print(f"make run: wrote {config_path.relative_to(REPO)}")
        config = str(config_path)
        started = start_local_servers()
    print(f"make run: senseflow run --config {config}   (Ctrl-C to stop)")
    # Its own session: the terminal's Ctrl-C reaches it once, forwarded below, not twice
    # (a second signal would stop it without draining).
    service = subprocess.Popen(
        [sys.executable, "-m", "senseflow.cli", "run", "--config", config],
        cwd=REPO,
        start_new_session=True,
    )
    signal.signal(signal.SIGINT, lambda *_: service.send_signal(signal.SIGINT))
    signal.signal(signal.SIGTERM, lambda *_: service.send_signal(signal.SIGTERM))
    try:
        return service.wait()
    finally:
        for server in reversed(started):
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
