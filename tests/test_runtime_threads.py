"""``zlocal.load(..., threads=N)``: the compute threads torch and zlocal's C kernels use."""

from __future__ import annotations

import threading

import pytest
import torch

import zlocal
from zlocal.errors import InvalidArgumentError


@pytest.fixture
def restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_threads_must_be_a_positive_int(tiny_zephyr, bad, restore_threads):
    with pytest.raises(InvalidArgumentError, match="threads must be a positive integer"):
        zlocal.load(str(tiny_zephyr), plan=None, dtype="float32", threads=bad)


def test_threads_apply_to_loading_and_every_generation(tiny_zephyr, restore_threads):
    torch.set_num_threads(2)
    with zlocal.load(str(tiny_zephyr), plan=None, dtype="float32", max_context=128, threads=1) as rt:
        assert rt.threads == 1 and torch.get_num_threads() == 1
        seen = []
        generate = rt.engine.generate

        def recording(*args, **kwargs):
            # what the kernels read: cpu_kernels passes torch.get_num_threads() to the C code
            seen.append(torch.get_num_threads())
            return generate(*args, **kwargs)

        rt.engine.generate = recording
        torch.set_num_threads(2)  # e.g. another runtime or library changed the process setting
        worker = threading.Thread(target=rt.generate, args=("Hi",), kwargs={"max_new_tokens": 2})
        worker.start()
        worker.join(30)
        rt.generate("Hi", max_new_tokens=2)
    assert seen == [1, 1]
