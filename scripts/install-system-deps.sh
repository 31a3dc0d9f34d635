#!/usr/bin/env bash
# Installs the real InfluxDB 1.x, Mosquitto, nats-server (a second MQTT broker and the NATS
# JetStream destination) and nginx with its stream module (the UDP load balancer of
# tests/e2e/test_instances.py) that the tests and `make run` start as child processes, and
# Debian's chromium + chromedriver that the live page's browser tests drive.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    influxdb influxdb-client mosquitto mosquitto-clients nats-server python3-venv \
    nginx libnginx-mod-stream chromium chromium-driver >/dev/null
# Debian's packages start system services where systemd runs; senseflow starts its own instances.
