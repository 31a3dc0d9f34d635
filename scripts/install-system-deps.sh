#!/usr/bin/env bash
# Installs the real InfluxDB 1.x, Mosquitto and nats-server (a second MQTT broker) that the
# tests and `make run` start as child processes, and Debian's chromium + chromedriver that
# the live page's browser tests (tests/e2e/test_live_page.py) drive.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    influxdb influxdb-client mosquitto mosquitto-clients nats-server python3-venv \
    chromium chromium-driver >/dev/null
# Debian's packages start system services where systemd runs; senseflow starts its own instances.
