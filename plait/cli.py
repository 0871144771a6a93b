"""``plait train | plan | generate | convert | watch``: the command line.

Any user error ends as one line on stderr, ``plait: error: ...``, and exit code 2.
"""

from __future__ import annotations

import os
import sys

from plait.checkpoint.hf import convert
from plait.checkpoint.store import latest_checkpoint, load_model_checkpoint
from plait.config import SEED_MAX, CommandParser, build_config, finite_float, split_overrides, to_toml
from plait.data.tokenizer import Tokenizer
from plait.errors import NonFiniteError, PlaitError, UsageError
from plait.infer.generate import generate
from plait.launch import RankFailed, launch_training
from plait.launch.supervisor import JobFailed
from plait.plan.auto import apply_auto_layout
from plait.plan.command import run_plan
from plait.watch.watch_command import run_watch

USAGE = """plait train [CONFIG.toml] [--print-config] [--resume] [--profile-pipeline] [--section.field VALUE ...]
       plait generate CHECKPOINT [--prompt TEXT] [--max-new-tokens N] [--temperature T]
                      [--top-k K] [--top-p P] [--seed S]
       plait plan [CONFIG.toml] --cluster.gpu NAME --cluster.gpus N --train.global_batch B --train.seq_len S
                  [--model.* ...] [--layout "tp=8,pp=2,..."] [--top K] [--json] [--max-micro-batch] [--calibrate]
       plait convert SRC DST [--force] (Hugging Face folder <-> plait checkpoint)
       plait watch RUN_DIR [--port P] [--host ADDRESS] (the live page of a run)"""


def cmd_train(argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    parser = CommandParser(prog="plait train", description="Train a model (see README for the config fields).")
    parser.add_argument("config", nargs="?", help="TOML config file; defaults give the demo job")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of run.dir")
    parser.add_argument("--profile-pipeline", action="store_true", help="write run.dir/pipeline_gantt.png (pp > 1)")
    args = parser.parse_args(rest)
    if args.resume:
        overrides.append(("checkpoint.resume", "true"))
    if args.profile_pipeline:
        overrides.append(("metrics.profile_pipeline", "true"))
    cfg = build_config(args.config, overrides)
    if cfg.parallel.layout == "auto":
        cfg = apply_auto_layout(cfg)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    launch_training(cfg)
    return 0


def cmd_generate(argv: list[str]) -> int:
    parser = CommandParser(prog="plait generate", description="Sample text from a checkpoint.")
    parser.add_argument("checkpoint", help="checkpoint folder, or a run dir (its latest checkpoint)")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=finite_float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=finite_float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens = {args.max_new_tokens}; it must be >= 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature and --top-k must be >= 0, --top-p in (0, 1]")
    if not 0 <= args.seed <= SEED_MAX:
        raise UsageError(f"--seed = {args.seed} is out of range; it must be in 0..{SEED_MAX}")
    model, _ = load_model_checkpoint(args.checkpoint)
    folder = args.checkpoint
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model")):
        folder = latest_checkpoint(folder) or folder
    tokenizer = Tokenizer.load(folder)
    prompt = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
    ids = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tokenizer.eos_id)
    print(args.prompt + tokenizer.decode(ids))
    return 0


def cmd_convert(argv: list[str]) -> int:
    parser = CommandParser(prog="plait convert", description="Convert between a Hugging Face folder and a plait checkpoint.")
    parser.add_argument("src")
    parser.add_argument("dst", help="a new or empty folder")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty DST: replace plait's files there, keep the others")
    args = parser.parse_args(argv)
    print(convert(args.src, args.dst, force=args.force))
    return 0


COMMANDS = {"train": cmd_train, "plan": run_plan, "generate": cmd_generate, "convert": cmd_convert, "watch": run_watch}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:  # `plait` alone behaves like `plait train`: the demo job
            argv = ["train"]
        else:
            print(USAGE)
            return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"plait: error: unknown command '{command}'; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except PlaitError as exc:
        print(f"plait: error: {exc}", file=sys.stderr)
        return 2
    except RankFailed as exc:
        print(f"plait: error: {exc}", file=sys.stderr)
        return exc.exitcode if exc.exitcode > 0 else 1
    except (JobFailed, NonFiniteError) as exc:
        print(f"plait: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
