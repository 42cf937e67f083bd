"""The one exception type for problems the user can fix (bad file, bad option, bad target).

The CLI catches it once and prints its message as a single line on stderr.
"""


class BpwoptError(Exception):
    """A user-facing error; str(error) is the whole one-line message."""
