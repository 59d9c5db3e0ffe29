"""tabserve: a TabPy-compatible server for Tableau Analytics Extensions."""

__version__ = "0.1.0"
