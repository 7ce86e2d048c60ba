"""The benchmark's synthetic fleet: vehicles on straight routes, and their GPS batches.

Every vehicle `i` drives from its origin towards its destination at a constant speed
(`SPEED_MPS`, less in long runs so that no vehicle arrives), one fix per second of
event time: at epoch second `t` it is `(t - origin_s) * speed` metres along its
straight route. Fixes are a pure function of (vehicle, origin, time),
so the load clients (separate processes) and the orchestrator (which records the
shipments with their planned routes) agree without talking, and a vehicle's track is
continuous from one phase to the next (no jump for the noise filter to refuse).

GPS requests are encoded straight into protobuf wire format with numpy (every point
has the same 43-byte layout), so a load client spends microseconds per batch, not
per point, and leaves the CPU to the services it measures. `encode_request` is
checked against the generated protobuf classes by the smoke test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

TENANT = "bench"
#: Ground speed of every simulated vehicle.
SPEED_MPS = 5.0
#: Length of every planned route. Fixed: the ETA model's per-route caches grow with it.
ROUTE_LENGTH_M = 100_000.0
#: Route vertices this far apart: the straight line of the fixes stays within a metre.
VERTEX_SPACING_M = 2_000.0
_EARTH_RADIUS_M = 6_371_008.8

# One GpsBatch.points entry: tag 4 (len) + GpsPoint{recorded_at{seconds}, lat, lon,
# accuracy_m, speed_mps, heading_deg}; seconds is a 5-byte varint for any time
# between 1978 and 3058, so every point has the same size.
_POINT_DTYPE = np.dtype(
    [
        ("head", "u1", 5),  # 0x22 len | 0x0A len | 0x08
        ("seconds", "u1", 5),
        ("t_lat", "u1"),
        ("lat", "<f8"),
        ("t_lon", "u1"),
        ("lon", "<f8"),
        ("t_acc", "u1"),
        ("acc", "<f4"),
        ("t_speed", "u1"),
        ("speed", "<f4"),
        ("t_heading", "u1"),
        ("heading", "<f4"),
    ]
)
POINT_WIRE_BYTES = _POINT_DTYPE.itemsize  # 43
_HEAD = np.array([0x22, POINT_WIRE_BYTES - 2, 0x0A, 0x06, 0x08], dtype=np.uint8)


def vehicle_id(index: int) -> str:
    return f"veh-{index:06d}"


def shipment_id(index: int) -> str:
    return f"shp-{index:06d}"


@dataclass(frozen=True)
class Route:
    """A straight route from (lat0, lon0) along a bearing."""

    lat0: float
    lon0: float
    bearing_rad: float

    def at(self, metres: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], ...]:
        """(lat, lon) arrays of the points `metres` along the route (flat-earth, fine here)."""
        north = metres * math.cos(self.bearing_rad)
        east = metres * math.sin(self.bearing_rad)
        lat = self.lat0 + np.degrees(north / _EARTH_RADIUS_M)
        lon = self.lon0 + np.degrees(east / (_EARTH_RADIUS_M * math.cos(math.radians(self.lat0))))
        return lat, lon

    def vertices(self, length_m: float) -> list[tuple[float, float]]:
        """The planned route, `length_m` long, as a polyline from origin to destination."""
        count = max(2, math.ceil(length_m / VERTEX_SPACING_M) + 1)
        metres = np.linspace(0.0, length_m, count)
        lat, lon = self.at(metres)
        return [(float(a), float(b)) for a, b in zip(lat, lon, strict=True)]


def route_of(index: int) -> Route:
    """Vehicle `index`'s route: origins spread over central Europe, heading roughly north-east."""
    golden = (index * 0.618_033_988_75) % 1.0
    return Route(
        lat0=44.0 + 4.0 * golden,
        lon0=2.0 + 10.0 * ((index * 0.414_213_562_37) % 1.0),
        bearing_rad=math.radians(20.0 + 50.0 * golden),
    )


def _varint5(values: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    out = np.empty((len(values), 5), dtype=np.uint8)
    for byte in range(5):
        part = (values >> (7 * byte)) & 0x7F
        out[:, byte] = part | (0x80 if byte < 4 else 0)
    return out


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_points(
    route: Route,
    origin_s: int,
    start_s: int,
    first: int,
    count: int,
    speed_mps: float = SPEED_MPS,
) -> bytes:
    """Wire bytes of `count` GpsBatch.points entries: the fixes at epoch seconds
    `start_s + first`, `start_s + first + 1`, ... of a vehicle that left its origin at
    `origin_s` at `speed_mps` (before that it waits at the origin)."""
    k = np.arange(first, first + count, dtype=np.int64)
    metres = np.maximum(start_s + k - origin_s, 0).astype(np.float64) * speed_mps
    lat, lon = route.at(metres)
    points = np.empty(count, dtype=_POINT_DTYPE)
    points["head"] = _HEAD
    points["seconds"] = _varint5(start_s + k)
    points["t_lat"] = 0x11
    points["lat"] = lat
    points["t_lon"] = 0x19
    points["lon"] = lon
    points["t_acc"] = 0x25
    points["acc"] = 5.0
    points["t_speed"] = 0x2D
    points["speed"] = speed_mps
    points["t_heading"] = 0x35
    points["heading"] = math.degrees(route.bearing_rad)
    return points.tobytes()


def _field_bytes(number: int, value: bytes) -> bytes:
    return bytes([number << 3 | 2]) + varint(len(value)) + value


def encode_request(vehicle: str, device: str, sequence: int, points: bytes) -> bytes:
    """A serialized StreamPointsRequest{batch: GpsBatch} around pre-encoded points."""
    batch = (
        _field_bytes(1, vehicle.encode())
        + _field_bytes(2, device.encode())
        + bytes([3 << 3])
        + varint(sequence)
        + points
    )
    return _field_bytes(1, batch)


def batches_per_stream(batch: int) -> int:
    """Batches a simulated device uploads on one stream before closing it.

    Two, whatever the batch size: a phone uploads what it collected and goes quiet, so
    consecutive records of the projector's input come from many vehicles, as in
    production (a burst of one vehicle's records would let the projector load and
    estimate that vehicle once for many records, which a real fleet never offers).
    """
    del batch
    return 2


def points_per_vehicle(duration_s: float, rate_cap: float, vehicles: int, batch: int) -> int:
    """Event-time seconds a phase may use per vehicle (one fix per second): the share of
    `rate_cap` points/s for `duration_s`, plus two streams' worth of slack."""
    return int(duration_s * rate_cap / max(vehicles, 1)) + 2 * batch * batches_per_stream(batch)
