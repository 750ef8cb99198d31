"""Deployed app path kept for coordinators and sites on other fedmed versions (see README).

An assignment, not a bare re-export: Flower looks for ``client_app = ...`` in this syntax tree.
"""

from fedmed.site import secure_app as _secure

client_app = _secure.client_app
