"""The house's import contracts (pyproject.toml [tool.importlinter]) hold, and do catch a break."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(
    not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')"
)


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "repo"
    shutil.copytree(ROOT / "fedmed", tree / "fedmed", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    return tree


def test_the_tree_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        # a site reaching into the coordinator (the wings meet only in fedmed.protocol)
        ("site/app.py", "import fedmed.coordinator.strategies", "A site never imports"),
        # the ground floor importing a room above it
        ("config.py", "import fedmed.data.table", "ground floor"),
        # the Flower-free core importing Flower
        ("train.py", "import flwr.serverapp", "never import Flower"),
        # a layer importing upward (the study's outputs reaching into the CLI)
        ("study/outputs.py", "import fedmed.cli.display", "Layers"),
    ],
)
def test_a_deliberate_bad_import_breaks_its_contract(
    tmp_path: Path, module: str, bad_import: str, contract: str
) -> None:
    tree = _copy(tmp_path)
    target = tree / "fedmed" / module
    target.write_text(target.read_text() + f"\n{bad_import}  # deliberate: the test's break\n")
    result = _lint(tree)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout[-3000:]


@pytest.mark.parametrize(
    "reference", ["fedmed.server_app:app", "fedmed.client_app:app", "fedmed.secagg:client_app"]
)
def test_deployed_app_paths_pass_flowers_own_checks(reference: str, tmp_path: Path) -> None:
    """The shims must satisfy `flwr run`'s static check (an assignment in the file's syntax tree)
    and load to the same app object as the room they point to."""
    from flwr.supercore.object_ref import load_app, validate

    from fedmed.coordinator import app as coordinator
    from fedmed.site import app as site
    from fedmed.site import secure_app

    ok, why = validate(reference, check_module=True, project_dir=tmp_path)
    assert ok, why
    expected = {
        "fedmed.server_app:app": coordinator.app,
        "fedmed.client_app:app": site.app,
        "fedmed.secagg:client_app": secure_app.client_app,
    }[reference]
    assert load_app(reference, RuntimeError, tmp_path) is expected
