import resource

import pytest
import torch

from models.host_memory import keep_freed_memory


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_a_second_step_sized_round_of_activations_reuses_memory_instead_of_faulting_it_in():
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    faults = []
    for _ in range(2):  # like a forward pass: many large buffers alive at once, then all freed
        before = page_faults()
        held = [torch.ones(2**21) for _ in range(12)]  # 12 x 8 MiB
        del held
        faults.append(page_faults() - before)
    pages = 12 * 8 * 2**20 // resource.getpagesize()
    # By default glibc hands the freed memory back and the second round faults all of it in
    # again (about `pages`); kept, at most a buffer or two lands where no page was touched yet.
    assert faults[1] < pages // 4, faults
