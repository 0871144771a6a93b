"""``plait plan``: parse the command line, run the search or evaluate a layout, print the result."""

from __future__ import annotations

import time

from plait.config import CommandParser, split_overrides
from plait.config.parse import set_key
from plait.errors import ConfigError, UsageError
from plait.layout import parse_layout
from plait.plan.calibrate import calibrate_command
from plait.plan.hardware import GIB
from plait.plan.hetero import rerank_nic_aware
from plait.plan.report import to_json, to_table
from plait.plan.search import evaluate_fixed
from plait.plan.spec import PlanRequest, build_cluster, build_request

USAGE = ("plait plan [CONFIG.toml] [--model.* ...] --cluster.gpu NAME --cluster.gpus N --cluster.gpus_per_node G "
         "[--cluster.* ...] --train.global_batch B --train.seq_len S [--layout \"tp=8,pp=2,...\"] [--top K] "
         "[--json] [--max-micro-batch] [--calibrate]")


def calibration_ranks(given: dict[str, str]) -> int:
    """The local ranks ``--calibrate`` measures with: ``--cluster.gpus``, checked by the config
    parser like any plan key, or 4."""
    if "cluster.gpus" not in given:
        return 4
    probe = PlanRequest()
    set_key(probe, "cluster.gpus", given["cluster.gpus"], from_cli=True)
    return probe.cluster.gpus


def run_plan(argv: list[str]) -> int:

    rest, overrides = split_overrides(argv)
    parser = CommandParser(prog="plait plan", usage=USAGE,
                     description="Predict step time and memory per GPU of parallel layouts; rank the best.")
    parser.add_argument("config", nargs="?", help="TOML file with [model], [train] and [cluster] sections")
    parser.add_argument("--layout", default="", help="fix some layout fields, e.g. 'tp=8,pp=2,recompute=full'")
    parser.add_argument("--top", type=int, default=5, help="layouts to show (default 5)")
    parser.add_argument("--json", action="store_true", help="print the JSON contract instead of a table")
    parser.add_argument("--max-micro-batch", action="store_true", help="keep the largest micro-batch that fits")
    parser.add_argument("--calibrate", action="store_true",
                        help="cpu: measure matmul and gloo throughput into cluster.profile, then plan if a model is given")
    args = parser.parse_args(rest)
    if args.top < 1:
        raise UsageError(f"--top = {args.top}; it must be >= 1")
    if args.calibrate:
        given = dict(overrides)
        if given.get("cluster.gpu") != "cpu":
            raise ConfigError("--calibrate measures this machine: it needs --cluster.gpu cpu")
        profile = calibrate_command(given.get("cluster.profile", ""), calibration_ranks(given))
        if not any(key.startswith("model.") for key in given) and args.config is None:
            return 0
        overrides.append(("cluster.profile", profile))
    started = time.perf_counter()
    request = build_request(args.config, overrides)
    cluster = build_cluster(request.cluster)
    fixed = parse_layout(args.layout)
    result = evaluate_fixed(request.model, request.train, cluster, fixed, args.max_micro_batch)
    if cluster.heterogeneous:
        rerank_nic_aware(result, request.model, request.train, cluster)
    if args.json:
        print(to_json(result, args.top, cluster.gpu.name == "cpu"))
    else:
        print(to_table(result, args.top, cluster.gpu.memory_bytes / GIB, cluster.gpu.name == "cpu"))
        print(f"searched in {time.perf_counter() - started:.2f} s")
    return 0
