"""CPU threads on a shared machine: `vis2ir --threads N|auto` (and $VIS2IR_THREADS), auto taking the cores
free now, OpenMP's idle threads waiting passively (docs/performance.md, "A busy CPU")."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vis2ir
from vis2ir.cli import main
from vis2ir.errors import Vis2IRError
from vis2ir.io.runtime import free_cores, parse_threads, setup_threads, thread_plan


@pytest.mark.parametrize("cores, load, free", [
    (2, 0.06, 2),   # idle: every core
    (2, 7.9, 1),    # the load 8 on 2 cores: one thread, never none
    (2, 1.2, 1),
    (2, 0.4, 2),    # a core more than half idle counts as free
    (16, 3.2, 13),
    (4, 0.0, 4),
    (1, 0.0, 1),
])
def test_free_cores_are_the_cores_less_the_load(cores, load, free):
    assert free_cores(cores, load) == free


def test_thread_plan_says_how_many_whether_to_wait_passively_and_why():
    busy = "the machine is busy (load 7.9)"
    assert thread_plan(None, {}, 2, 7.9) == (1, True, busy)
    assert thread_plan(None, {}, 2, 0.1) == (2, False, "the machine is idle (load 0.1)")  # spinning is faster
    assert thread_plan(None, {}, 8, None) == (8, False, "the load is unknown")
    assert thread_plan("3", {}, 2, 7.9) == (3, True, "--threads 3")
    assert thread_plan("2", {}, 2, 0.0) == (2, False, "--threads 2")
    assert thread_plan("4", {}, 2, 0.0) == (4, True, "--threads 4")  # more threads than cores: they share them
    assert thread_plan(None, {"VIS2IR_THREADS": "2"}, 4, 0.0) == (2, False, "VIS2IR_THREADS=2")
    assert thread_plan("1", {"VIS2IR_THREADS": "2"}, 4, 0.0) == (1, False, "--threads 1")  # the option wins
    # the user's OMP_NUM_THREADS is kept, unless vis2ir is told otherwise (auto included)
    assert thread_plan(None, {"OMP_NUM_THREADS": "4"}, 2, 7.9) == (None, True, "OMP_NUM_THREADS=4")
    assert thread_plan("auto", {"OMP_NUM_THREADS": "4"}, 2, 7.9) == (1, True, busy)
    assert thread_plan(None, {"VIS2IR_THREADS": "auto", "OMP_NUM_THREADS": "4"}, 2, 0.0)[0] == 2


@pytest.mark.parametrize("value, message", [
    ("0", "--threads '0': expected a whole number of CPU threads (1 or more) or auto"),
    ("-1", "--threads '-1'"),
    ("two", "--threads 'two'"),
    ("1.5", "--threads '1.5'"),
])
def test_a_bad_thread_count_is_one_line(value, message):
    with pytest.raises(Vis2IRError, match=re.escape(message)):
        parse_threads(value, "--threads")


def test_a_bad_setting_is_answered_by_the_cli(capsys, monkeypatch, tmp_path):
    synth = ["data", "synth", "--count", "1", "--size", "16", "--out", str(tmp_path / "s")]
    assert main(["--threads", "0", *synth]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vis2ir: error: --threads '0': expected a whole number of CPU threads (1 or more) or auto"]
    monkeypatch.setenv("VIS2IR_THREADS", "many")
    assert main(synth) == 2
    assert "VIS2IR_THREADS='many': expected a whole number" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_in_a_process_with_torch_loaded_only_a_number_changes_the_threads(caplog):
    """vis2ir called from Python after torch is imported: auto leaves the caller's threads alone; a number
    sets them (torch.set_num_threads) and says so."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert setup_threads(None) is None and torch.get_num_threads() == 1
        caplog.set_level(logging.INFO, logger="vis2ir")
        assert setup_threads("2") == 2 and torch.get_num_threads() == 2
        assert "Using 2 CPU threads of " in caplog.text and ": --threads 2" in caplog.text
    finally:
        torch.set_num_threads(before)


def _fresh(tmp_path, argv: list[str] = (), cores: int = 2, load: float = 0.0, **env: str) -> list[str]:
    """`vis2ir [ARGV] data synth` (a command that imports torch) in a fresh process on a machine faked to have
    `cores` cores at a 1-minute load of `load`, then its exit status, torch's thread count and the wait
    policy OpenMP was started with ('None': OpenMP's default)."""
    synth = ["data", "synth", "--count", "1", "--size", "16", "--out", str(tmp_path / "s")]
    code = (f"import os, sys\nos.sched_getaffinity = lambda pid: set(range({cores}))\n"
            f"os.getloadavg = lambda: ({load}, 0.0, 0.0)\n"
            f"from vis2ir.cli import main\ncode = main({[*argv, *synth]!r})\n"
            "import torch\nprint(code, torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(vis2ir.__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base | env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("threads, load, policy", [("1", 0.0, "None"), ("3", 0.0, "PASSIVE"), ("2", 7.9, "PASSIVE")])
def test_the_threads_option_sets_torchs_threads(tmp_path, threads, load, policy):
    assert _fresh(tmp_path, ["--threads", threads], load=load) == ["0", threads, policy]


def test_the_environment_and_the_users_openmp_settings(tmp_path):
    assert _fresh(tmp_path, VIS2IR_THREADS="1") == ["0", "1", "None"]
    # OMP_NUM_THREADS and OMP_WAIT_POLICY given by the user are kept; --threads overrides the first
    assert _fresh(tmp_path, load=7.9, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE") == ["0", "2", "ACTIVE"]
    assert _fresh(tmp_path, ["--threads", "3"], OMP_NUM_THREADS="1") == ["0", "3", "PASSIVE"]


@pytest.mark.parametrize("cores, load, threads, policy", [
    (2, 7.9, "1", "PASSIVE"),  # the busy machine: one thread, and sleeping, not spinning, if it had more
    (3, 0.1, "3", "None"),     # idle: every core, OpenMP's default (spinning) wait
    (4, 1.8, "2", "PASSIVE"),
])
def test_auto_takes_the_free_cores(tmp_path, cores, load, threads, policy):
    """Without a setting: the cores this process may use less the 1-minute load average (both faked here)."""
    assert _fresh(tmp_path, cores=cores, load=load) == ["0", threads, policy]


def test_config_show_stays_without_torch(tmp_path):
    """`config` does no CPU work: no thread setup, no torch."""
    code = ("import sys\nfrom vis2ir.cli import main\nmain(['--threads', '1', 'config', 'show'])\n"
            "print('torch' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(vis2ir.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.splitlines()[-1] == "False", proc.stderr
