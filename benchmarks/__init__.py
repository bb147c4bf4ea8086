"""Benchmarks of mergekit-mllm's kernels and whole merges (issue 8).

``python -m benchmarks all`` measures, in one process and one run:

* ``kernels``: time per weight matrix at Qwen2-VL-7B shapes with N experts,
  our kernels side by side with the straightforward autograd formulation the
  authors run and with mergekit's ``task_arithmetic``;
* ``merge``: whole merges of a synthetic multi-layer checkpoint with stock
  ``mergekit-yaml`` (one subprocess per method), time and peak RSS;
* ``scores``: merged-model scores from ``eval_suite`` (when it is installed),

and writes ``benchmarks/RESULTS.md`` with tables and PNG plots. Each section
also runs alone (``python -m benchmarks kernels``), saving JSON under
``benchmarks/results/``; ``python -m benchmarks report`` re-renders the
document from every saved JSON (CPU and CUDA runs side by side).
"""
