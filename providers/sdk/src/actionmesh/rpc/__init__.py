"""Runtime shared by every actionmesh service: server wiring, errors, telemetry, storage."""
