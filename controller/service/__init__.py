"""The running controller: MQTT in and out, message handlers, telemetry rollups, deploys, metrics."""
