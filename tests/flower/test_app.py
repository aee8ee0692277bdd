"""The app command writes a Flower App folder that Flower's own validator accepts and whose run
config rebuilds the same job (config and initial weights) on any machine; certificates and keys
are written in the formats flower-superlink and flower-supernode read."""

import tomllib

import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedmoe.flower.__main__ import main
from fedmoe.federation.job import build_job, build_job_from_text


def test_app_folder_is_valid_for_flwr_and_its_run_config_rebuilds_the_same_job(fl, tmp_path, capsys):
    from flwr.cli.config_utils import load_and_validate

    config = fl.write_config(tmp_path, clients=3)
    assert main(["app", "--config", str(config), "--out", str(tmp_path / "app"), "--federation.rounds", "4",
                 "--output-dir", "/srv/out"]) == 0
    assert "partition-id=<0..2>" in capsys.readouterr().out
    loaded, _ = load_and_validate(tmp_path / "app" / "pyproject.toml", check_module=True)
    run_config = loaded["tool"]["flwr"]["app"]["config"]
    assert run_config["output-dir"] == "/srv/out" and run_config["client-threads"] == 0
    assert loaded["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedmoe.flower.app:server",
                                                           "clientapp": "fedmoe.flower.app:client"}
    rebuilt = build_job_from_text(run_config["fedmoe-config"])
    original = build_job(config, ["--federation.rounds", "4"])
    assert rebuilt.federation.rounds == 4 and rebuilt.config_yaml == original.config_yaml
    a, b = rebuilt.module.net.state_dict(), original.module.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["project"]["name"] == "fedmoe-job"


def test_app_with_a_bad_config_value_is_one_error_line(fl, tmp_path, capsys):
    config = fl.write_config(tmp_path, clients=2, per_round=3)
    assert main(["app", "--config", str(config), "--out", str(tmp_path / "app")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: federation.clients_per_round"), err


def test_certificates_command_writes_a_ca_a_server_certificate_for_the_hosts_and_node_keys(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certificates", "--out", str(out), "--host", "10.0.0.5", "--host", "link.example", "--nodes", "2"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example"]
    for i in range(2):
        serialization.load_ssh_private_key((out / f"node{i}").read_bytes(), password=None)
        serialization.load_ssh_public_key((out / f"node{i}.pub").read_bytes())
    assert oct((out / "server.key").stat().st_mode & 0o777) == "0o600"
