"""Subcommands of the ``tabserve`` command line, one module each."""
