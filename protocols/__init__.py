"""edgefleet.protocols."""
