"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class LowmemError(Exception):
    """A problem the user can act on: bad input, a budget too small, a damaged file."""
