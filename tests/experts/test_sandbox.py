"""The sandbox for untrusted programs: outcomes, the time, process, memory, network and output
limits, an empty environment, and parallel runs in order."""

from __future__ import annotations

import os

import pytest

from fedmoe.errors import ConfigError
from fedmoe.experts.sandbox import SandboxLimits, classify_failure, detect_isolation, run_program, run_programs

FAST = SandboxLimits(timeout_s=1.0, memory_mb=256)


@pytest.fixture(scope="module")
def iso():
    return detect_isolation()


def sandbox_processes(iso, slots: int = 2) -> list[int]:
    """Pids of processes running under the sandbox's user ids (none once a program has ended)."""
    if iso.uid_base is None:
        return []
    uids = {str(iso.uid_base + s) for s in range(slots)}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if uid in uids:
            found.append(int(pid))
    return found


def test_a_correct_program_passes_and_a_wrong_one_fails_with_its_assertion(iso):
    ok = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\n", FAST, iso)
    wrong = run_program("def f(x):\n    return x\n\nassert f(1) == 2\n", FAST, iso)
    assert (ok.status, ok.kind, ok.returncode, ok.passed) == ("passed", "", 0, True)
    assert (wrong.status, wrong.kind, wrong.passed) == ("failed", "AssertionError", False)
    assert 'File "solution.py", line 4' in wrong.stderr


def test_a_crash_is_an_error_named_by_its_exception(iso):
    results = run_programs(["def f(:\n", "print(undefined_name)\n"], FAST, workers=2, isolation=iso)
    assert [(r.status, r.kind) for r in results] == [("error", "SyntaxError"), ("error", "NameError")]


def test_a_hanging_program_is_killed_at_the_wall_clock_limit(iso):
    result = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=0.6), iso)
    assert (result.status, result.kind) == ("timeout", "timeout")
    assert 0.6 <= result.seconds < 1.5


def test_a_busy_loop_is_stopped_at_the_cpu_limit(iso):
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=10.0, cpu_s=1), iso)
    assert (result.status, result.kind) == ("timeout", "cpu_limit") and result.seconds < 5


def test_a_fork_bomb_is_contained_and_leaves_no_process(iso):
    guarded = run_program("import os\nwhile True:\n    os.fork()\n", FAST, iso)
    assert (guarded.status, guarded.kind) == ("error", "blocked:process")
    # past the Python guard (ctypes): the process limit, the PID namespace and the group kill hold it
    bomb = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n"
    result = run_program(bomb, SandboxLimits(timeout_s=0.8, processes=8), iso)
    assert result.status == "timeout"
    assert sandbox_processes(iso) == []


def test_the_process_limit_caps_forks_under_a_separate_user(iso):
    if iso.uid_base is None:
        pytest.skip("no separate user id here: RLIMIT_NPROC is not applied")
    source = (
        "import ctypes, time\nlibc = ctypes.CDLL(None)\nmade = 0\nfor _ in range(50):\n"
        "    pid = libc.fork()\n    if pid == 0:\n        time.sleep(30)\n        libc._exit(0)\n"
        "    made += pid > 0\nprint(made)\n"
    )
    result = run_program(source, SandboxLimits(timeout_s=1.5, processes=6), iso)
    assert result.passed and int(result.stdout) == 5  # 6 processes of the user: the program and 5 children
    assert sandbox_processes(iso) == []  # the sleeping children died with the program's PID namespace


def test_subprocess_is_blocked(iso):
    result = run_program("import subprocess\nsubprocess.run(['true'])\n", FAST, iso)
    assert (result.status, result.kind) == ("error", "blocked:process")


def test_an_unbounded_allocation_is_a_memory_error(iso):
    result = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", SandboxLimits(timeout_s=1.5, memory_mb=128), iso)
    assert (result.status, result.kind) == ("error", "MemoryError")


def test_opening_a_socket_is_blocked(iso):
    result = run_program("import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\n", FAST, iso)
    assert (result.status, result.kind) == ("error", "blocked:network")


def test_a_raw_socket_past_the_guard_has_no_network(iso):
    if not iso.namespaces:
        pytest.skip("no network namespace here: only the socket guard")
    source = "import _socket\ns = _socket.socket()\ns.connect(('1.1.1.1', 80))\n"
    result = run_program(source, FAST, iso)
    assert (result.status, result.kind) == ("error", "OSError") and "unreachable" in result.stderr


def test_huge_output_is_cut_at_the_file_limit_and_truncated(iso):
    limits = SandboxLimits(timeout_s=1.5, output_bytes=100, file_mb=1)
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits, iso)
    assert (result.status, result.kind) == ("error", "output_limit")
    assert result.truncated and result.stdout == "x" * 100 and len(result.stderr) <= 100
    chatty = run_program("print('y' * 5000)\n", limits, iso)
    assert chatty.passed and chatty.truncated and chatty.stdout == "y" * 99 + "\n"


def test_the_program_sees_no_inherited_environment_and_a_private_directory(iso, monkeypatch):
    monkeypatch.setenv("FEDMOE_TEST_SECRET", "s3cret")
    source = ("import os, sys\nassert 'FEDMOE_TEST_SECRET' not in os.environ\n"
              "assert os.getcwd().startswith(os.environ['HOME'])\nassert sys.flags.isolated\n"
              "open('scratch.txt', 'w').write('ok')\n")
    assert run_program(source, FAST, iso).passed


def test_parallel_runs_return_results_in_submission_order(iso):
    sources = [f"assert {i} % 2 == 0\n" for i in range(6)]
    results = run_programs(sources, FAST, workers=2, isolation=iso)
    assert [r.status for r in results] == ["passed", "failed"] * 3


def test_exit_statuses_map_to_outcomes():
    assert classify_failure(-24, "") == ("timeout", "cpu_limit")  # SIGXCPU
    assert classify_failure(-11, "") == ("error", "signal:SIGSEGV")
    assert classify_failure(1, "Traceback ...\nZeroDivisionError: division by zero\n") == ("error", "ZeroDivisionError")
    assert classify_failure(3, "") == ("error", "exit:3")


@pytest.mark.parametrize("bad", [{"timeout_s": 0}, {"timeout_s": float("inf")}, {"cpu_s": 0}, {"memory_mb": 1},
                                 {"processes": 0}])
def test_bad_limits_are_config_errors(bad):
    with pytest.raises(ConfigError, match="sandbox"):
        SandboxLimits(**bad)


def test_bad_worker_counts_are_config_errors():
    with pytest.raises(ConfigError, match="workers must be an integer >= 1"):
        run_programs(["pass"], workers=0)
