"""Shared test set-up: an offline download cache seeded from ../shared/data.

The project's code downloads its files into one cache folder ($LLM_CACHE_DIR). Tests point that
variable at a temporary folder holding copies of the exact files the code would download, so every
stage runs offline. Only tests and .ci/run know about ../shared.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

# (file under ../shared/data, path under the project's cache) -- the cache layout of tokenizer.py
SEED_FILES = [
    ("gpt2/encoder.json", "gpt2/encoder.json"),
    ("gpt2/vocab.bpe", "gpt2/vocab.bpe"),
    ("text/tinyshakespeare.txt", "text/tinyshakespeare.txt"),
    ("text/the-verdict.txt", "text/the-verdict.txt"),
    ("sms_spam/SMSSpamCollection", "sms_spam/SMSSpamCollection"),
    ("instruct/instruction-data.json", "instruct/instruction-data.json"),
    ("mistral/tokenizer.model", "hf/mistralai/Mistral-7B-v0.1/tokenizer.model"),
]


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory) -> Path:
    """Set LLM_CACHE_DIR to a fresh folder seeded with the shared data files, for the whole session.

    Without ../shared/data (a clone used elsewhere), the tests use the normal download cache, which
    fetches the same files once over the network."""
    if not SHARED_DATA.is_dir():
        yield None
        return
    cache = tmp_path_factory.mktemp("llm_cache")
    for source, target in SEED_FILES:
        (cache / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_DATA / source, cache / target)
    old = os.environ.get("LLM_CACHE_DIR")
    os.environ["LLM_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LLM_CACHE_DIR", None)
    else:
        os.environ["LLM_CACHE_DIR"] = old
