"""Fuzz targets (atheris) for the gateway's input validator and token parser."""
