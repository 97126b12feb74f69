"""The command line and the applications built on the engine (nothing below imports them)."""
