"""The control plane: the `senseflow` command, the supervisor, HTTP (metrics, health), telemetry."""
