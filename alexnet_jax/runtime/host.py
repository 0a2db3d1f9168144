"""Facts about this host that several parts of the program check against."""

import os


def physical_memory() -> int:
  """This host's RAM in bytes (what CPU devices and kept datasets share)."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def available_memory() -> int:
  """Memory the kernel could give now, page cache included (MemAvailable)."""
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  return physical_memory()
