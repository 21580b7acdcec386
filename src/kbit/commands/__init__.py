"""Subcommands of the ``kbit`` command line, one module each; every module has ``add_parser(subparsers)``."""
