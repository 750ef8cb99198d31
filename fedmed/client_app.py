"""Deployed app path kept for coordinators and sites on other fedmed versions (see README).

An assignment, not a bare re-export: Flower looks for ``app = ...`` in this file's syntax tree.
"""

from fedmed.site import app as _site

app = _site.app
