"""The shared runtime of the platform's services: databases, schema migrations, metrics.

Imported by the gateway, registry, audit log and the example providers; imports no
service (each service hands its own migrations to :mod:`actionmesh.runtime.migrations`).
Providers built on the SDK alone do not need it.
"""
