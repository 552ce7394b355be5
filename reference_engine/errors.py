"""The one exception type the engine raises for problems a user can fix.

The CLI prints its message (never a traceback) and exits with code 2. Every message
names what is wrong and what to do about it.
"""


class DojoError(Exception):
    """A problem with the input or the set-up, explained in plain words."""
