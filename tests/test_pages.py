"""llama_vision.utils.pages: a copied memory-mapped tensor's pages go back to the kernel
(RSS drops) and its values stay readable and correct (performance issue #7)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from llama_vision.utils.pages import copy_releasing, release_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) and /proc")


def _rss_file_mib() -> float:
    """Resident file-backed pages of this process (MiB)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssFile in /proc/self/status")


@pytest.fixture
def mapped(tmp_path):
    gen = torch.Generator().manual_seed(0)
    want = {"big": torch.randn(16384, 1024, generator=gen), "small": torch.randn(7, generator=gen)}  # 64 MiB
    torch.save(want, tmp_path / "w.pt")
    # Written back to disk first: dirty page-cache pages cannot be dropped on the spot
    # (a checkpoint being loaded was normally written long before).
    fd = os.open(tmp_path / "w.pt", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return want, torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)


def test_copy_releasing_copies_and_gives_the_pages_back(mapped):
    want, sd = mapped
    src = sd["big"]
    before = _rss_file_mib()
    dst = torch.empty(src.shape[1], src.shape[0]).t()  # the decode layout: strides (1, out)
    copy_releasing(dst, src, block_bytes=4 << 20)
    assert torch.equal(dst, want["big"])
    if release_pages(src[:8]) == 0:
        pytest.skip("kernel refused MADV_PAGEOUT")
    # Reading all 64 MiB through a plain copy leaves them resident; the releasing copy
    # leaves at most about one block.
    assert _rss_file_mib() - before < 24, (before, _rss_file_mib())
    # The released range reads back from the file, unchanged; the neighbour is untouched.
    assert torch.equal(src, want["big"]) and torch.equal(sd["small"], want["small"])
    assert _rss_file_mib() - before > 48  # ...and it was indeed read back


def test_release_pages_never_changes_anonymous_or_modified_data(mapped):
    want, sd = mapped
    anon = want["big"].clone()
    assert release_pages(anon) > 0 or True  # advising anonymous memory is allowed...
    assert torch.equal(anon, want["big"])  # ...and never loses it (no swap: pages stay)
    src = sd["big"]
    src[100].fill_(3.0)  # a copy-on-write page of the private mapping
    release_pages(src)
    assert torch.equal(src[100], torch.full((1024,), 3.0))
    assert torch.equal(src[:100], want["big"][:100])


def test_release_pages_ignores_what_it_cannot_advise():
    assert release_pages(torch.randn(4, 4)) == 0  # smaller than a page: no whole page inside
    assert release_pages(torch.randn(4096, 64).t()) == 0  # not contiguous
    with pytest.raises(ValueError, match="shapes differ"):
        copy_releasing(torch.empty(2, 3), torch.empty(3, 2))
