"""The shell script every command runs as, executed for real with bash; and the de-duplication of
replayed log streams.

Layer: tests of metaflow-sandbox-daytona. Imports: pytest, the standard library, the backend's
``commands`` module.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from metaflow_extensions.sandbox.daytona import commands
from metaflow_extensions.sandbox.daytona.commands import Delivered, kill_script, wrap


@pytest.fixture(autouse=True)
def private_pid_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "PID_DIR", str(tmp_path / "pids"))


def run(script: str) -> subprocess.CompletedProcess[str]:
    """Like the session's shell: run the script, report its ``$?``."""
    return subprocess.run(["bash", "-c", f"{script}\nexit $?"], capture_output=True, text=True, check=False)


def ps() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout


def test_env_cwd_exit_code_and_quoting(tmp_path):
    env = {"A": 'it\'s "quoted" $HOME `x`', "B": "two\nlines"}
    res = run(wrap('printf "%s|%s|%s" "$A" "$B" "$PWD"; exit 7', env, str(tmp_path), "k1"))
    assert res.returncode == 7
    assert res.stdout == f"{env['A']}|{env['B']}|{tmp_path}"


def test_signal_exit_and_syntax_errors_are_the_commands_own(tmp_path):
    assert run(wrap("kill -9 $$", {}, str(tmp_path), "k2")).returncode == 137
    res = run(wrap("if then fi", {}, str(tmp_path), "k3"))
    assert res.returncode == 2 and "syntax error" in res.stderr


def test_kill_script_kills_the_whole_tree_and_nothing_else(tmp_path):
    bystander = subprocess.Popen(["sleep", "301"])
    victim = subprocess.Popen(["bash", "-c", wrap("sleep 302 & sleep 303; echo never", {}, str(tmp_path), "k4")])
    pidfile = Path(commands.PID_DIR) / "k4.pid"
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    assert run(kill_script("k4")).returncode == 0
    assert victim.wait(10) == -9
    for _ in range(100):  # killed children are reaped by init a moment later
        if not re.search(r"^sleep 30[23]$", ps(), re.MULTILINE):
            break
        time.sleep(0.05)
    assert not re.search(r"^sleep 30[23]$", ps(), re.MULTILINE)
    assert bystander.poll() is None
    # A pid file naming an unrelated process (a recycled pid) kills nothing.
    pidfile.write_text(f"{bystander.pid}\n")
    run(kill_script("k4"))
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()


def test_a_replayed_log_delivers_only_what_is_new():
    out: list[str] = []
    err: list[str] = []
    delivered = Delivered(out.append, err.append, threading.Event())
    first_out, first_err = delivered.connection()
    first_out("hel")
    first_err("e1")
    # The stream drops; the daemon replays from the start, in other chunk sizes.
    again_out, again_err = delivered.connection()
    again_out("h")
    again_out("ello\nwor")
    again_err("e1e2")
    again_out("ld\n")
    assert ("".join(out), "".join(err)) == ("hello\nworld\n", "e1e2")
    assert delivered.total() == len("hello\nworld\n") + 4


def test_nothing_is_delivered_once_stopped():
    out: list[str] = []
    stop = threading.Event()
    on_out, _ = Delivered(out.append, out.append, stop).connection()
    on_out("a")
    stop.set()
    on_out("b")
    assert out == ["a"]
