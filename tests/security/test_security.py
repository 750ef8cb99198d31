"""PKI, dataset registry, audit chain and site policy: the pieces a hospital's site relies on."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmed.config import SiteConfig, load_run_config, load_site_config, resolve_config_path
from fedmed.data.registry import DatasetRegistry
from fedmed.errors import ConfigError, DataError, PolicyViolation
from fedmed.security import pki
from fedmed.security.audit import AuditLog
from fedmed.security.policy import check_plan, plan_hash
from tests.conftest import write_site_csv

# -- PKI -------------------------------------------------------------------------------------------


def test_pki_issues_a_chain_sites_can_verify(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue_coordinator(tmp_path, ["localhost", "127.0.0.1", "coord.example.org"])
    bundle = pki.issue_site(tmp_path, "st-marys")

    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "coordinator.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # Private keys are owner-only; the node key is an OpenSSH ECDSA P-384 key (Flower's format).
    for key in (tmp_path / "ca.key", tmp_path / "coordinator.key", bundle / "node.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    node = serialization.load_ssh_private_key((bundle / "node.key").read_bytes(), None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    assert (bundle / "ca.crt").read_bytes() == (tmp_path / "ca.crt").read_bytes()
    assert list(pki.registered_sites(tmp_path)) == ["st-marys"]


def test_pki_refuses_to_overwrite_and_names_the_fix(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        pki.init_ca(tmp_path)
    pki.issue_site(tmp_path, "alpha")
    with pytest.raises(ConfigError, match="unregister"):
        pki.issue_site(tmp_path, "alpha")
    with pytest.raises(ConfigError, match="lower-case"):
        pki.issue_site(tmp_path, "../evil")
    with pytest.raises(ConfigError, match="pki init"):
        pki.issue_coordinator(tmp_path / "nowhere", ["localhost"])
    (tmp_path / "bad.pub").write_text("not a key\n")
    with pytest.raises(ConfigError, match="OpenSSH"):
        pki.register_site(tmp_path, "beta", tmp_path / "bad.pub")


# -- site config -----------------------------------------------------------------------------------


def test_site_config_resolves_paths_next_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "sites").mkdir()
    path = tmp_path / "sites" / "alpha.toml"
    path.write_text(
        'name = "alpha"\nca_certificate = "../pki/ca.crt"\nnode_key = "../pki/node.key"\n'
        'state_dir = "state"\napproved_plans = ["sha256:abc"]\n'
    )
    site = load_site_config(path)
    assert site.ca_certificate == str((tmp_path / "pki" / "ca.crt").resolve())
    assert site.state_path == (tmp_path / "sites" / "state").resolve()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "alpha"\n', "ca_certificate and node_key"),
        ('name = "alpha"\ninsecure = true\napproved_plans = ["abc"]\n', "fedmed plan hash"),
        ('name = "alpha"\ninsecure = true\nport = 1\n', "unknown config key 'port'"),
    ],
)
def test_site_config_errors_name_the_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "alpha.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_site_config(path)


# -- dataset registry ------------------------------------------------------------------------------


def test_registry_records_fingerprint_and_detects_a_changed_table(tmp_path: Path) -> None:
    table = write_site_csv(tmp_path / "heart.csv", 40, seed=1)
    registry = DatasetRegistry(tmp_path / "state")
    ds = registry.add("heart", table)
    assert (ds.rows, ds.columns) == (40, ("age", "bp", "smoker", "outcome"))
    assert registry.verify("heart").sha256 == ds.sha256
    with pytest.raises(ConfigError, match="--replace"):
        registry.add("heart", table)

    table.write_text(table.read_text().replace("yes", "no", 1))
    with pytest.raises(DataError, match="changed since it was registered"):
        registry.verify("heart")
    registry.add("heart", table, replace=True)
    assert registry.verify("heart").sha256 != ds.sha256
    with pytest.raises(ConfigError, match="fedmed site data add"):
        registry.get("cancer")


# -- audit log -------------------------------------------------------------------------------------


def _log_with(tmp_path: Path, n: int) -> AuditLog:
    log = AuditLog(tmp_path)
    for i in range(n):
        log.append(direction="received", round=i, bytes=100 + i)
    return log


def test_audit_chain_verifies_when_untouched(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 4)
    assert log.verify() == []
    assert [e["seq"] for e in log.entries()] == [1, 2, 3, 4]


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "truncate"])
def test_audit_chain_detects_tampering(tmp_path: Path, tamper: str) -> None:
    log = _log_with(tmp_path, 4)
    lines = log.path.read_text().splitlines()
    if tamper == "edit":
        entry = json.loads(lines[1])
        entry["bytes"] = 1
        lines[1] = json.dumps(entry, sort_keys=True)
    elif tamper == "delete":
        del lines[2]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines = lines[:-1]
    log.path.write_text("\n".join(lines) + "\n")
    problems = log.verify()
    assert problems, f"{tamper} went unnoticed"


# -- site policy -----------------------------------------------------------------------------------


def _federation(overrides: list[str] | None = None):
    return load_run_config(resolve_config_path("federation"), overrides or [])


def _site(**kw) -> SiteConfig:
    return SiteConfig(name="st-marys", insecure=True, **kw)


def test_policy_accepts_only_approved_plans() -> None:
    run = _federation()
    check_plan(_site(approved_plans=(plan_hash(run),)), run)  # approved: no exception
    # A different model architecture is a different plan: refused, and the reason is wire-safe.
    other = _federation(["model.hidden=[64]"])
    with pytest.raises(PolicyViolation, match="not approved") as err:
        check_plan(_site(approved_plans=(plan_hash(run),)), other)
    assert "/" not in str(err.value).replace("sha256:", "")
    # What a site spends is part of what it approves: more rounds are another plan.
    with pytest.raises(PolicyViolation, match="not approved"):
        check_plan(_site(approved_plans=(plan_hash(run),)), _federation(["rounds=9"]))


def test_policy_refuses_unlisted_site_and_non_private_plans() -> None:
    run = _federation(["privacy.enabled=false"])
    approved = (plan_hash(run),)
    with pytest.raises(PolicyViolation, match="does not list"):
        check_plan(SiteConfig(name="lakeview", insecure=True, approved_plans=approved), run)
    with pytest.raises(PolicyViolation, match="differential privacy"):
        check_plan(_site(approved_plans=approved, require_privacy=True), run)
    with pytest.raises(PolicyViolation, match="masked updates"):
        check_plan(_site(approved_plans=approved, require_secure_aggregation=True), run)
    # With SecAgg+ (another release: only masked updates leave) it is another plan, which the
    # site can approve and then takes part.
    secure = _federation(
        [
            "privacy.enabled=false",
            "strategy.secure_aggregation=true",
            "strategy.validate_updates=false",
        ]
    )
    assert plan_hash(secure) != plan_hash(run)
    check_plan(_site(approved_plans=(plan_hash(secure),), require_secure_aggregation=True), secure)


def test_a_site_with_its_own_delta_refuses_a_larger_plan_delta_before_reading_data() -> None:
    run = _federation(["privacy.delta=0.05"])  # 0.1 is the parse-time limit for any plan
    approved = (plan_hash(run),)

    with pytest.raises(PolicyViolation, match=r"privacy.delta=0.05, larger than this site's δ"):
        check_plan(_site(approved_plans=approved, delta=1e-6), run)
    check_plan(_site(approved_plans=approved, delta=0.06), run)  # the site's own choice


def test_an_approved_text_plan_below_the_sites_word_floor_is_refused() -> None:
    """A coordinator (or an approval slip) asking for words seen once at a site: refused even
    though the plan's hash is approved, before any text is read."""

    def text_plan(min_count: int):
        overrides = ['data.partition_file=""', 'data.dataset="abstracts"']
        return load_run_config(
            resolve_config_path("clinical_text"), [*overrides, f"data.text.min_count={min_count}"]
        )

    greedy, usual = text_plan(1), text_plan(5)
    approved = (plan_hash(greedy), plan_hash(usual))

    with pytest.raises(PolicyViolation, match=r"counts only 1 times.*min_word_count"):
        check_plan(_site(approved_plans=approved), greedy)
    check_plan(_site(approved_plans=approved), usual)
    check_plan(_site(approved_plans=approved, min_word_count=1), greedy)  # the site's own choice
    with pytest.raises(PolicyViolation, match="min_word_count"):
        check_plan(_site(approved_plans=approved, min_word_count=10), usual)
    with pytest.raises(ConfigError, match="min_word_count must be >= 1"):
        _site(min_word_count=0)


