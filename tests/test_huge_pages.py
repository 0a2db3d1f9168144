"""The program restarts itself once with glibc's allocator on huge pages."""

import os
import subprocess
import sys

import pytest

from alexnet_jax.runtime import huge_pages
import command_line

# Prints its process ID at every start, then restarts as the programs do.
_SCRIPT = '''
import os
print(os.getpid(), flush=True)
from alexnet_jax.runtime import huge_pages
huge_pages.restart_with_huge_pages()
print(os.environ.get('GLIBC_TUNABLES'))
raise SystemExit(3)
'''


def _run(tunables):
  environment = dict(os.environ, GLIBC_TUNABLES=tunables)
  return subprocess.run([sys.executable, '-c', _SCRIPT], cwd=command_line.REPO,
                        env=environment, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.skipif(not huge_pages._available(),
                    reason='needs glibc 2.35+ and transparent huge pages')
def test_restarts_once_in_the_same_process_keeping_other_tunables():
  result = _run('glibc.malloc.arena_max=4')
  first_start, second_start, tunables = result.stdout.split()
  assert first_start == second_start
  assert tunables == 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1'
  assert result.returncode == 3


def test_leaves_a_users_own_hugetlb_setting_alone():
  result = _run('glibc.malloc.hugetlb=0')
  _, tunables = result.stdout.split()
  assert tunables == 'glibc.malloc.hugetlb=0'
  assert result.returncode == 3
