"""The error users see as one line: something they gave is wrong, and how to fix it."""

import sys


class UserError(Exception):
  """Bad input (config, data, checkpoint); the message names the fix."""


class DatasetError(UserError):
  """A dataset is missing or unusable; the message says how to fix it."""


def exit_with_error(message: str, status: int) -> None:
  """The one-line report of bad input: 'error: ...' on stderr, then exit."""
  print('error: ' + ' '.join(message.split()), file=sys.stderr)
  sys.exit(status)
