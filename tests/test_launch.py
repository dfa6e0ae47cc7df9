"""The launcher and process-group setup: JSON payloads, failures reported, multi-node mistakes named."""

import socket

import pytest

from krakenlm.errors import DistributedError
from krakenlm.parallel.group import check_multinode
from krakenlm.parallel.launch import run_ranks


def test_a_rank_target_that_is_not_importable_fails_with_a_clear_code(capfd):
    assert run_ranks("tests.no_such_module:main", 2, {}, grace=5) != 0
    assert "No module named 'tests.no_such_module'" in capfd.readouterr().err


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
