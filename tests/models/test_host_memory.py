import subprocess
import sys

import pytest

from pagedkv.models.host_memory import keep_freed_memory

resource = pytest.importorskip("resource")  # POSIX only

# Like a forward pass: many large buffers alive at once, then all freed; twice. Prints the
# page faults of each round and the number of pages the buffers span.
ROUNDS = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if {keep}:
    from pagedkv.models.host_memory import keep_freed_memory
    assert keep_freed_memory()
torch.ones(1)
counts = []
for _ in range(2):
    before = faults()
    held = [torch.ones(2**21) for _ in range(12)]  # 12 x 8 MiB
    del held
    counts.append(faults() - before)
print(*counts, 12 * 8 * 2**20 // resource.getpagesize())
"""


def second_round_faults(keep: bool) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS.format(keep=keep)], capture_output=True, text=True, check=True)
    _, second, pages = map(int, out.stdout.split())
    return second, pages


def test_a_second_step_sized_round_of_activations_reuses_memory_instead_of_faulting_it_in():
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    default, pages = second_round_faults(keep=False)
    if default < pages // 2:  # e.g. transparent huge pages always on: nothing to fix here
        pytest.skip(f"this system's allocator already keeps the memory ({default} faults of {pages} pages)")
    kept, _ = second_round_faults(keep=True)
    assert kept < pages // 4, (kept, default, pages)  # at most a buffer or two lands on fresh pages
