"""The command line: serve, check, lookup; errors as one clear line."""

import json
import os
import re
import sys
import urllib.request

import pytest
from conftest import ROOT, Served, free_port, write

import app

FIXTURE = ROOT.parent / "shared" / "fixtures" / "shopify_orders_export.csv"


def run(capsys, *argv):
    """Run app.main and return (exit code, stdout, stderr)."""
    code = app.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    """The CLI reads the environment: start each test from a clean one."""
    for name in ("API_KEY", "ORDERS_FILE", "CONTEXTS_FILE", "HOST", "PORT", "STATE_DIR", "LOG_FORMAT", "ONE_CPU"):
        monkeypatch.delenv(name, raising=False)


def test_lookup_prints_the_status_and_the_exact_json(capsys, export, contexts_file):
    code, out, _ = run(
        capsys, "lookup", "#1001", "jane@example.com", "--data", str(export), "--contexts", str(contexts_file)
    )
    status, body = out.splitlines()
    assert code == 0 and status == "200 OK"
    assert json.loads(body)["context"].startswith("Order #1001 was found")


def test_lookup_of_an_unknown_order_prints_404(capsys, export, contexts_file):
    code, out, _ = run(capsys, "lookup", "42", "x@example.com", "--data", str(export), "--contexts", str(contexts_file))
    assert out.splitlines()[0] == "404 Not Found"


def test_environment_variables_choose_the_files(capsys, monkeypatch, export, contexts_file):
    monkeypatch.setenv("ORDERS_FILE", str(export))
    monkeypatch.setenv("CONTEXTS_FILE", str(contexts_file))
    code, out, _ = run(capsys, "check")
    assert code == 0 and str(export) in out


def test_check_summarises_the_export(capsys, export, contexts_file):
    code, out, _ = run(capsys, "check", "--data", str(export.parent), "--contexts", str(contexts_file))
    assert code == 0
    assert "Shopify orders export" in out
    assert 'order_id           <- "Name"' in out
    assert "rows     8; orders 6" in out
    assert "'#1001'" in out
    assert "1 order has no email and can never be found" in out
    assert "status: " in out and "fulfilled 3" in out
    assert out.rstrip().endswith("OK")


@pytest.mark.skipif(not FIXTURE.exists(), reason="the shared Shopify fixture is not beside this checkout")
def test_check_on_the_real_shopify_export(capsys):
    code, out, _ = run(capsys, "check", "--data", str(FIXTURE))
    assert code == 0
    assert "rows     40; orders 19" in out and "'#1001'" in out
    assert "orders have no email" in out


@pytest.mark.parametrize(
    "setup, says",
    [
        (lambda d, c: c.write_text("[settings\n"), "contexts.toml: "),
        (lambda d, c: d.write_text("Order Number,Status\n1,x\n"), "no column for email"),
        (lambda d, c: d.unlink(), "no export (.csv, .tsv, .txt or .xlsx)"),
    ],
)
def test_check_reports_problems_in_one_line_without_traceback(capsys, export, contexts_file, setup, says):
    setup(export, contexts_file)
    code, out, err = run(capsys, "check", "--data", str(export.parent), "--contexts", str(contexts_file))
    assert code == 1
    assert says in err and err.startswith("error: ")
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "env, says",
    [
        ({"PORT": "eighty"}, "PORT='eighty'"),
        ({"PORT": "70000"}, "out of range"),
        ({"THREADS": "0"}, "THREADS='0' is not a whole number above 0"),
        ({"SETTLE_SECONDS": "soon"}, "SETTLE_SECONDS='soon'"),
        ({"ONE_CPU": "maybe"}, "ONE_CPU='maybe': use yes or no."),
    ],
)
def test_bad_settings_are_one_clear_line(capsys, monkeypatch, env, says):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run(capsys, "check")
    assert code == 1 and says in err


def test_serve_without_a_key_makes_one_and_prints_it(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "ORDERS_FILE", "CONTEXTS_FILE")}
    env.update(PORT=str(port), STATE_DIR=str(tmp_path / "state"))
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for("INFO serving ")
        key = re.search(r"accepts the key:\s+(\S+)", served.output).group(1)
        assert "For trying out only" in served.output
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/lookup?order_id=1001&customer_email=jane@example.com", headers={"x-api-key": key}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response)["context"].startswith("Order #1001 was found")
    assert "Traceback" not in served.output and "Logging error" not in served.output


