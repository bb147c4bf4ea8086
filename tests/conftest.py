import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory):
    """A tiny Qwen2 base and three full-rank perturbed experts."""
    from mergekit_mllm.testing import build_family

    return build_family(tmp_path_factory.mktemp("qwen2_family"))
