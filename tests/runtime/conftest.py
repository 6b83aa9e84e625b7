"""Shared fixtures for runtime tests: the synthetic tokenizer and its token layout (built once per module)."""
import pytest

from edgeact.export.tokenizer_build import build_tokenizer
from edgeact.runtime.token_layout import TokenLayout


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def layout(tok):
    return TokenLayout.from_tokenizer(tok)
