"""Data tests write nothing outside pytest's temporary directories and print no progress bars."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    import datasets

    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = cache
    datasets.disable_progress_bars()
    yield cache
    datasets.config.HF_DATASETS_CACHE = old
    datasets.enable_progress_bars()
