"""Industrial IoT platform: one ingest pipeline for MQTT, CoAP, AMQP and HTTP, an OPC UA server."""

__version__ = "0.1.0"
__all__ = ["__version__"]
