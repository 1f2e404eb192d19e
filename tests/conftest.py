import pytest
import torch

from pipelines import tiny_pipeline


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where the test pipelines run: cpu (default) or cuda (python -m pytest --device cuda)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda was given but CUDA is not available on this machine", returncode=4)
    return torch.device(name)


@pytest.fixture(scope="session")
def pipe(device):
    return tiny_pipeline().to(device)
