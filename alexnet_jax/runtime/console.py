"""The program's own lines on stdout: progress, results and notices."""

import jax


def report(line: str) -> None:
  """Print a line, from process 0 only, so a job of many processes prints
  each line once."""
  if jax.process_index() == 0:
    print(line, flush=True)
