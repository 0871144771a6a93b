"""``plait watch RUN_DIR``: serve the live page of a running or finished run."""

from __future__ import annotations

import os

from plait.config import CommandParser
from plait.errors import UsageError
from plait.train.metrics import METRICS_FILE
from plait.watch.server import LOOPBACK, open_page

DEFAULT_PORT = 8000


def run_watch(argv: list[str]) -> int:
    parser = CommandParser(prog="plait watch", description="Serve the live page of a run (read-only).")
    parser.add_argument("run_dir", help="the run's run.dir")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--host", default=LOOPBACK,
                        help="address to listen on (default 127.0.0.1; another address exposes the page to the network)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port; use 1-65535, or 0 for a free one")
    if not args.host.strip():
        raise UsageError("--host is empty; give an address such as 127.0.0.1")
    if not os.path.isdir(args.run_dir):
        raise UsageError(f"run dir '{args.run_dir}' is not a folder")
    if not os.path.isfile(os.path.join(args.run_dir, METRICS_FILE)):
        raise UsageError(f"run dir '{args.run_dir}' has no {METRICS_FILE}: not a plait run dir, or its run has "
                         "not logged a step yet (plait train --metrics.serve PORT serves a run from its start)")
    server = open_page(args.run_dir, args.host, args.port, f"--port {args.port}")
    print(f"plait: the live page of {args.run_dir} is at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