def test_example_site_config_is_valid_and_approves_the_shipped_federation() -> None:
    site = load_site_config(Path(__file__).parents[2] / "sites" / "example-hospital.toml")
    assert plan_hash(_federation()) in site.approved_plans


# Every setting that determines a site's privacy loss, what it releases or how it trains.
BINDING = [
    "privacy.enabled=false",
    "privacy.target_epsilon=30.0",
    "privacy.delta=1e-3",
    "privacy.max_grad_norm=5.0",
    'privacy.accountant="prv"',
    'privacy.grad_sample_mode="functorch"',
    'privacy.central="server-side"',
    "privacy.central_noise_multiplier=0.1",
    "privacy.central_clipping_norm=9.0",
    "rounds=300",
    "seed=7",
    "train.local_epochs=none;train.local_steps=5",
    "train.local_epochs=20",
    "train.batch_size=1",
    "train.lr=0.5",
    "train.lr_decay=0.5",
    "train.momentum=0.0",
    'train.optimizer="adam"',
    "train.weight_decay=0.1",
    'strategy.name="fedprox"',
    "strategy.proximal_mu=1.0",
    "data.schema.split_seed=7",
    "data.schema.test_fraction=0.1",
    "personalize.local_normalization=true",
]


@pytest.mark.parametrize("override", BINDING)
def test_plan_hash_binds_every_privacy_and_release_setting(override: str) -> None:
    assert plan_hash(_federation(override.split(";"))) != plan_hash(_federation())


