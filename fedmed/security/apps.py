"""Which Flower app a fedmed daemon runs: fedmed's own, as installed, and nothing else.

A Flower run ships an app bundle (FAB: a zip of a pyproject and, usually, Python files) and
Flower's stock runtimes install and import whatever it names. Whoever can submit a run could
then execute code next to a hospital's data, or on the coordinator next to the CA and signing
keys. fedmed's runs ship a FAB holding ONLY a pyproject that names fedmed's installed apps
(``fedmed.runtime.deployment.write_app``), so both fedmed executors (site and coordinator) check
every task's FAB before anything is installed, imported or read, and refuse any other:

- the archive holds exactly ``pyproject.toml`` and Flower's ``.info/CONTENT`` manifest, so no
  Python file from the wire can shadow or extend an installed module;
- its components are exactly fedmed's server app and one of fedmed's two client apps.

The check is an allowlist on content, not a signature: the code that runs is the fedmed the
hospital installed, whoever built the FAB. A refusal at a site is written to its audit log.
"""

from __future__ import annotations

import io
import tomllib
import zipfile

from fedmed.errors import PolicyViolation

SERVER_APP = "fedmed.server_app:app"
CLIENT_APPS = frozenset({"fedmed.client_app:app", "fedmed.secagg:client_app"})
FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
MAX_FAB_BYTES = 1 << 20  # fedmed's FAB is ~4 KB; anything near this is not one of ours


class ForeignApp(PolicyViolation):
    """A run whose app is not fedmed's own installed app (refused before any data is read)."""


def check_fab(content: bytes) -> tuple[str, str]:
    """(serverapp, clientapp) of a FAB that is fedmed's; ForeignApp (wire-safe text) otherwise."""
    if len(content) > MAX_FAB_BYTES:
        raise ForeignApp("the run's app is not fedmed's (its bundle is too large for a pyproject)")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = set(fab.namelist())
            extra = names - FAB_FILES
            if extra or "pyproject.toml" not in names:
                raise ForeignApp(
                    f"the run's app is not fedmed's (its bundle carries {len(extra)} file(s) "
                    "besides a pyproject); a fedmed daemon runs only the fedmed installed here"
                )
            pyproject = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError):
        raise ForeignApp("the run's app is not fedmed's (not a readable Flower app)") from None
    components = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    server, client = components.get("serverapp"), components.get("clientapp")
    if server != SERVER_APP or client not in CLIENT_APPS:
        raise ForeignApp(
            "the run's app is not fedmed's (its components must be fedmed.server_app:app and "
            "fedmed.client_app:app or fedmed.secagg:client_app)"
        )
    return str(server), str(client)
