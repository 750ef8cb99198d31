"""Package discovery that pyproject.toml alone cannot express.

Every package under fedmed/ is found, so a new subpackage can never be left out of the wheel
(a hand-kept list once missed fedmed.security). ``fedmed.simulations`` lives at the top level
(simulations/, easy to find in a clone) and is mapped by pyproject's package-dir; discovery
does not follow package-dir, so it is named here once. All other metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["fedmed", "fedmed.*"]), "fedmed.simulations"])
