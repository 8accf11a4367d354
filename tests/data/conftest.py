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


@pytest.fixture(scope="session", autouse=True)
def _fixed_date():
    """Templates that write today's date (strftime_now: Llama 3.x, Apertus, Mistral Small, Solar Open)
    render one date for the whole session: a run that crosses midnight must not compare two dates."""
    from datetime import datetime

    from transformers.utils import chat_template_utils

    class Fixed(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 7, 26, 12, 0, 0, tzinfo=tz)

    old = chat_template_utils.datetime
    chat_template_utils.datetime = Fixed
    yield
    chat_template_utils.datetime = old
