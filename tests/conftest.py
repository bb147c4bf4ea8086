import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The fused kernels' tests compile dozens of kernel variants (experts, dtypes, DARE on/off): with
# torch.compile (``jit``) each takes a few seconds, as an ahead-of-time package (``aot``, the
# default) ≈10 s. The suite runs them with ``jit``; the tests marked for ``aot`` (test_fused.py,
# test_e2e_install.py) set it themselves, as does anyone running the suite with the variable set.
os.environ.setdefault("MERGEKIT_MLLM_COMPILE_BACKEND", "jit")


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory):
    """A tiny Qwen2 base and three full-rank perturbed experts."""
    from mergekit_mllm.testing import build_family

    return build_family(tmp_path_factory.mktemp("qwen2_family"))


class FreshEnv:
    """A virtual environment with only our wheel installed in it.

    Its dependencies (torch, mergekit, transformers, …) are borrowed read-only
    from the test interpreter's site-packages through a path line appended
    *after* the venv's own site-packages; .pth files there are not executed, so
    the import hook that runs is the one the wheel installed.
    """

    def __init__(self, root, wheel):
        import subprocess
        import sysconfig
        import venv

        self.root = root
        venv.EnvBuilder(with_pip=False).create(root)
        self.python = str(root / "bin" / "python")
        site = subprocess.check_output(
            [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
        self.site_packages = Path(site)
        # Install before borrowing: otherwise pip sees the test environment's own
        # mergekit-mllm of the same version and installs nothing.
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", self.python, "install", "-q", "--no-deps",
             "--ignore-installed", str(wheel)],
            check=True,
        )
        (self.site_packages / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        installed = sorted(p.name for p in self.site_packages.iterdir())
        assert "mergekit_mllm.pth" in installed and "_mergekit_mllm_hook.py" in installed, installed
        self.scripts = Path(sysconfig.get_paths()["scripts"])

    def run(self, args, **kwargs):
        """Run a Python snippet or a console script of the test environment with this interpreter."""
        import subprocess

        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 600)
        # Never from the repository root: '' on sys.path would import the source tree.
        kwargs.setdefault("cwd", str(self.root))
        return subprocess.run([self.python] + list(args), **kwargs)

    def script(self, name):
        """Path of a stock console script (e.g. mergekit-yaml) to run with this interpreter."""
        return str(self.scripts / name)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    import subprocess

    out = tmp_path_factory.mktemp("wheel")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(repo)],
        check=True,
    )
    (wheel_path,) = out.glob("mergekit_mllm-*.whl")
    return wheel_path


@pytest.fixture(scope="session")
def fresh_env(tmp_path_factory, wheel):
    return FreshEnv(tmp_path_factory.mktemp("fresh") / "venv", wheel)
