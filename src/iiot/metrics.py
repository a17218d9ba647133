"""Prometheus metrics of one platform instance (own registry: nothing global at import)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """Every counter, gauge and histogram the platform exports at `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_received = Counter(
            "iiot_messages_received", "Telemetry messages received", ["protocol"], registry=r
        )
        self.messages_refused = Counter(
            "iiot_messages_refused",
            "Telemetry messages refused",
            ["protocol", "reason"],
            registry=r,
        )
        self.points_received = Counter(
            "iiot_points_received", "Points accepted into the pipeline", ["protocol"], registry=r
        )
        self.points_stored = Counter(
            "iiot_points_stored", "Points committed to storage", ["protocol"], registry=r
        )
        self.batch_points = Histogram(
            "iiot_batch_points",
            "Points per storage batch",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 50000),
            registry=r,
        )
        self.write_seconds = Histogram(
            "iiot_write_seconds",
            "Time to commit one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.queue_points = Gauge(
            "iiot_queue_points", "Points waiting in the ingest queue", registry=r
        )
        self.storage_errors = Counter(
            "iiot_storage_errors", "Failed storage writes (retried)", registry=r
        )
        self.auth_failures = Counter(
            "iiot_auth_failures", "Refused logins or tokens", ["protocol"], registry=r
        )
        self.redeliveries = Counter(
            "iiot_redeliveries", "Messages the broker delivered again", ["protocol"], registry=r
        )
        self.mqtt_broker_dropped = Gauge(
            "iiot_mqtt_broker_dropped_messages",
            "Messages the external MQTT broker reports it dropped"
            " ($SYS/broker/publish/messages/dropped); no series until it reports one",
            ["broker"],
            registry=r,
        )
        self.connections = Gauge(
            "iiot_connections", "Open client connections", ["protocol"], registry=r
        )
        self.component_up = Gauge(
            "iiot_component_up",
            "1 when a component is up, 0 when down",
            ["component"],
            registry=r,
        )
        self.http_request_seconds = Histogram(
            "iiot_http_request_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=r,
        )

        self.command_transitions = Counter(
            "iiot_command_transitions",
            "Command state changes made by this process, by new state",
            ["status"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
