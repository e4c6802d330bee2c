"""Shared test set-up: 8 fake CPU devices (for the sharding tests), golden-data paths, error metrics."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def golden_dir() -> pathlib.Path:
    """The reference golden vectors: $GKA_GOLDEN_DIR, else ../shared/golden beside the repository."""
    path = pathlib.Path(os.environ.get("GKA_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
    if not path.is_dir():
        raise RuntimeError(f"golden vectors not found at {path}; set GKA_GOLDEN_DIR")
    return path


def fixtures_dir() -> pathlib.Path:
    """Shared test data (chat template): $GKA_FIXTURES_DIR, else ../shared/fixtures beside the repository."""
    path = pathlib.Path(os.environ.get("GKA_FIXTURES_DIR", REPO.parent / "shared" / "fixtures"))
    if not path.is_dir():
        raise RuntimeError(f"test fixtures not found at {path}; set GKA_FIXTURES_DIR")
    return path


@pytest.fixture(scope="session")
def golden():
    return golden_dir()


def load_case(name: str):
    folder = golden_dir() / name
    arrays = np.load(folder / f"{name}.npz") if (folder / f"{name}.npz").exists() else np.load(folder / "golden.npz")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    return arrays, manifest


def rel(a, b) -> float:
    """Relative Frobenius error ||a - b|| / ||b||."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "non-finite values"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
