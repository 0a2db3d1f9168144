"""The program's own lines: progress and results on stdout, warnings on
stderr, each one plain line."""

import sys

import jax


def report(line: str) -> None:
  """Print a line, from process 0 only, so a job of many processes prints
  each line once."""
  if jax.process_index() == 0:
    print(line, flush=True)


def warning(line: str) -> None:
  """A warning as one plain line on stderr, 'warning: ...', from any
  process (each may have its own to give, such as the files it screened)."""
  print(f'warning: {line}', file=sys.stderr, flush=True)


def quiet_library_logs() -> None:
  """Library INFO logs (JAX probing for backends, Orbax, TensorFlow) only
  when asked for with -v 0: the program prints its own lines."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
