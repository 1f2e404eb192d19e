import pytest

from pipelines import tiny_pipeline


@pytest.fixture(scope="session")
def pipe():
    return tiny_pipeline()
