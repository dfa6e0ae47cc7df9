"""Serving: the iteration-level scheduler (``scheduler``) and the latency report (``report``) shared by
the HTTP server, its load generator and the cost model's serving simulator. Nothing here imports torch:
the server drives the scheduler with the real engine, the simulator with predicted step times."""