@pytest.mark.parametrize(
    "overrides",
    [
        ['name="renamed"'],
        ['output_dir="/elsewhere"'],
        ["strategy.min_sites=0", "strategy.round_timeout=5.0", "strategy.max_norm_ratio=3.0"],
        ["strategy.beta_1=0.8", "strategy.beta_2=0.999", "strategy.tau=1e-6"],  # server's Adam
        ["simulation.cpus_per_site=4.0"],  # Ray resources of a simulated site: where, not what
        ["simulation.gpus_per_site=0.25"],
    ],
)
def test_plan_hash_ignores_output_and_coordinator_only_settings(overrides: list[str]) -> None:
    assert plan_hash(_federation(overrides)) == plan_hash(_federation())


def test_plan_hash_ignores_settings_left_at_their_defaults() -> None:
    run = _federation()
    explicit = _federation(["data.schema.min_rows=10", "model.dropout=0.0"])  # the defaults
    assert plan_hash(explicit) == plan_hash(run)
    assert plan_hash(_federation(["data.schema.min_rows=11"])) != plan_hash(run)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # A secure plan is no longer refused: it gets as far as looking for the coordinator.
        (
            ["strategy.secure_aggregation=true", "strategy.validate_updates=false"],
            "holds no coordinator",
        ),
        (["data.dataset="], "data.dataset to a registered dataset"),
        (["data.schema.features=[]"], "list data.schema.features"),
        ([], "holds no coordinator"),
    ],
)
def test_fedmed_run_refuses_what_a_federation_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str], message: str
) -> None:
    from fedmed.cli.main import main

    sets = [arg for o in overrides for arg in ("--set", o)]
    code = main(["run", "federation", *sets, "--coordinator", str(tmp_path / "none")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_fedmed_run_refuses_a_coordinator_without_an_operator_or_a_site_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the node registry no reply could be tied to a site: refuse, never trust claims."""
    import json

    from fedmed.cli.main import main

    monkeypatch.chdir(tmp_path)  # the study's output_dir ("runs") is relative
    home = tmp_path / "coordinator"
    home.mkdir()
    settings = {"host": "127.0.0.1", "port": 1, "insecure": False, "pki": str(tmp_path / "pki")}
    (home / "coordinator.json").write_text(json.dumps(settings))
    run = ["run", "federation", "--coordinator", str(home)]

    assert main(run) == 2
    assert "--operator" in capsys.readouterr().err

    operator = tmp_path / "operator"
    operator.mkdir()
    for name in ("operator.crt", "operator.key"):
        (operator / name).write_text("not used: refused before any connection")
    assert main([*run, "--operator", str(operator)]) == 2
    assert "has no site registry" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any run folder


def test_site_init_requires_privacy_unless_told_otherwise(tmp_path: Path) -> None:
    from fedmed.cli.main import main

    default, opted_out = tmp_path / "a.toml", tmp_path / "b.toml"
    assert main(["site", "init", "st-marys", "--insecure", "--out", str(default)]) == 0
    args = ["site", "init", "st-marys", "--insecure", "--no-require-privacy", "--out"]
    assert main([*args, str(opted_out)]) == 0

    assert load_site_config(default).require_privacy is True
    assert load_site_config(opted_out).require_privacy is False
