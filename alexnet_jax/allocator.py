"""glibc's malloc set up to keep freed memory for reuse, where XLA runs on the CPU.

XLA:CPU allocates a step's temporary buffers afresh at every execution: for
the paper's network at batch 64, one block of 1.5 GB. glibc serves a block
that size with a new mmap and unmaps it when it is freed, so every step
faults all of its pages in again, and the train step spent about a tenth of
its time in the kernel. One arena that never unmaps or trims serves the next
step from pages already mapped.

One arena costs threads that allocate at the same time: the input pipeline
alone ran about 9% slower with it. So it is set only for the modes that run
XLA steps, and only where XLA has no accelerator to run them on. It must
happen before other threads allocate, so callers do it before starting JAX.
"""

import ctypes
import ctypes.util
import importlib.metadata
import os

# mallopt's parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Set to 0 to keep glibc's defaults (to compare, or to hand memory back).
ENVIRONMENT_SWITCH = 'ALEXNET_JAX_KEEP_FREED_MEMORY'


def _xla_runs_on_cpu() -> bool:
  """True unless JAX may find an accelerator (a plugin or libtpu installed)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms == 'cpu'
  installed = {d.metadata['Name'].lower().replace('_', '-')
               for d in importlib.metadata.distributions()}
  return not any(name.startswith(('jax-cuda', 'jax-rocm', 'libtpu'))
                 for name in installed)


def keep_freed_memory_for_cpu_steps() -> bool:
  """Sets glibc's malloc up for XLA:CPU steps; True where it did."""
  if os.environ.get(ENVIRONMENT_SWITCH, '1') == '0' or not _xla_runs_on_cpu():
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return False  # not glibc (macOS, musl): its allocator is left alone
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in (
      (_M_ARENA_MAX, 1),               # every thread shares one heap...
      (_M_MMAP_MAX, 0),                # ...which holds even the largest block
      (_M_TRIM_THRESHOLD, 2**31 - 1),  # and is never shrunk
  ))
