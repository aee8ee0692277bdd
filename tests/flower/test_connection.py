"""Reaching a SuperLink: an address that does not answer, certificates that do not match, a
SuperLink without TLS and malformed input are one ``error:`` line and exit code 2 before anything
is started; a matching certificate passes. The listeners here are plain sockets (no SuperLink)."""

import socket
import ssl
import threading

import pytest

from fedmoe.flower.__main__ import main
from fedmoe.flower.certificates import make_node_keys, make_tls


def one_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


class Listener:
    """Accepts connections on a free loopback port; with ``tls`` files, answers a TLS handshake."""

    def __init__(self, tls=None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.context = None
        if tls is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(tls.server_cert, tls.server_key)
        self.sock.settimeout(0.05)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                try:
                    if self.context is not None:
                        self.context.wrap_socket(conn, server_side=True).close()
                    else:
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                except (OSError, ssl.SSLError):
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def certs(tmp_path):
    return make_tls(tmp_path / "certs")


def test_a_superlink_with_a_matching_certificate_passes_the_check(certs, capsys):
    server = Listener(certs)
    try:
        assert main(["check", "--superlink", f"127.0.0.1:{server.port}", "--root-certificates", str(certs.ca_cert)]) == 0
    finally:
        server.close()
    assert "answers with a certificate that matches" in capsys.readouterr().out


def test_certificates_signed_by_another_ca_are_one_error_line(certs, tmp_path, capsys):
    other = make_tls(tmp_path / "other")
    server = Listener(certs)
    try:
        code = main(["check", "--superlink", f"127.0.0.1:{server.port}", "--root-certificates", str(other.ca_cert)])
    finally:
        server.close()
    assert code == 2
    line = one_error(capsys)
    assert f"the certificate of SuperLink 127.0.0.1:{server.port} does not match --root-certificates" in line
    assert "certificate that signed the SuperLink's certificate" in line


def test_a_certificate_for_another_host_does_not_match(tmp_path, capsys):
    elsewhere = make_tls(tmp_path / "elsewhere", hosts=["10.1.2.3"])
    server = Listener(elsewhere)
    try:
        code = main(["check", "--superlink", f"127.0.0.1:{server.port}", "--root-certificates", str(elsewhere.ca_cert)])
    finally:
        server.close()
    assert code == 2
    assert "does not match" in one_error(capsys)


def test_an_address_that_does_not_answer_is_one_error_line(capsys):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    assert main(["check", "--superlink", f"127.0.0.1:{port}", "--insecure"]) == 2
    assert f"SuperLink 127.0.0.1:{port} does not answer" in one_error(capsys)


def test_run_checks_the_address_before_starting_flwr(tmp_path, capsys):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "pyproject.toml").write_text("")
    assert main(["run", str(tmp_path / "app"), "--superlink", "127.0.0.1:1", "--insecure"]) == 2
    assert "SuperLink 127.0.0.1:1 does not answer" in one_error(capsys)


def test_a_superlink_without_tls_is_named_as_such(certs, capsys):
    server = Listener(None)
    try:
        code = main(["check", "--superlink", f"127.0.0.1:{server.port}", "--root-certificates", str(certs.ca_cert)])
    finally:
        server.close()
    assert code == 2
    assert "does not complete a TLS handshake" in one_error(capsys)


@pytest.mark.parametrize("args, message", [
    (["--superlink", "localhost", "--insecure"], "is not host:port"),
    (["--superlink", "127.0.0.1:9093"], "give --root-certificates"),
    (["--superlink", "127.0.0.1:9093", "--root-certificates", "missing.crt"], "missing.crt: no such file"),
])
def test_malformed_connection_settings_are_one_error_line(args, message, capsys):
    assert main(["check", *args]) == 2
    assert message in one_error(capsys)


def test_a_root_certificates_file_that_is_not_a_certificate_is_one_error_line(tmp_path, capsys):
    private, _ = make_node_keys(tmp_path, "node0")
    assert main(["check", "--superlink", "127.0.0.1:9093", "--root-certificates", str(private)]) == 2
    assert "is not a PEM certificate" in one_error(capsys)


def test_unknown_options_of_check_are_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--superlink", "127.0.0.1:9093", "--insecure", "--federation.rounds", "2"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in one_error(capsys)
