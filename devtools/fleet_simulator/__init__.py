"""The fleet simulator: drivers' apps and a TMS, as real clients of the ingest services.

`cargotrack simulate` runs it against running services; `cargotrack dev` runs it
after the local suite is up. Vehicles drive real recorded trips
(data/trajectories), time compressed; shipments go through their lifecycle; some
run late on purpose, some fail delivery and are retried, a few send bad data.

Layers, pure first:

- `routes`: the recorded trips;
- `plan`: one vehicle's round, decided up front from the seed (schedule of GPS fixes,
  uploads, shipments, milestones): deterministic, no I/O;
- `uplink`: one device's GPS stream (sequence numbers, acks, resend after reconnect);
- `clients`: the TMS (ops token) and the drivers' confirmations, retried safely;
- `vehicle`: carries out round plans against the wall clock;
- `simulator`: the fleet's lifecycle (`FleetSimulator`) and `run(...)`.
"""

from devtools.fleet_simulator.config import SimulatorConfig, Targets
from devtools.fleet_simulator.simulator import FleetSimulator, run
from devtools.fleet_simulator.stats import SimulatorStats

__all__ = ["FleetSimulator", "SimulatorConfig", "SimulatorStats", "Targets", "run"]
