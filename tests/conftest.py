"""Shared test setup.

Triton kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1): slow but
exact, which is how CPU CI checks every kernel. It must be set before triton is imported.
"""

import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared sits beside the checkout on developer machines and in CI. It is never copied
# into the project; tests that need it skip with a visible reason when it is absent.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: real-data checks need ../shared/data beside the repo")
    return SHARED_DATA


@pytest.fixture(scope="module")
def torch_backend():
    """For modules that train or score as train.py does on a CPU (the torch path, not Triton's
    interpreter, which the kernel tests turn on above). Module scope, so that the module-scoped
    runs of those modules see it too; a module opts in with
    `pytestmark = pytest.mark.usefixtures("torch_backend")`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        yield

