"""`edgefleet demo`: the whole product on one machine (broker, controller, simulated fleet, report)."""
