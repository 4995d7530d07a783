"""The benchmark runs end to end on a tiny export (figures are not checked: machines are noisy)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_the_benchmark_runs_and_reports_every_bar(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--orders", "300", "--seconds", "1",
                          "--connections", "4", "--spin", "5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr  # 1 means a bar was missed on this machine, not a crash
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["service_csv"]["orders"] == 300
    assert results["service_csv"]["reload"]["failures"] == 0
    assert len(results["checks"]) == 7
    assert "| lookup throughput vs bare Bottle/waitress |" in run.stdout
    assert results["bare_spin"]["spin_us"] == 5 and "plus 5 µs of Python per request" in run.stdout
    assert results["in_process"]["service_us"] > 0 and "In-process, per lookup" in run.stdout


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="--cpu needs Linux's CPU affinity")
def test_cpu_keeps_both_servers_on_that_cpu(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--orders", "200", "--seconds", "1",
                          "--connections", "2", "--cpu", str(cpu), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bare"]["cpus"] == results["service_csv"]["cpus"] == results["service_xlsx"]["cpus"] == str(cpu)
    assert f"both servers on CPU {cpu}" in run.stdout


def test_a_cpu_the_machine_lacks_is_refused_with_the_choices(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--cpu", "4096", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--cpu 4096: not a CPU this process may run on; choose one of" in run.stderr
    assert "Traceback" not in run.stderr
