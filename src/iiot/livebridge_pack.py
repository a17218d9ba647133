"""Committed telemetry packed densely for the live bridge, at a cost that stays bounded.

Ingestion may commit tens of thousands of points a second. Forwarding each committed
batch device by device (one NOTIFY each, one round trip each) cost an ingest process more
than the ingestion itself. So the bridge takes every telemetry event waiting in its queue
at once, keeps each (device, key)'s newest point (live values are a view; the database
keeps every point), and packs many devices into each NOTIFY payload, all sent in one
round trip. When the process keeps up, that is one committed batch per flush; when it is
behind, more batches are coalesced into one flush.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from iiot.bus import TelemetryEvent
from iiot.model import Device, DevicePoints, Point

__all__ = ["KIND", "pack", "unpack"]

KIND = "batch"


def _newest(events: Iterable[TelemetryEvent]) -> dict[UUID, tuple[Device, dict[str, Point]]]:
    by_device: dict[UUID, tuple[Device, dict[str, Point]]] = {}
    for event in events:
        for item in event.batch:
            entry = by_device.get(item.device.id)
            if entry is None:
                entry = by_device[item.device.id] = (item.device, {})
            latest = entry[1]
            for point in item.points:
                seen = latest.get(point.key)
                if seen is None or point.ts >= seen.ts:
                    latest[point.key] = point
    return by_device


def _pieces(device: list[Any], points: list[list[Any]], room: int) -> list[str]:
    """`[device, points]` as JSON pieces of at most `room` bytes, halving the points as
    needed; a single value larger than that is left out (the store has it)."""
    piece = json.dumps([device, points], separators=(",", ":"))
    if len(piece.encode()) <= room:
        return [piece]
    if len(points) <= 1:
        return []
    half = len(points) // 2
    return _pieces(device, points[:half], room) + _pieces(device, points[half:], room)


def pack(events: Iterable[TelemetryEvent], origin: str, limit: int, device_json: Any) -> list[str]:
    """NOTIFY payloads (each at most `limit` bytes) of the newest point of every key."""
    head = f'{{"o":{json.dumps(origin)},"t":"{KIND}","b":['
    room = limit - len(head.encode()) - 2  # for the pieces, their commas and "]}"
    payloads: list[str] = []
    pieces: list[str] = []
    size = 0
    for device, latest in _newest(events).values():
        points = [[p.key, p.ts, p.value] for p in latest.values()]
        for piece in _pieces(device_json(device), points, room):
            piece_size = len(piece.encode()) + (1 if pieces else 0)
            if pieces and size + piece_size > room:
                payloads.append(head + ",".join(pieces) + "]}")
                pieces, size, piece_size = [], 0, piece_size - 1
            pieces.append(piece)
            size += piece_size
    if pieces:
        payloads.append(head + ",".join(pieces) + "]}")
    return payloads


def unpack(raw: dict[str, Any], device: Any) -> TelemetryEvent:
    """The telemetry event of a packed payload (`device` decodes a device)."""
    return TelemetryEvent(
        tuple(
            DevicePoints(device(d), tuple(Point(str(k), int(ts), v) for k, ts, v in points))
            for d, points in raw["b"]
        )
    )
