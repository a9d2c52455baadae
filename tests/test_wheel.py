"""The built wheel (what `pip install .`, `pip install git+URL` or a packaged environment
installs) holds every module and data file, and its console script trains.

An editable install reads the source tree and hides a package that the build leaves out
(lsp_jax/train once had no __init__.py, so `find_packages` skipped it).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
BUILD_LEFTOVERS = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "runs", ".ruff_cache"
)


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Builds the wheel from a clean copy of the tree (an in-tree build/ folder could
    carry modules that no longer exist)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=BUILD_LEFTOVERS)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp), str(source)])
    (path,) = tmp.glob("lsp_jax-*.whl")
    return path


def _source_files():
    package = ROOT / "lsp_jax"
    files = [p for p in package.rglob("*.py") if "__pycache__" not in p.parts]
    files += [p for p in (package / "data").iterdir() if p.is_file() and p.suffix != ".py"]
    return sorted(p.relative_to(ROOT).as_posix() for p in files)


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _source_files() if f not in names]
    assert not missing, f"the wheel leaves out {missing}"
    packages = {p.parent.relative_to(ROOT) for p in (ROOT / "lsp_jax").rglob("*.py")}
    no_init = [str(p) for p in packages if not (ROOT / p / "__init__.py").exists()]
    assert not no_init, f"folders without __init__.py (find_packages skips them): {no_init}"


def test_console_script_of_the_installed_wheel_trains(wheel, tmp_path):
    """Installs the wheel alone into a new venv whose dependencies come from this one
    (a .pth line), then runs `lsp-jax train` for one iteration of the tiny config."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    site = pathlib.Path(purelib.stdout.strip())
    # Appended after the venv's own site-packages: the wheel's lsp_jax comes first, and
    # this venv's editable-install hook (a .pth in a folder that is not a site dir) is off.
    dependencies = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "deps.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
        + ["--ignore-installed", str(wheel)]
    )
    # A PYTHONPATH naming the checkout (as in `PYTHONPATH=. pytest`) would shadow the wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(  # Not from the checkout: `python -c` puts the working directory first.
        [str(python), "-c", "import lsp_jax.train.loop as m; print(m.__file__)"],
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout
    env["JAX_PLATFORMS"] = "cpu"
    env["LSP_JAX_COMPILATION_CACHE"] = jax.config.jax_compilation_cache_dir or "0"
    workdir = tmp_path / "run"
    train = [str(venv / "bin" / "lsp-jax"), "train", "--config", TINY, "--workdir", str(workdir)]
    out = _run(train + ["--config.train.num_steps=1"], env=env, cwd=str(tmp_path))
    assert "Done: 1 iterations" in out.stdout + out.stderr
