"""``python -m benchmarks {kernels,merge,scores,report,all} [--device cpu|cuda] [--quick]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("section", choices=["kernels", "merge", "scores", "report", "all"])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and checkpoints (a smoke run, minutes)")
    parser.add_argument("--workdir", type=Path, default=None, help="where synthetic checkpoints go (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=None, help="RESULTS.md path (default: benchmarks/RESULTS.md)")
    parser.add_argument(
        "--experts", type=str, default=None, help="comma-separated N for the kernel sweep (default: 2..8; on a CPU 2,5,8 for the shapes of over 4 M entries, all but 512x3584)"
    )
    parser.add_argument(
        "--shapes", type=str, default=None,
        help="kernels: comma-separated shapes to measure, as ROWSxCOLS (e.g. 3584x3584); default: all four",
    )
    parser.add_argument(
        "--methods", type=str, default=None,
        help="merge: comma-separated methods; only the default runs of these (on the streaming checkpoint unless --matrix)",
    )
    parser.add_argument("--wide", action="store_true",
                        help="merge: element-wise methods vs task_arithmetic on two Qwen2-VL-7B-shaped layers "
                             "(saved as merge_<device>_qwen2vl7b_layers.json)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="merge: measure every run this many times, in rounds (the report keeps each run's "
                             "fastest time and largest peak RSS; a shared machine's noise is seconds)")
    parser.add_argument("--matrix", action="store_true", help="merge --methods: include the matrix-checkpoint runs")
    parser.add_argument("--elementwise-only", action="store_true",
                        help="kernels: re-time only the element-wise methods of the saved entries")
    parser.add_argument("--resume", action="store_true", help="kernels: keep saved entries, measure the missing ones")
    parser.add_argument("--no-report", action="store_true", help="only measure and save JSON")
    args = parser.parse_args(argv)
    device = _device(args.device)

    if args.section in ("kernels", "all"):
        from benchmarks import kernels

        plan = None
        if args.experts or args.shapes:
            try:
                counts = [int(x) for x in args.experts.split(",")] if args.experts else None
            except ValueError:
                parser.error(f"--experts: {args.experts!r} is not a comma-separated list of integers")
            try:
                plan = kernels.select_plan(device, experts=counts, shapes=args.shapes.split(",") if args.shapes else None)
            except ValueError as error:
                parser.error(str(error))
        if args.elementwise_only:
            kernels.remeasure_elementwise(device)
        else:
            kernels.run(device, quick=args.quick, plan=plan, resume=args.resume)
    if args.section in ("merge", "all"):
        from benchmarks import whole_merge

        runs = None
        if args.methods:
            wanted = args.methods.split(",")
            runs = [
                r for r in whole_merge.default_runs(args.quick)
                if r.method in wanted and (args.matrix or r.checkpoint.name == whole_merge.default_runs(args.quick)[0].checkpoint.name)
                and r.out_shard_size == whole_merge.default_runs(args.quick)[0].out_shard_size
            ]
        if args.wide:
            whole_merge.run(device, workdir=args.workdir, runs=whole_merge.wide_runs(),
                            save_as=f"merge_{device.type}_qwen2vl7b_layers", repeat=args.repeat)
        else:
            whole_merge.run(device, quick=args.quick, workdir=args.workdir, runs=runs, repeat=args.repeat)
    if args.section in ("scores", "all"):
        from benchmarks import scores

        scores.run(device, quick=args.quick, workdir=args.workdir)
    if not args.no_report:
        from benchmarks import report

        path = report.write(output=args.output, include_quick=args.quick)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
