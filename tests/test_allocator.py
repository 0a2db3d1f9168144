"""glibc's malloc keeps a freed large block for the next step, where set."""

import json
import os
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: the settings are process-wide and must come
# before other threads allocate. mallinfo2's fields are glibc's malloc.h.
_PROBE = r'''
import ctypes, json
from alexnet_jax import allocator

class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
      'uordblks', 'fordblks', 'keepcost')]

libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
was_set = allocator.keep_freed_memory_for_cpu_steps()
mapped_before = libc.mallinfo2().hblks
block = libc.malloc(300 << 20)
mapped_alone = libc.mallinfo2().hblks - mapped_before
libc.free(block)
print(json.dumps({'set': was_set, 'mapped_alone': mapped_alone,
                  'heap_after_free': libc.mallinfo2().arena}))
'''


def _probe(**environment):
  run = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True,
                       text=True, check=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                            **environment})
  return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_a_freed_large_block_stays_in_the_heap_for_reuse():
  result = _probe()
  assert result['set']
  assert result['mapped_alone'] == 0         # not an mmap of its own...
  assert result['heap_after_free'] >= 300 << 20   # ...and kept when freed


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
@pytest.mark.parametrize('environment', [
    {'ALEXNET_JAX_KEEP_FREED_MEMORY': '0'},
    {'JAX_PLATFORMS': 'cuda'},   # an accelerator runs the steps
])
def test_glibc_s_defaults_stay_where_asked_or_where_xla_has_an_accelerator(
    environment):
  result = _probe(**environment)
  assert not result['set']
  assert result['mapped_alone'] == 1
