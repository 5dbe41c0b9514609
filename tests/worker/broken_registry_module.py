"""A registry module whose import fails (tests the exit-2 message)."""

raise RuntimeError("this module is broken on purpose")
