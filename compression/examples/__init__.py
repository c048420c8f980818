"""Shipped example models and the data they train on (nothing is downloaded)."""
