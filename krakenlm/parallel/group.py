"""Process-group setup for one rank: its device, the backend that fits it, the rendezvous, and the
start-up agreement every rank must pass before any work.

Each rank uses cuda:LOCAL_RANK (set before the group is made) with NCCL, or the CPU with gloo. When a
node runs more ranks than it has GPUs (a single-GPU check of a 2-rank run), ranks share GPUs round
robin and the group uses gloo, which carries CUDA tensors; NCCL refuses two ranks on one GPU.
Every wait here is bounded by the user's timeout.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from krakenlm.errors import ConfigError, DistributedError


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_device_name(name: object) -> None:
    """A device the engine can run on, named as options spell it (checked before anything starts)."""
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or
                                         (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {name!r}")


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when there is one) -> this rank's device, made current."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but torch sees no CUDA device "
                          f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)")
    count = torch.cuda.device_count()
    index = local_rank() % count if name == "cuda" else int(name[5:])
    if index >= count:
        raise ConfigError(f"device: {name} requested but only {count} CUDA device(s) exist")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def backend_for(device: torch.device, ranks_here: int) -> str:
    """NCCL when every rank on this node has a GPU of its own; gloo otherwise (and on the CPU)."""
    if device.type != "cuda":
        return "gloo"
    return "nccl" if ranks_here <= torch.cuda.device_count() else "gloo"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def check_multinode(backend: str) -> None:
    """A multi-node run whose addresses resolve to loopback times out on every node: say so up front."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world <= local:
        return
    master = os.environ.get("MASTER_ADDR", "")
    if _is_loopback(master):
        raise DistributedError(f"multi-node run ({world} ranks, {local} per node) but MASTER_ADDR={master!r} is a "
                               "loopback address: give torchrun the head node's reachable address "
                               "(--rdzv-endpoint HEAD_IP:PORT) and --local-addr THIS_NODE_IP on every node")
    ifname = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    if ifname not in os.environ and _is_loopback(socket.gethostname()):
        raise DistributedError(f"multi-node run but this host's name {socket.gethostname()!r} resolves to loopback "
                               f"(a stock /etc/hosts), so {backend} would listen on 127.0.0.1 and other nodes "
                               f"time out: set {ifname}=<the interface that reaches the other nodes> (e.g. eth0)")


def init_distributed(timeout: float, device: torch.device, *, rank: int | None = None, world: int | None = None,
                     store: dist.Store | None = None) -> bool:
    """Join the process group (from the torchrun-style environment, or as ``rank`` of ``world`` meeting
    at ``store``, the launcher's). Returns True when this call made the group (the caller owns its teardown)."""
    if dist.is_initialized():
        return False
    ranks_here = world if rank is not None else int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    backend = backend_for(device, ranks_here)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")  # the timeline reads NCCL's own durations
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout)}
    if rank is not None:
        # the followers join through env:// (torch prefixes their keys "default_pg"): share their key space
        kwargs.update(rank=rank, world_size=world, store=dist.PrefixStore("default_pg", store))
    else:
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise DistributedError(f"not launched by torchrun or the krakenlm launcher: {missing} unset")
        check_multinode(backend)
    if device.type == "cuda" and backend == "nccl":
        kwargs["device_id"] = device
    who = rank if rank is not None else os.environ["RANK"]
    try:
        dist.init_process_group(backend, **kwargs)
    except (RuntimeError, ValueError, dist.DistStoreError) as err:
        raise DistributedError(f"rank {who}: rendezvous failed within {timeout:g}s: "
                               f"{str(err).splitlines()[0]}") from err
    return True


def gather_json(value: Any, group: Any = None) -> list[Any]:
    """Every rank's ``value`` as JSON text, never pickled: a peer's bytes are data, not objects to run.
    Over the group's own device (NCCL carries only CUDA tensors)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    data = torch.frombuffer(bytearray(json.dumps(value, sort_keys=True, default=str).encode()), dtype=torch.uint8)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device), group=group)
    lengths = [int(size.item()) for size in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[:data.numel()] = data.to(padded.device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [json.loads(g[:n].cpu().numpy().tobytes()) for g, n in zip(gathered, lengths, strict=True)]


def agree(facts: dict[str, Any]) -> None:
    """Every rank must bring the same facts (config, weights, options, request); a rank that could not
    load its model says so (``load_error``) and everyone fails at once, naming it."""
    try:
        gathered = gather_json(facts)
    except (RuntimeError, dist.DistBackendError) as err:
        raise DistributedError(f"rank {dist.get_rank()}: start-up check failed: a peer died ({err})") from err
    facts = gathered[dist.get_rank()]  # compared as every rank's facts are: after the same JSON round trip
    for rank, other in enumerate(gathered):
        if other.get("load_error"):
            raise DistributedError(f"rank {rank} could not load the model: {other['load_error']}")
        for key in facts:
            if other.get(key) != gathered[0].get(key):
                detail = _digest(other.get(key)) + " vs " + _digest(gathered[0].get(key))
                raise DistributedError(f"ranks disagree on {key!r} (rank {rank} vs rank 0: {detail}); "
                                       "every rank must be started with the same model, checkpoint and options")


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) < 80 else hashlib.sha256(text.encode()).hexdigest()[:12]
