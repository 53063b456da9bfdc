"""actionmesh: a gRPC mesh for governed external actions."""

__version__ = "0.1.0"
