"""mergekit-mllm: merge multimodal LLM experts with stock mergekit.

Importing this package is cheap; the merge methods are registered with mergekit
by the import hook (``_mergekit_mllm_hook``) or explicitly with
:func:`mergekit_mllm.install`.
"""

__version__ = "0.1.0"

PAPER_URL = "https://arxiv.org/abs/2505.19892"


def install() -> None:
    """Register every mergekit-mllm extension with mergekit (idempotent)."""
    from mergekit_mllm._plugin import install as _install

    _install()


__all__ = ["__version__", "install", "PAPER_URL"]
