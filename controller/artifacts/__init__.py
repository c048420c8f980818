"""Signed artifacts: the catalog, the content-addressed store, validation sets, signing keys."""
