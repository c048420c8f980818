"""edgefleet.controller."""
