"""Revisions of the registry schema, oldest first; each names the one it revises."""
