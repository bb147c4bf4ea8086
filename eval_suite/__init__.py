"""eval_suite: the paper's benchmarks with faithful scorers, and an offline synthetic benchmark.

``python -m eval_suite --help`` for the command line; :func:`eval_suite.results.load_results`
reads a results file.
"""

__version__ = "0.1.0"
