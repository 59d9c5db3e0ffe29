"""What runs in the user's notebook: TabPy's ``Client`` API, deploying over HTTP.

This package imports nothing from tabserve but ``errors`` (an import contract checks it), so
it never loads tornado, numpy, pandas or any server module. ``tabserve.Client`` is this
package's ``Client``, loaded on first use.
"""

from .tabpy_client import (
    Client,
    Endpoint,
    EndpointExists,
    EndpointStatus,
    Job,
    JobStatus,
    QueryObject,
    QueryResponse,
)

__all__ = [
    "Client",
    "Endpoint",
    "EndpointExists",
    "EndpointStatus",
    "Job",
    "JobStatus",
    "QueryObject",
    "QueryResponse",
]
