"""Revisions of the gateway schema, oldest first; each names the one it revises."""
