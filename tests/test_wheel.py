"""The sdist and the wheel built from this checkout work once installed, away from the checkout.

``python -m build --no-isolation`` (this environment's setuptools: no download) builds the sdist from a copy of the
checkout's files, then the wheel from the sdist, as a release does. The wheel goes into a fresh target directory
(``pip install --no-deps --target``: the dependencies are this environment's) and the commands run from there, with
the working directory outside the checkout, the target first on ``sys.path`` and the package imported from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

import lightning_startwell

PROFILES = sorted(p.name for p in (REPO / "lightning_startwell" / "study" / "profiles").glob("*.yaml"))


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def _copy_checkout(target: Path) -> None:
    """The files git tracks or would track (not the ignored build outputs, caches and virtual environment)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
        check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())


@pytest.mark.slow
def test_wheel_and_sdist_install_and_run_outside_the_checkout(tmp_path):
    source, dist, site, elsewhere = (tmp_path / d for d in ("source", "dist", "site", "elsewhere"))
    elsewhere.mkdir()
    _copy_checkout(source)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)], cwd=tmp_path)
    version = lightning_startwell.__version__
    (wheel,) = dist.glob(f"lightning_startwell-{version}-py3-none-any.whl")
    (sdist,) = dist.glob(f"lightning_startwell-{version}.tar.gz")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"lightning_startwell-{version}.dist-info/entry_points.txt").decode()
        metadata = archive.read(f"lightning_startwell-{version}.dist-info/METADATA").decode()
    assert "lightning_startwell/py.typed" in names
    assert PROFILES and {f"lightning_startwell/study/profiles/{p}" for p in PROFILES} <= names
    assert "startwell = lightning_startwell.cli:main" in entry_points
    assert f"Version: {version}" in metadata and "Requires-Python: >=3.10" in metadata
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/", "examples/")) for n in names)
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "lightning_startwell/py.typed"} <= members
    assert {f"lightning_startwell/study/profiles/{p}" for p in PROFILES} <= members

    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
         cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    # One process for the import, the versions and the profiles (each process pays for importing torch and Lightning).
    probe = (
        "import importlib.metadata, sys; import lightning_startwell as p; from lightning_startwell.study import cli;"
        " print(p.__file__, p.__version__, importlib.metadata.version('lightning-startwell'));"
        " [cli.main(['plan', '--profile', name]) for name in sys.argv[1:]]"  # reads the installed profile YAML
    )
    profiles = [p.removesuffix(".yaml") for p in PROFILES]
    lines = _run([sys.executable, "-c", probe, *profiles], cwd=elsewhere, env=env).stdout.splitlines()
    file, *versions = lines[0].split()
    assert Path(file).is_relative_to(site), f"imported from {file}, not from the installed wheel"
    assert versions == [version, version]
    assert len([line for line in lines if " runs, " in line]) == len(profiles), lines

    script = site / "bin" / "startwell"
    assert script.is_file(), f"pip made no `startwell` script: {sorted(p.name for p in site.iterdir())}"
    assert "fit" in _run([str(script), "--help"], cwd=elsewhere, env=env).stdout
    assert "run" in _run([sys.executable, "-m", "lightning_startwell.study", "--help"], cwd=elsewhere, env=env).stdout
