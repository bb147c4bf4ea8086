"""Per-task and per-question-type scores of a synthetic family's base, experts and a few merges.

``python -m eval_suite.synth.probe FAMILY_DIR [--limit 200] [--split val] [--models base,vqa,…]
[--merges task_arithmetic:0.3,weight_average:1] [--scale geometry]`` — the design probe behind the last section of
``eval_suite/SYNTH_RESULTS.md`` (merges in memory, as ``synth study`` does).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from eval_suite.runner import evaluate_task
from eval_suite.synth.family import EXPERTS, family_paths
from eval_suite.synth.study import METHODS, SYNTH_TASK_NAMES, FamilyEvaluator, load_state, merge
from eval_suite.synth.tasks import eval_items
from eval_suite.tasks import make_task


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval_suite.synth.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", type=Path, help="a family folder built by `python -m eval_suite synth build`")
    parser.add_argument("--limit", type=int, default=200, help="items per task (default 200)")
    parser.add_argument("--merges", default="task_arithmetic:0.3,task_arithmetic:0.5,task_arithmetic:1.0,weight_average:1",
                        help="comma-separated METHOD:LAMBDA merges to score")
    parser.add_argument("--models", default="base," + ",".join(EXPERTS), help="comma-separated: base and/or experts")
    parser.add_argument("--split", default="val")
    parser.add_argument("--scale", default=None, metavar="EXPERT",
                        help="also score base + α·τ_EXPERT on the expert's own task for α in --alphas")
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1,1.25")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while probing (default 1)")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Arguments, checked before anything is loaded: a typo fails at once, naming the value."""
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m != "base" and m not in EXPERTS]
    if unknown:
        parser.error(f"--models: unknown model(s) {', '.join(unknown)}; known: base, {', '.join(EXPERTS)}")
    merges = []
    for spec in (s for s in args.merges.split(",") if s):
        method, _, lam = spec.partition(":")
        try:
            merges.append((spec, method, float(lam)))
        except ValueError:
            parser.error(f"--merges: {spec!r} is not METHOD:LAMBDA (e.g. task_arithmetic:0.3)")
        if method not in METHODS:
            parser.error(f"--merges: unknown method {method!r}; known: {', '.join(METHODS)}")
    if args.scale is not None and args.scale not in EXPERTS:
        parser.error(f"--scale: unknown expert {args.scale!r}; known: {', '.join(EXPERTS)}")
    try:
        alphas = [float(x) for x in args.alphas.split(",") if x]
    except ValueError:
        parser.error(f"--alphas: {args.alphas!r} is not a comma-separated list of numbers")
    if args.limit < 1 or args.threads < 1:
        parser.error("--limit and --threads must be at least 1")
    paths = family_paths(args.family)
    missing = [f"{name} ({path})" for name, path in paths.items() if not Path(path).is_dir()]
    if missing:
        parser.error(f"{args.family}: not a built family, missing {', '.join(missing)}")
    args.models, args.merges, args.alphas, args.paths = models, merges, alphas, paths
    return args


def probe(args: argparse.Namespace, scratch: Path, emit: Callable[[str], None] = print) -> Dict[str, Dict[str, float]]:
    """Score every requested model and merge; returns {name: {task: score}} and prints a line per
    candidate plus its per-question-type scores."""
    paths = args.paths
    evaluator = FamilyEvaluator(paths["base"])
    types = {t: {item.id: item.question_type for item in eval_items(t, args.split, args.limit)}
             for t in SYNTH_TASK_NAMES}
    scores: Dict[str, Dict[str, float]] = {}

    def run(name: str, state: Dict[str, torch.Tensor]) -> None:
        evaluator.model.load_state_dict(state, strict=False)
        out, per_type = {}, {}
        for task in SYNTH_TASK_NAMES:
            predictions = scratch / f"{task}.jsonl"
            result = evaluate_task(evaluator.adapter, make_task(task, split=args.split), limit=args.limit,
                                   predictions_path=predictions)
            out[task] = result["score"]
            by_type = collections.defaultdict(list)
            for line in predictions.read_text().splitlines():
                record = json.loads(line)
                by_type[types[task][record["id"]]].append(record["score"])
            per_type[task] = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(by_type.items())}
        average = sum(out.values()) / len(out)
        emit(f"{name:22s} " + " ".join(f"{t[6:]}={out[t]:.1f}" for t in SYNTH_TASK_NAMES) + f"  avg={average:.2f}")
        emit("    " + " | ".join(f"{t[6:]}:" + ",".join(f"{k}={v}" for k, v in per_type[t].items())
                                 for t in SYNTH_TASK_NAMES))
        scores[name] = out

    base = load_state(paths["base"])
    experts = {name: load_state(paths[name]) for name in EXPERTS}
    for name in args.models:
        run(name, base if name == "base" else experts[name])
    for spec, method, lam in args.merges:
        run(spec, merge(method, lam, base, experts))
    if args.scale:
        from eval_suite.synth.tasks import CAPABILITIES

        own, expert = CAPABILITIES[args.scale], experts[args.scale]
        for alpha in args.alphas:
            state = {k: base[k] + alpha * (expert[k] - base[k]) if base[k].is_floating_point() else base[k]
                     for k in base}
            evaluator.model.load_state_dict(state, strict=False)
            score = evaluate_task(evaluator.adapter, make_task(own, split=args.split), limit=args.limit)["score"]
            emit(f"base + {alpha:g}·τ_{args.scale}: {own} = {score:.1f}")
            scores[f"base+{alpha:g}*tau_{args.scale}"] = {own: score}
    return scores


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(_parser(), argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="synth-probe-") as scratch:
            probe(args, Path(scratch), emit=lambda line: print(line, flush=True))
    finally:
        torch.set_num_threads(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
