"""The error users see as one line: something they gave is wrong, and how to fix it."""


class UserError(Exception):
  """Bad input (config, data, checkpoint); the message names the fix."""
