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


# With pytest-xdist (`make test`: -n 2 --dist loadfile) each worker takes whole files in collection order. The files
# that take longest go first, so neither worker ends its share minutes after the other (largest-first scheduling);
# the order does not change what any test does. The order follows a fresh-clone run of `make test` on the 2-core
# machine at 870e55d (test_real_path about 270 s under xdist; the next five files 70-140 s each).
SLOW_FIRST = (
    'test_real_path.py',
    'test_reproduce.py',
    'test_reliability.py',
    'test_train_multi.py',
    'test_ddp.py',
    'test_checkpoints.py',
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file


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
