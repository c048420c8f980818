"""Mosquitto for a fleet: config, password file and ACL from the registry; a managed broker process."""
