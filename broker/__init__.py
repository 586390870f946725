"""The edge layer: a secured Mosquitto (auth, ACL, TLS, WebSockets), its launcher and CLI."""
from broker.launcher import Broker, BrokerError

__all__ = ["Broker", "BrokerError"]
