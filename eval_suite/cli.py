"""``python -m eval_suite``: build the synthetic family, run tasks, compare results."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Dict, List, Optional, Sequence


class CliError(Exception):
    pass


def _parse_data_paths(values: Optional[Sequence[str]]) -> Dict[str, str]:
    paths: Dict[str, str] = {}
    for value in values or []:
        if "=" not in value:
            raise CliError(f"--data-path expects TASK=PATH, got {value!r}")
        task, path = value.split("=", 1)
        paths[task.strip()] = path.strip()
    return paths


def cmd_synth_build(args) -> int:
    from eval_suite.synth.family import build_family, size_overrides_from

    manifest = build_family(args.out, args.size, args.seed, threads=args.threads, force=args.force,
                            size_overrides=size_overrides_from(args.set or []))
    print(f"base: {manifest['base']}")
    for name, path in manifest["experts"].items():
        print(f"expert {name}: {path}")
    print(f"build seconds: {manifest['seconds']}")
    return 0


def cmd_synth_study(args) -> int:
    from eval_suite.synth.family import size_overrides_from
    from eval_suite.synth.study import run_study

    command = "python -m eval_suite " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_study(args.out, size=args.size, seeds=args.seeds, methods=args.methods, lambdas=args.lambdas,
              val_items=args.val_items, test_items=args.test_items, threads=args.threads, report=args.report,
              command=command, size_overrides=size_overrides_from(args.set or []))
    return 0


def cmd_run(args) -> int:
    from eval_suite.adapters import load_adapter
    from eval_suite.runner import run_tasks
    from eval_suite.tasks import expand_task_names

    names = expand_task_names(args.tasks)
    data_paths = _parse_data_paths(args.data_path)
    unknown = [t for t in data_paths if t not in names]
    if unknown:
        raise CliError(f"--data-path given for tasks not being run: {', '.join(unknown)}")
    options = {"exact_match_style": args.exact_match_style}
    if args.judge_url:
        options.update(judge_url=args.judge_url, judge_model=args.judge_model)
    adapter = load_adapter(args.model, args.adapter, device=args.device, dtype=args.dtype,
                           batch_size=args.batch_size, attn_implementation=args.attn_implementation,
                           progress=not args.no_progress)
    data = run_tasks(adapter, names, args.output, split=args.split, limit=args.limit, data_paths=data_paths,
                     task_options=options, save_predictions=args.save_predictions)
    print(f"wrote {args.output} ({len(data['tasks'])} tasks" + (f", {len(data['errors'])} failed)" if data["errors"] else ")"))
    return 1 if data["errors"] else 0


def cmd_report(args) -> int:
    from eval_suite.report import write_report

    written = write_report(args.results, args.out)
    print(f"wrote {written['markdown']} and {written['plot']}")
    return 0


def cmd_tasks(args) -> int:
    from eval_suite.tasks import GROUPS, TASKS

    for name, cls in TASKS.items():
        group = next((g for g, members in GROUPS.items() if name in members), "-")
        print(f"{name:20s} {group:6s} {cls.metric:24s} {cls.dataset_id if isinstance(cls.dataset_id, str) else 'eval_suite/' + name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval_suite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="the offline synthetic benchmark and its model family")
    synth_sub = synth.add_subparsers(dest="synth_command", required=True)
    build = synth_sub.add_parser("build", help="build (or reuse) the tiny model family")
    build.add_argument("--size", choices=["ci", "full", "smoke"], default="ci")
    build.add_argument("--out", required=True, help="writes OUT/base and OUT/experts/<capability>")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--threads", type=int, default=1, help="torch threads (part of the cache key; 1 = reproducible)")
    build.add_argument("--force", action="store_true", help="rebuild even if a matching build is cached")
    build.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="override a field of the size (e.g. patch_size=16, held_out_rate=0, expert_replay=0.5)")
    build.set_defaults(func=cmd_synth_build)

    study = synth_sub.add_parser("study", help="sensitivity study: base, experts and merges over seeds")
    study.add_argument("--size", choices=["ci", "full", "smoke"], default="full")
    study.add_argument("--out", required=True)
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    study.add_argument("--methods", nargs="+", default=None)
    study.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 1.0, 1.5])
    study.add_argument("--val-items", type=int, default=500)
    study.add_argument("--test-items", type=int, default=500)
    study.add_argument("--threads", type=int, default=1)
    study.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a field of the family size")
    study.add_argument("--report", default=None, help="write the Markdown summary here (e.g. eval_suite/SYNTH_RESULTS.md)")
    study.set_defaults(func=cmd_synth_study)

    run = sub.add_parser("run", help="evaluate a model directory on tasks")
    run.add_argument("--model", required=True)
    run.add_argument("--tasks", required=True, help="'synth', 'paper' or comma-separated task names")
    run.add_argument("--output", required=True, help="results JSON (rewritten after every task)")
    run.add_argument("--limit", type=int, default=None, help="first N items of each task")
    run.add_argument("--split", choices=["val", "test"], default=None,
                     help="synthetic split (default test); paper benchmarks keep their own split")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--adapter", default=None, help="force an adapter (default: from config.json)")
    run.add_argument("--attn-implementation", default="eager")
    run.add_argument("--data-path", action="append", metavar="TASK=PATH", help="local copy of a task's dataset")
    run.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL for math answer extraction")
    run.add_argument("--judge-model", default="gpt-4o-mini")
    run.add_argument("--exact-match-style", choices=["fork", "upstream"], default="fork")
    run.add_argument("--save-predictions", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="Markdown table + PNG plot comparing results files")
    report.add_argument("results", nargs="+")
    report.add_argument("--out", required=True)
    report.set_defaults(func=cmd_report)

    tasks = sub.add_parser("tasks", help="list tasks")
    tasks.set_defaults(func=cmd_tasks)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from eval_suite.adapters.base import AdapterError
    from eval_suite.results import ResultsError
    from eval_suite.tasks.base import TaskError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, AdapterError, ResultsError, TaskError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
