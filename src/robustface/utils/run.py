"""Run directories: every run records its resolved config, seed, versions and git revision."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import robustface
from robustface.config import save_config
from robustface.utils.io import write_text_atomic


def git_revision(path: str | Path | None = None) -> str | None:
    """The git commit of the checkout containing ``path`` (default: the package), or None."""
    where = Path(path) if path is not None else Path(robustface.__file__).parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(seed: int) -> dict[str, Any]:
    """Versions, git revision, command line and time of the current process."""
    return {
        "robustface": robustface.__version__,
        "git_revision": git_revision(),
        "seed": seed,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "argv": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_run_dir(output_dir: str | Path, cfg: Any, seed: int) -> Path:
    """Create ``output_dir`` and write ``config.yaml`` (resolved) and ``meta.json`` into it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_text_atomic(out / "meta.json", json.dumps(run_metadata(seed), indent=2) + "\n")
    return out
