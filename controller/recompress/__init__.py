"""The closed loop: field telemetry triggers a recompression, a signed artifact, a gated rollout."""
