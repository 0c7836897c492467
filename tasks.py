#!/usr/bin/env python3
"""Set-up and entry points. Needs only python3: the first call builds .venv from pyproject.toml.

    python3 tasks.py demo      # generate data, run the whole pipeline on embedded defaults, summarize
    python3 tasks.py test      # the test suite (what CI runs, on three workers); installs Chromium via apt when missing
    python3 tasks.py ui        # the Dagster UI on http://127.0.0.1:3000
    python3 tasks.py bench ... # the scale benchmark (bench/run_pipeline.py)
    python3 tasks.py online-retail <online+retail.zip> [--out DIR]  # UCI's download, one CSV per day (README: Data)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".installed"
INSTALL_INPUTS = [ROOT / "pyproject.toml", ROOT / "constraints.txt"]
# The UI test (tests/test_ui.py) drives Debian's Chromium through Debian's chromedriver: nothing to download.
BROWSER_FILES = [Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")]
BROWSER_PACKAGES = ["chromium", "chromium-driver"]


def _install_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in INSTALL_INPUTS:
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()


VENV_DISK_BYTES = 4 * 10**9  # .venv is about 2.6 GB (torch, pyspark, ray), pip unpacks beside it


def warn_if_disk_is_short(needed: int) -> None:
    """Say so before pip fails half-way with "[Errno 28] No space left on device"."""
    free = shutil.disk_usage(ROOT).free
    if free < needed:
        print(f"warning: {free / 1e9:.1f} GB free on the disk of {ROOT}; installing needs about "
              f"{needed / 1e9:.0f} GB (benchmark workdirs under data/bench take 5.5 GB each at 2M customers)",
              file=sys.stderr, flush=True)


def ensure_venv() -> None:
    """Create .venv and install the project, once per change of its dependency files."""
    if STAMP.exists() and STAMP.read_text() == _install_fingerprint():
        return
    if not PY.exists():
        print("creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    constraints = ["-c", str(ROOT / "constraints.txt")] if (ROOT / "constraints.txt").exists() else []
    print("installing dependencies (first run takes a minute or two)", flush=True)
    warn_if_disk_is_short(VENV_DISK_BYTES)
    subprocess.run([*pip, *constraints, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(_install_fingerprint())


def ensure_browser() -> None:
    """Install Chromium and chromedriver with apt when missing (root only). Without them the UI
    test skips, or fails under CI=true, so a missing browser never passes unnoticed."""
    missing = [str(path) for path in BROWSER_FILES if not path.exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"{', '.join(missing)} missing and this is not root with apt-get: the UI test will skip "
              f"(install them with: apt-get install {' '.join(BROWSER_PACKAGES)})", flush=True)
        return
    print(f"{', '.join(missing)} missing: installing {' '.join(BROWSER_PACKAGES)} with apt-get", flush=True)
    started = time.monotonic()
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *BROWSER_PACKAGES]):
        print("+", " ".join(command), flush=True)
        if subprocess.run(command, check=False, env=apt_env).returncode != 0:
            print(f"'{' '.join(command)}' failed: the UI test will skip (fail under CI=true)", flush=True)
            return
    print(f"installed {' '.join(BROWSER_PACKAGES)} in {time.monotonic() - started:.0f} s", flush=True)


def project_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DAGSTER_HOME", str(ROOT / ".dagster_home"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return env


def run(*args: str) -> int:
    return subprocess.run([str(PY), *args], cwd=ROOT, env=project_env()).returncode


def test_workers(args: list[str]) -> list[str]:
    """Three pytest-xdist workers unless the arguments choose (`-n 0`: one process). Most of the
    slow tests wait on a daemon, a browser or a cron minute, so more workers than cores overlap
    the waits (CI on 2 cores: 12 min instead of 17 with two; a third saved 1-1.5 min more on
    2026-12-07). A test file stays on one worker, so module fixtures run once."""
    if any(a.startswith(("-n", "--numprocesses")) or a.endswith("no:xdist") for a in args):
        return []
    return ["-n", os.environ.get("TEST_WORKERS", "3"), "--dist", "loadfile"]


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    ensure_venv()
    if command == "setup":
        ensure_browser()
        return 0
    if command == "demo":
        return run("-m", "bench.demo", *rest)
    if command == "test":
        ensure_browser()
        return run("-m", "pytest", *test_workers(rest), *rest)
    if command == "ui":
        # Historical data (the demo's): the partitions end on the last landed day.
        os.environ.setdefault("PIPELINE_LAST_DAY", "landing")
        return run("-m", "dagster", "dev", "-h", "127.0.0.1", "-p", "3000", *rest)
    if command == "bench":
        return run("-m", "bench.run_pipeline", *rest)
    if command == "online-retail":
        return run("-m", "bench.online_retail_days", *rest)
    print(f"unknown command {command!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
