"""shipment-events: the TMS and operations staff record shipment lifecycle events."""
