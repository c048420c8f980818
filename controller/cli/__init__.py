"""The `edgefleet` command line: one module per verb group; `main` holds the root app and its settings."""
