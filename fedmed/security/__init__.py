"""Deployment security: PKI, site policy, audit log."""
