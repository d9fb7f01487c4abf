"""Shared fixtures (helpers are in _helpers.py): the reference material beside the checkout
and a session-wide shapes-world corpus."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tools/, examples/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _helpers
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from _helpers import SHARED, make_shapes_corpus  # noqa: E402


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference material not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def shapes_corpus(tmp_path_factory) -> dict:
    return make_shapes_corpus(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def colour_model(tmp_path_factory):
    """(checkpoint dir, its data) of a tiny model trained to name a shape's colour, in images
    (chat format) and videos (raw captions): tests/_eval_fixture.py. Trained once per session
    (~30-60 s) and shared by the evaluation, lmms-eval and serving tests. Development:
    COLOUR_MODEL_ROOT=DIR keeps it between runs (reused when present)."""
    import os

    from _eval_fixture import train_colour_checkpoint

    keep = os.environ.get("COLOUR_MODEL_ROOT")
    return train_colour_checkpoint(Path(keep) if keep else tmp_path_factory.mktemp("colour_model"))
