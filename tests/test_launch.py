"""The launcher and process-group setup: JSON payloads, failures reported, multi-node mistakes named."""

import json
import socket
from pathlib import Path

import pytest

from krakenlm.errors import DistributedError
from krakenlm.parallel.group import check_multinode
from krakenlm.parallel.launch import Ranks, run_ranks
from tests.conftest import as_a_terminal_starts_it


def test_a_rank_target_that_is_not_importable_fails_with_a_clear_code(capfd):
    assert run_ranks("tests.no_such_module:main", 2, {}, grace=5) != 0
    assert "No module named 'tests.no_such_module'" in capfd.readouterr().err


def test_the_rendezvous_port_is_held_from_before_the_ranks_start_and_values_travel_as_json(tmp_path):
    """No window between choosing the port and binding it: another program cannot take it."""
    out = tmp_path / "gathered.json"
    ranks = Ranks("tests.tp_workers:gather", {"text": "ü'\"", "out": str(out)}, 3)
    with socket.socket() as probe, pytest.raises(OSError):
        probe.bind(("127.0.0.1", ranks.port))
    assert ranks.wait(timeout=120) == 0
    expected = [{"rank": r, "text": "ü'\"" * (r + 1), "nested": [[r], None, 1.5]} for r in range(3)]
    assert json.loads(out.read_text()) == expected


def test_multi_node_with_a_loopback_master_address_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    with pytest.raises(DistributedError, match="--rdzv-endpoint HEAD_IP:PORT"):
        check_multinode("gloo")


def test_multi_node_on_a_host_whose_name_resolves_to_loopback_names_the_interface_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    loopback_name = socket.gethostbyname(socket.gethostname()).startswith("127.")
    if loopback_name:  # a stock /etc/hosts, as on this project's machines
        with pytest.raises(DistributedError, match="GLOO_SOCKET_IFNAME"):
            check_multinode("gloo")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    check_multinode("gloo")  # the user said which interface: no complaint


def test_a_single_node_run_is_never_questioned(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    check_multinode("gloo")


@pytest.mark.parametrize("after_s", [0.0, 2.0], ids=["start-up", "mid-run"])
def test_ctrl_c_stops_the_leader_and_every_follower(after_s):
    """A terminal's Ctrl-C (SIGINT to the foreground process group) while the ranks start (rank 0 waits for
    a follower in a collective) or mid-run: exit 130, no rank left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # a run that lasts tens of seconds (124M, fp32, 800 tokens), so the interrupt always lands mid-run
    cmd = [sys.executable, "-m", "krakenlm", "generate", "--preset", "kraken-125m-2way", "--prompt", "To be",
           "--tp", "2", "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "800"]
    leader = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, preexec_fn=as_a_terminal_starts_it)
    followers: list[str] = []
    deadline = time.monotonic() + 60
    while not followers and time.monotonic() < deadline and leader.poll() is None:
        time.sleep(0.2)
        followers = subprocess.run(["pgrep", "-P", str(leader.pid)], capture_output=True, text=True).stdout.split()
    time.sleep(after_s)
    assert leader.poll() is None, "the run ended before the interrupt"
    status = Path(f"/proc/{leader.pid}/status").read_text().splitlines()
    masks = {k: v.strip() for k, v in (line.split(":", 1) for line in status if line.startswith(("SigIgn", "SigBlk")))}
    assert not any(int(m, 16) & (1 << (signal.SIGINT - 1)) for m in masks.values()), masks
    os.killpg(leader.pid, signal.SIGINT)
    assert leader.wait(timeout=30) == 130
    assert "interrupted" in leader.stderr.read()
    time.sleep(1.0)
    assert followers and not [pid for pid in followers if os.path.exists(f"/proc/{pid}")]


def test_a_follower_killed_at_start_up_fails_the_launch_at_once(monkeypatch):
    """The launcher used to wait the whole --timeout in the rendezvous for a follower that was already dead."""
    import time

    import krakenlm.engine
    from krakenlm.engine import Engine, EngineOptions
    from krakenlm.source import ModelSource

    class KilledAtStart(Ranks):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.procs[0].kill()

    monkeypatch.setattr(krakenlm.engine, "Ranks", KilledAtStart)
    start = time.monotonic()
    with pytest.raises(DistributedError, match="rank 1 exited during start-up"):
        Engine.launch(ModelSource(preset="mini-gpt"), EngineOptions(tp=2, timeout=300, dtype="fp32"))
    assert time.monotonic() - start < 60  # a hang guard, not a timing: it took the full 300 s before


LAUNCHER = """
import sys, time
from krakenlm.parallel.launch import Ranks
ranks = Ranks("tests.tp_workers:sleeper", {"seconds": 300}, 2)
ranks.await_started(120)
print(" ".join(str(p.pid) for p in ranks.procs), flush=True)
time.sleep(300)
"""


def test_a_killed_launcher_leaves_no_rank_and_no_payload(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = os.environ | {"TMPDIR": str(tmp_path)}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in launcher.stdout.readline().split()]
        assert len(pids) == 2 and list(tmp_path.iterdir()) == []  # each rank removed its payload once read
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 20  # a hang guard: they lingered ~35 s, or the full sleep, before
        while any(os.path.exists(f"/proc/{p}") and "Z" not in _state(p) for p in pids):
            assert time.monotonic() < deadline, "ranks outlived their launcher"
            time.sleep(0.1)
    finally:
        launcher.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


ENDS_WITHOUT_CLOSE = """
from krakenlm.engine import Engine, EngineOptions
from krakenlm.source import ModelSource
engine = Engine.launch(ModelSource(preset="mini-kraken-2way"), EngineOptions(tp=2, dtype="fp32"))
engine.score([[1, 2, 3, 4]], [[4]])
print(engine._followers.procs[0].pid, flush=True)
"""


def test_a_follower_leaves_quietly_when_rank_0_ends_without_closing():
    """lm-eval never closes its model: every TP=2 run's follower printed a gloo traceback at shutdown."""
    import subprocess
    import sys

    # the follower shares the pipes: run() returns once it has exited too
    r = subprocess.run([sys.executable, "-c", ENDS_WITHOUT_CLOSE], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert _state(int(r.stdout)) == "Z"  # gone (or a zombie its dead parent left)
