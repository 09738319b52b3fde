"""Shared test setup: offline data root, no downloads, quiet local Ray."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OODLAB_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("OODLAB_DOWNLOAD", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if not (Path(os.environ["OODLAB_DATA_DIR"]) / "FashionMNIST" / "raw").is_dir():
    raise RuntimeError(
        f"offline data not found at OODLAB_DATA_DIR={os.environ['OODLAB_DATA_DIR']}; "
        "point it at a folder with the torchvision layout (e.g. ../shared/data)"
    )
