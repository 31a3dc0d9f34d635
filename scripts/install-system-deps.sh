#!/usr/bin/env bash
# Installs the real InfluxDB 1.x, Mosquitto, nats-server (a second MQTT broker) and nginx with
# its stream module (the UDP load balancer of tests/e2e/test_instances.py) that the
# tests and `make run` start as child processes.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    influxdb influxdb-client mosquitto mosquitto-clients nats-server python3-venv \
    nginx libnginx-mod-stream >/dev/null
# Debian's packages start system services where systemd runs; senseflow starts its own instances.
