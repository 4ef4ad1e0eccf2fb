"""Test set-up: 8 CPU devices, strict rank promotion, the shared data directory.

XLA_FLAGS must be set before jax initialises its CPU backend, so this runs at collection time,
before any test module imports jax.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
_default_data = Path(__file__).resolve().parents[2] / "shared" / "data"
if "RESEARCH_DATA_DIR" not in os.environ and _default_data.is_dir():
  os.environ["RESEARCH_DATA_DIR"] = str(_default_data)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def root(tmp_path, monkeypatch):
  """An empty experiments directory that research.experiments reads instead of the repo's."""
  path = tmp_path / "experiments"
  path.mkdir()
  monkeypatch.setenv("RESEARCH_EXPERIMENTS_DIR", str(path))
  return path


def pytest_collection_modifyitems(config, items):
  del config
  if os.environ.get("RESEARCH_DATA_DIR"):
    return
  skip = pytest.mark.skip(reason="needs RESEARCH_DATA_DIR (the corpora directory)")
  for item in items:
    if "needs_data" in item.keywords:
      item.add_marker(skip)
