"""Governance: the audit log (and, later, the registry, approvals and compliance evidence)."""
