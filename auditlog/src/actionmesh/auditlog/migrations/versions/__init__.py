"""Revisions of the auditlog schema, oldest first; each names the one it revises."""
