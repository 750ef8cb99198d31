"""Deployed app path kept for coordinators and sites on other fedmed versions (see README)."""
