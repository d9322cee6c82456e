"""pytest configuration shared by all tests."""

import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('ABAW_NB_PROGRESS', '0')  # no progress bars in test logs
os.environ.setdefault('MPLBACKEND', 'Agg')


@pytest.fixture(scope='session')
def root() -> Path:
    "The checkout under test."
    return ROOT


@pytest.fixture(scope='session')
def venv_bin() -> Path:
    "Folder of the interpreter running the tests (the .venv's bin/ under `make test`)."
    return Path(sys.executable).parent


def pytest_configure(config):
    # `make test` runs `pytest -m "not browser"` (deselected, not skipped); `make test-browser` runs `-m browser`
    config.addinivalue_line('markers', 'browser: needs JupyterLab + headless Chromium (make test-browser)')


@pytest.fixture(autouse=True)
def _drop_checkpoints(request):
    """A test's checkpoints (*.pt, 1-300 MB each) are deleted when it ends, so the suite needs little disk (CI disks
    can be small); its tables and logs stay for a failure to be read."""
    tmp = (
        request.getfixturevalue('tmp_path') if 'tmp_path' in request.fixturenames else None
    )  # set up before the test, torn down after us
    yield
    if tmp is not None:
        for p in tmp.rglob('*.pt'):
            p.unlink(missing_ok=True)
