"""Facts about this host that several parts of the program check against."""

import os


def physical_memory() -> int:
  """This host's RAM in bytes (what CPU devices and kept datasets share)."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
