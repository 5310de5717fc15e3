import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("SAFEUNITS_DATA_DIR") or SHARED_DATA)
    if not path.is_dir():
        pytest.skip(f"offline data folder {path} not present")
    return path


@pytest.fixture()
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture()
def model():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    from safeunits.models.loading import load_model

    return load_model("smollm2-135m-instruct")
