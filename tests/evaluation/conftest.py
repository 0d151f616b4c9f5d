"""Fixtures for the evaluation tests: random Inception weights (no downloads) and a tiny stand-in tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# palette.py is imported by the tests and by the child processes of the distributed tests alike.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from palette import PaletteTokenizer  # noqa: E402


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    from tokscale.evaluation.inception import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0)


@pytest.fixture
def palette_tokenizer():
    return PaletteTokenizer()
