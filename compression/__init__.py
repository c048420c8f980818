"""edgefleet.compression."""
