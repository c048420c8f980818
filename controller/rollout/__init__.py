"""Gated rollouts in waves: the operator API, the plan, the engine, the gates, status and metrics."""