@pytest.mark.parametrize(
    "host, says",
    [
        ("127.0.0.1", "is already in use (another instance of this service, or another program"),
        ("192.0.2.1", "192.0.2.1 is not an address of this machine. Set HOST"),
    ],
)
def test_a_port_it_cannot_listen_on_is_one_line_that_says_what_to_do(tmp_path, host, says):
    import socket
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("ORDERS_FILE", "CONTEXTS_FILE")}
        env.update(
            PORT=str(port),
            HOST=host,
            STATE_DIR=str(tmp_path / "state"),
            API_KEY="test-Kq7vX2mZp9LrT4wN8cB3",
            TRUSTED_PROXY="127.0.0.1",
        )
        run = subprocess.run(
            [sys.executable, str(ROOT / "app.py")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len(errors) == 1 and says in errors[0]


SEVERAL_CPUS = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="keeping to one CPU needs Linux and a choice of CPUs",
)


def serving_instance(tmp_path, name, script=ROOT / "app.py", **settings):
    """python app.py on a free port with a data folder of its own, as a Served (not yet entered)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORDERS_FILE", "CONTEXTS_FILE", "CPU", "ONE_CPU")}
    write(tmp_path / name / "data" / "orders.csv", "Order Number,Email\n1,a@example.com\n")
    env.update(
        PORT=str(free_port()),
        ORDERS_FILE=str(tmp_path / name / "data"),
        API_KEY="test-Kq7vX2mZp9LrT4wN8cB3",
        **settings,
    )
    return Served([sys.executable, str(script)], env, tmp_path / name)


def cpus_of(served):
    """The set of CPU sets the threads of a running instance may use."""
    pid = served.process.pid
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


@SEVERAL_CPUS
@pytest.mark.parametrize("one_cpu, kept", [("", True), ("yes", True), ("no", False)])
def test_serve_keeps_every_thread_on_one_cpu_unless_told_not_to(tmp_path, one_cpu, kept):
    with serving_instance(tmp_path, "shop", ONE_CPU=one_cpu) as served:
        served.wait_for("INFO serving ")
        threads, count = cpus_of(served), len(os.listdir(f"/proc/{served.process.pid}/task"))
    assert count > 3  # the request threads, the log's and the watcher's are all looked at
    if kept:
        (cpu,) = next(iter(threads))
        assert threads == {frozenset({cpu})} and f"kept on CPU {cpu} " in served.output
    else:
        assert threads == {frozenset(os.sched_getaffinity(0))} and "kept on CPU" not in served.output


@SEVERAL_CPUS
def test_two_instances_keep_to_different_cpus(tmp_path):
    # Two shops (or two replicas) on one server: the second takes the CPU the first does not hold.
    # A copy of the service of its own, so that instances other tests run meanwhile do not count.
    import shutil

    copy = tmp_path / "service"
    copy.mkdir()
    for name in ("app.py", "contexts.toml", "layouts.toml", "vocabulary.toml"):
        shutil.copy(ROOT / name, copy / name)
    with serving_instance(tmp_path, "first", copy / "app.py") as first:
        first.wait_for("INFO serving ")
        with serving_instance(tmp_path, "second", copy / "app.py") as second:
            second.wait_for("INFO serving ")
            assert len(cpus_of(first)) == len(cpus_of(second)) == 1
            assert cpus_of(first) != cpus_of(second)


@SEVERAL_CPUS
def test_cpu_chooses_the_cpu(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    with serving_instance(tmp_path, "shop", CPU=str(cpu)) as served:
        served.wait_for("INFO serving ")
        assert cpus_of(served) == {frozenset({cpu})} and f"kept on CPU {cpu} (as CPU= says" in served.output


@pytest.mark.parametrize(
    "value, says", [("one", "CPU='one' is not a CPU number"), ("4000", "CPU=4000: this process may use CPU")]
)
def test_a_cpu_that_is_not_one_is_a_clear_error(tmp_path, value, says):
    if value == "4000" and not hasattr(os, "sched_getaffinity"):
        pytest.skip("CPU numbers are checked on Linux only")
    served = serving_instance(tmp_path, "shop", CPU=value)
    with served:
        served.process.wait(20)
    assert says in served.output and "Traceback" not in served.output


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="keeping to one CPU needs Linux and a choice of CPUs",
)
def test_where_cpus_cannot_be_chosen_the_service_does_not_claim_it_kept_to_one(monkeypatch):
    def refuse(*args):
        raise PermissionError("not in this sandbox")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert app.keep_to_one_cpu() is None


@pytest.mark.parametrize(
    "value, wanted",
    [
        ("x-forwarded-for x-forwarded-proto", "x-forwarded-for x-forwarded-proto"),
        ("x-forwarded-for, x-forwarded-proto", "x-forwarded-for x-forwarded-proto"),
        ("", "x-forwarded-for"),
    ],
)
def test_trusted_proxy_headers_take_spaces_or_commas(value, wanted):
    settings = app.settings_from({}, env={"TRUSTED_PROXY": "127.0.0.1", "TRUSTED_PROXY_HEADERS": value})
    assert settings.trusted_proxy_headers == wanted


def test_check_reads_a_windows_1252_export(capsys, tmp_path, contexts_file):
    path = tmp_path / "orders.csv"
    path.write_bytes("Order Number,Email,Status,Item\n1,a@example.com,shipped,Café\n".encode("cp1252"))
    code, out, _ = run(capsys, "check", "--data", str(path), "--contexts", str(contexts_file))
    assert code == 0 and "values   status: shipped 1" in out


def test_check_fails_when_no_order_can_be_found(capsys, tmp_path, contexts_file):
    path = tmp_path / "orders.csv"
    path.write_text("Order Number,Email,Status\n1,,shipped\n2,,processing\n")
    code, out, err = run(capsys, "check", "--data", str(path), "--contexts", str(contexts_file))
    assert code == 1 and out.rstrip().endswith("FAILED") and "none has both an order number and an email" in err


def test_check_surveys_an_export_whose_rows_of_an_order_lie_apart(capsys, tmp_path, contexts_file):
    path = tmp_path / "orders.csv"
    path.write_text(
        "Order ID,Email,Status,Item\n1,a@example.com,shipped,Hat\n2,b@example.com,processing,Cap\n"
        "1,a@example.com,,Scarf\n"
    )
    code, out, _ = run(capsys, "check", "--data", str(path), "--contexts", str(contexts_file))
    assert code == 0
    assert "values   status: shipped 1, processing 1" in out and "answers  shipped 1, processing 1" in out


@pytest.mark.parametrize(
    "env, says", [({"POLL_SECONDS": "1e10"}, "up to 1,000,000"), ({"MEMORY_LIMIT_MB": "0"}, "set it to e.g. 800")]
)
def test_settings_out_of_range_are_one_clear_line(capsys, monkeypatch, env, says):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run(capsys, "check")
    assert code == 1 and says in err and "Traceback" not in err
