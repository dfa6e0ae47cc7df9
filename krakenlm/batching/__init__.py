"""Batching: the iteration-level scheduler (``scheduler``), request workloads (``workload``), the latency
report (``report``) and a server's step-time profile (``profile``), shared by the engine, the HTTP server,
its load generator and the cost model's serving simulator. Nothing here imports torch or an HTTP client:
the server drives the scheduler with the real engine, the simulator with predicted step times."""
