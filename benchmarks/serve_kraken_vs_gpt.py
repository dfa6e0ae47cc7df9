"""Kraken vs standard TP served on 2 ranks at the 124M shapes: TTFT and TPOT percentiles at three request
rates, over loopback and over a 1 Gbit/s shaped link (network namespaces, krakenlm/bench/netns.py).

For each link, both servers (`--preset gpt2-124m` and `--preset kraken-125m-2way`, `--tp 2`) run side
by side and `krakenlm loadtest --compare` sends them the same Poisson load rate by rate, in turn. On a
shaped link each rank runs in its own namespace (torchrun-style environment), and the load client runs
in rank 0's namespace. Writes the reports (JSON), a Markdown table and the latency-vs-rate plot.

    flock -x /tmp/krakenlm-timing.lock python benchmarks/serve_kraken_vs_gpt.py [--links loopback,1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from krakenlm.bench.netns import Links, NetnsUnavailable
from krakenlm.bench.results import environment
from krakenlm.parallel.launch import free_port
from krakenlm.serve.loadtest import plot, table
from krakenlm.serve.process import ServerProcess


def start(preset: str, stack: contextlib.ExitStack, links: Links | None) -> ServerProcess:
    """A 2-rank server: followers launched by the server (loopback), or each rank in its namespace."""
    args = ["--preset", preset, "--tp", "2", "--device", "cpu", "--max-batch", "8"]
    if links is None:
        return stack.enter_context(ServerProcess(args))
    port = free_port()

    def env(rank: int) -> dict[str, str]:
        return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": links.addresses[0], "MASTER_PORT": str(port),
                "GLOO_SOCKET_IFNAME": links.interfaces[rank]}

    follower = subprocess.Popen([*links.prefix(1), sys.executable, "-m", "krakenlm", "serve", *args],
                                env=os.environ | env(1), stdout=subprocess.DEVNULL)
    stack.callback(follower.wait, 120)
    return stack.enter_context(ServerProcess(args, prefix=links.prefix(0), env=env(0)))


def load(servers: dict[str, ServerProcess], links: Links | None, args: argparse.Namespace, tag: str) -> list[dict]:
    """`krakenlm loadtest --compare` from the client's namespace; its reports, servers renamed with the link."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        compare = ",".join(f"{name}={server.url}" for name, server in servers.items())
        cmd = [*(links.prefix(0) if links else []), sys.executable, "-m", "krakenlm", "loadtest", "--compare", compare,
               "--rate", args.rates, "--requests", str(args.requests), "--prompt-len", str(args.prompt_len),
               "--output-len", str(args.output_len), "--seed", "0", "--out", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        reports = json.loads(out.read_text())["reports"]
    for r in reports:
        r["server"], r["link"] = f"{r['server']} ({tag})", tag
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="loopback,1", help="loopback and/or Gbit/s of a shaped link")
    parser.add_argument("--rates", default="0.25,0.5,1", help="three (or more) request rates, requests/s")
    parser.add_argument("--requests", type=int, default=10, help="requests per rate")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--out", default="docs/results/serve-kraken-vs-gpt.json")
    parser.add_argument("--plot", default="docs/img/serve_kraken_vs_gpt.png")
    parser.add_argument("--gpt", default="gpt2-124m", help="preset of the standard model")
    parser.add_argument("--kraken", default="kraken-125m-2way", help="preset of the Kraken model")
    args = parser.parse_args()

    reports = []
    for link in args.links.split(","):
        gbit = None if link in ("loopback", "lo") else float(link)
        tag = "loopback" if gbit is None else f"{gbit:g} Gbit/s"
        with contextlib.ExitStack() as stack:
            try:
                links = stack.enter_context(Links(2, gbit)) if gbit is not None else None
            except NetnsUnavailable as err:
                print(f"skipping {tag}: {err}", file=sys.stderr)
                continue
            servers = {name: start(preset, stack, links) for name, preset in (("gpt", args.gpt),
                                                                                 ("kraken", args.kraken))}
            reports += load(servers, links, args, tag)
    print(f"{environment()['cpu']}: 2 ranks, {args.requests} requests per rate, prompt {args.prompt_len}, "
          f"output {args.output_len}, max batch 8")
    print(table(reports))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": environment(), "args": vars(args), "reports": reports},
                                         indent=2))
    print(f"wrote {args.out} and {plot(reports, args.plot)}")


if __name__ == "__main__":
    main()
