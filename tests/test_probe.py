"""python app.py probe: the merchant's check of a deployed endpoint, against a running service."""

import shutil

import pytest
from conftest import KEY

import app


def probe(capsys, *argv):
    code = app.main(["probe", *argv])
    return code, capsys.readouterr().out


def test_a_working_endpoint_passes_every_check(capsys, live_server):
    code, out = probe(capsys, live_server + "/lookup", "--key", KEY, "--order", "#1002", "--email", "sam@example.com")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["PASS"] * 4
    assert "401" in lines[0] and "400" in lines[1] and "404" in lines[2] and "200" in lines[3]
    assert lines[4].startswith("SKIP  TLS") and lines[-1].startswith("all checks passed")


def test_a_wrong_key_fails_the_checks_and_exits_non_zero(capsys, live_server):
    code, out = probe(capsys, live_server + "/lookup", "--key", "wrong-key-0123456789abcdef")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("PASS  no key is refused with 401")
    assert lines[1].startswith("FAIL  the key given with --key is refused (401")
    assert "missing parameters" not in out and lines[-1] == "1 check(s) failed"


def test_an_order_that_is_not_there_fails(capsys, live_server):
    code, out = probe(capsys, live_server + "/lookup", "--key", KEY, "--order", "9999", "--email", "sam@example.com")
    assert code == 1 and "got 404, expected 200" in out


def test_an_endpoint_that_does_not_answer_fails(capsys):
    from conftest import free_port

    code, out = probe(capsys, f"http://127.0.0.1:{free_port()}/lookup", "--key", KEY)
    assert code == 1 and "no answer" in out


@pytest.mark.parametrize(
    "url, answered, failed",
    [
        ("https://orders.example.com/lookup", 3, 0),
        ("https://orders.example.com/lookup", 0, 1),
        ("http://127.0.0.1/lookup", 3, 0),
        ("http://orders.example.com/lookup", 3, 1),
    ],
)
def test_tls_passes_only_when_answered_over_https_or_on_this_machine(capsys, url, answered, failed):
    from urllib.parse import urlsplit

    assert app.report_tls(urlsplit(url), answered) == failed


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_a_certificate_that_is_not_trusted_fails_the_tls_check(capsys, tmp_path, live_server):
    import socket
    import ssl
    import subprocess
    import threading

    # A TLS server with a self-signed certificate: the probe must not call it valid.
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(tmp_path / "k.pem"),
            "-out",
            str(tmp_path / "c.pem"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        for _ in range(3):
            connection, _ = listener.accept()
            try:
                context.wrap_socket(connection, server_side=True).close()
            except (ssl.SSLError, OSError):
                connection.close()

    threading.Thread(target=serve, daemon=True).start()
    code, out = probe(capsys, f"https://localhost:{port}/lookup", "--key", KEY)
    listener.close()
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in out and "FAIL  TLS" in out


@pytest.mark.parametrize(
    "argv, says",
    [
        (["ftp://x/lookup", "--key", KEY], "not an http(s) URL"),
        (["http://127.0.0.1/lookup", "--key", KEY, "--order", "1"], "together"),
    ],
)
def test_bad_probe_arguments_are_one_clear_line(capsys, argv, says):
    code = app.main(["probe", *argv])
    assert code == 1 and says in capsys.readouterr().err
