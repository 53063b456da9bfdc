"""auditlog: the AuditService, the durable store of execution events and record timelines."""
