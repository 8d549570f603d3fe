import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def toy_data():
    """A tiny seeded labelled set: 96 samples of 12 features, 4 classes, a little structure."""
    from distillery.data import TensorData

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    y = (x[:, :4].argmax(1)).long()
    return TensorData(x, y, torch.arange(96), 4, "toy")


@pytest.fixture(autouse=True, scope="session")
def _hermetic_cache(tmp_path_factory):
    """Generated data sets are cached in a folder of this test session, not in the home folder."""
    import os

    os.environ["DISTILLERY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def _no_runs_in_the_working_folder():
    """Tests write their runs under tmp paths (runs_dir=...): a test that leaves ./runs/ behind (a run
    index in the checkout) is an error at the end of the session."""
    from pathlib import Path

    runs = Path.cwd() / "runs"
    existed = runs.exists()
    yield
    assert existed or not runs.exists(), "a test wrote ./runs in the working folder; give it runs_dir=<tmp>"
