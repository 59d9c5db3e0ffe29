"""Deploy ``add2`` with the unmodified TabPy client (run with the TabPy venv's python).

Usage: python deploy_add2.py http://127.0.0.1:PORT/
Kept free of tabserve imports on purpose: it proves tabserve accepts TabPy's own client.
"""

import sys

from tabpy.tabpy_tools.client import Client


def add2(x, y):
    """Adds two values (scalars in the benchmark)."""
    return x + y


def main() -> None:
    client = Client(sys.argv[1])
    client.deploy("add2", add2, "Adds two values", override=True)
    print("deployed add2 to", sys.argv[1])


if __name__ == "__main__":
    main()
