"""Start the program with glibc's allocator on transparent huge pages.

XLA:CPU allocates a step's buffers afresh at every step, and glibc maps
blocks that large anew each time, so the kernel faults them in and
zero-fills them 4 KB at a time: hundreds of thousands of page faults a step
for the paper's train step. glibc 2.35 and later back its blocks with 2 MB
pages when the tunable glibc.malloc.hugetlb=1 is set (where the kernel's
transparent huge pages are 'always' or 'madvise'), which cuts the faults
about 200-fold and speeds the step up (`benchmark --what=train_step`
reports page_faults_per_step).

glibc reads tunables only when a process starts, so the program restarts
itself once, before importing anything large: exec keeps the process ID,
arguments, interpreter flags and standard streams, so signals, exit codes
and launchers see one process. A user who sets glibc.malloc.hugetlb in
GLIBC_TUNABLES (0 turns it off) is left alone.
"""

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
_MODES = '/sys/kernel/mm/transparent_hugepage/enabled'


def _available() -> bool:
  """glibc new enough for the tunable, and huge pages not off in the kernel."""
  libc, version = platform.libc_ver()
  if libc != 'glibc' or not version or tuple(
      map(int, version.split('.')[:2])) < (2, 35):
    return False
  try:
    with open(_MODES) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def restart_with_huge_pages() -> None:
  """Re-exec this process with glibc.malloc.hugetlb=1, once, where useful."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables or not _available():
    return
  environment = dict(os.environ)
  environment['GLIBC_TUNABLES'] = ':'.join(
      filter(None, [tunables, f'{TUNABLE}=1']))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
