"""Pure tensor math for the paper's merging methods (no mergekit imports).

Every function takes stacked task vectors ``task_vectors`` of shape
``(N, *weight_shape)`` (already scaled by per-model weights, in the compute
dtype) and returns the merged task vector ``τ_m`` of shape ``weight_shape``;
the caller forms ``base + λ·τ_m``. Methods are composed from named steps:
trim / elect / disjoint-merge (TIES), drop-and-rescale (DARE), low-rank
truncation and polar orthogonalisation (TSV, Iso), and the interference
objective optimised by WUDI and OptMerge, and its closed-form solutions
(exact minimiser, SWUDI, ASWUDI).
"""

from mergekit_mllm.ops.closed_form import (
    adaptive_rank,
    aswudi,
    interference_minimiser,
    optmerge_exact,
    swudi,
    wudi_exact,
)
from mergekit_mllm.ops.elementwise import (
    dare_drop,
    dare_task_arithmetic,
    dare_ties_merging,
    disjoint_mean,
    elect_sign,
    ties_merging,
    trim_top_magnitude,
    weight_average,
)
from mergekit_mllm.ops.interference import (
    InterferenceProblem,
    InterferenceSpectrum,
    interference_spectrum,
    momentum_coefficients,
    optmerge,
    optmerge_problem,
    reference_interference_descent,
    run_interference_descent,
    wudi,
    wudi_problem,
)
from mergekit_mllm.ops.spectral import (
    iso_c,
    iso_cts,
    polar_factor,
    truncated_svd,
    tsv,
)

__all__ = [
    "InterferenceProblem",
    "InterferenceSpectrum",
    "adaptive_rank",
    "aswudi",
    "interference_minimiser",
    "interference_spectrum",
    "momentum_coefficients",
    "optmerge_exact",
    "swudi",
    "wudi_exact",
    "dare_drop",
    "dare_task_arithmetic",
    "dare_ties_merging",
    "disjoint_mean",
    "elect_sign",
    "iso_c",
    "iso_cts",
    "optmerge",
    "optmerge_problem",
    "polar_factor",
    "reference_interference_descent",
    "run_interference_descent",
    "ties_merging",
    "trim_top_magnitude",
    "truncated_svd",
    "tsv",
    "weight_average",
    "wudi",
    "wudi_problem",
]
