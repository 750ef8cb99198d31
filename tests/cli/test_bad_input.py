"""Every bad input gets a one-line answer: exit 2, one stderr line naming the key, no traceback.

Each case runs `fedmed simulate` in-process through the CLI entry point (as a user would run it)
with the shipped demo config and one bad override; none may leave a run folder behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmed.cli.main import main

# (--set overrides, text the one error line must contain: the key or the file's role)
BAD_SETTINGS: list[tuple[list[str], str]] = [
    (["rounds=0"], "rounds"),
    (["rounds=100001"], "rounds"),
    (["rounds=inf"], "rounds"),
    (["rounds=2.5"], "rounds"),
    (["seed=-1"], "seed"),
    (["seed=4294967296"], "seed"),
    (["data.schema.split_seed=-3"], "data.schema.split_seed"),
    (["data.schema.test_fraction=0"], "data.schema.test_fraction"),
    (["data.schema.test_fraction=0.95"], "data.schema.test_fraction"),
    (["train.lr=nan"], "train.lr"),
    (["train.lr=-0.1"], "train.lr"),
    (["train.lr=inf"], "train.lr"),
    (["train.lr=1e400"], "train.lr"),
    (["train.local_epochs=0"], "train.local_epochs"),
    (["train.local_epochs=20000"], "train.local_epochs"),
    (["train.local_epochs=none", "train.local_steps=0"], "train.local_steps"),
    (["train.local_epochs=none", "train.local_steps=20000000"], "train.local_steps"),
    (["train.batch_size=0"], "train.batch_size"),
    (["model.members=0"], "model.members"),
    (["model.members=65"], "model.members"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.dropout=-0.1"], "model.dropout"),
    (["model.hidden=[0]"], "model.hidden[0]"),
    (["model.hidden=[16, 100000]"], "model.hidden[1]"),
    (["privacy.max_grad_norm=inf"], "privacy.max_grad_norm"),
    (["privacy.max_grad_norm=0"], "privacy.max_grad_norm"),
    (["privacy.target_epsilon=0"], "privacy.target_epsilon"),
    (["privacy.target_epsilon=5000"], "privacy.target_epsilon"),
    (["privacy.target_epsilon=nan"], "privacy.target_epsilon"),
    (["privacy.delta=0"], "privacy.delta"),
    (["privacy.delta=0.5"], "privacy.delta"),
    (["strategy.min_sites=-1"], "strategy.min_sites"),
    (["strategy.min_sites=5"], "strategy.min_sites"),
    (['strategy.name="krum"', "strategy.num_malicious=4"], "strategy.num_malicious"),
    (["strategy.max_norm_ratio=1.0"], "strategy.max_norm_ratio"),
    (["strategy.round_timeout=0.5"], "strategy.round_timeout"),
    (["strategy.trim_beta=0.5"], "strategy.trim_beta"),
    (['name="../../escaped"'], "name"),
    (['name=""'], "name"),
    (['name="a/b"'], "name"),
    (['sites=[{name = "../../x"}]'], "sites.name"),
    (['sites=[{name = ""}]'], "sites.name"),
    (['sites=[{name = "ok"}, {name = "x.."}]'], "sites.name"),
    (['rounds="' + "9" * 5000 + '"'], "rounds"),
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _assert_one_line(code: int, err: str, key: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err[:2000]
    assert "Traceback" not in err
    assert lines[0].startswith("fedmed: error: ")
    assert key in lines[0], lines[0]
    assert len(lines[0]) < 600, f"error line of {len(lines[0])} chars"


@pytest.mark.parametrize(("overrides", "key"), BAD_SETTINGS, ids=lambda v: str(v)[:40])
def test_bad_setting_is_one_line_exit_2_and_no_run_folder(
    overrides: list[str], key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    argv = ["simulate", "--quiet", "--output-dir", str(out)]
    for item in overrides:
        argv += ["--set", item]

    code, err = _run(argv, capsys)

    _assert_one_line(code, err, key)
    assert not out.exists() or not any(out.iterdir())


def test_range_error_names_value_range_and_fix(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["show-config", "--set", "privacy.delta=0.5"], capsys)

    assert code == 2
    assert "privacy.delta = 0.5" in err and "(0, 0.1)" in err and "--set privacy.delta=" in err


def test_name_error_states_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["show-config", "--set", 'name="../../escaped"'], capsys)

    assert code == 2 and "letters, digits" in err and "no '..'" in err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_without_a_gpu_is_refused_before_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    argv = ["simulate", "--quiet", "--output-dir", str(out), "--set", 'device="cuda"']

    code, err = _run(argv, capsys)

    _assert_one_line(code, err, "device")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe\x00\x01binary\x89PNG\r\n", b"rounds = = 3\n", b"\x00\x00\x00"],
    ids=["binary", "malformed", "nul"],
)
def test_unreadable_config_file_names_the_file(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "study.toml"
    config.write_bytes(content)

    code, err = _run(
        ["simulate", "--quiet", "--output-dir", str(tmp_path / "runs"), str(config)], capsys
    )

    _assert_one_line(code, err, "study.toml")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "content",
    [b"\x00" * 64, b"not a checkpoint at all", b'{"format": "json"}'],
    ids=["zeros", "text", "json"],
)
def test_garbage_checkpoint_on_resume_is_one_line(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "runs" / "demo-federated-x"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.safetensors").write_bytes(content)

    code, err = _run(["simulate", "--quiet", "--resume", str(run_dir)], capsys)

    _assert_one_line(code, err, "checkpoint")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported model from a 1-round demo run, its card's signature removed.

    Module-scoped, so it sets its own ledger and key folders (the per-test ones do not exist yet).
    """
    base = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in [("LEDGER", "ledger"), ("KEY", "keys"), ("SITE_STATE", "sites")]:
            mp.setenv(f"FEDMED_{var}_DIR", str(base / sub))
        argv = ["simulate", "--quiet", "--output-dir", str(base / "runs"), "--set", "rounds=1"]
        assert main(argv) == 0
    (run_dir,) = (base / "runs").iterdir()
    card = json.loads((run_dir / "model.card.json").read_text())
    card.pop("signature")
    (run_dir / "model.card.json").write_text(json.dumps(card))
    return run_dir


@pytest.mark.parametrize(
    ("card", "weights"),
    [
        (b"\xff\xfe\x00 binary card", None),
        (b"[1, 2, 3]", None),
        (b'"just a string"', None),
        (b"{not json", None),
        (None, b"\x00" * 100),
        (None, b"garbage weights"),
    ],
    ids=[
        "binary-card",
        "list-card",
        "string-card",
        "bad-json-card",
        "zero-weights",
        "text-weights",
    ],
)
def test_garbage_model_files_are_one_line(
    card: bytes | None,
    weights: bytes | None,
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(
        weights if weights is not None else (exported / "model.safetensors").read_bytes()
    )
    (tmp_path / "model.card.json").write_bytes(
        card if card is not None else (exported / "model.card.json").read_bytes()
    )
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n1,2\n")

    code, err = _run(["predict", str(model), str(rows), "--allow-unsigned"], capsys)

    _assert_one_line(code, err, "model")


def test_card_with_wrong_field_types_is_one_line(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = json.loads((exported / "model.card.json").read_text())
    card["inputs"] = 7
    (tmp_path / "model.card.json").write_text(json.dumps(card))
    (tmp_path / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    rows = tmp_path / "rows.csv"
    rows.write_text("a\n1\n")

    code, err = _run(
        ["predict", str(tmp_path / "model.safetensors"), str(rows), "--allow-unsigned"], capsys
    )

    _assert_one_line(code, err, "model.card.json")
