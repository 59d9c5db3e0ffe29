"""The front-end process: Tornado, the route table, authentication, the worker pool.

Nothing here runs user code, and nothing here imports ``tabserve.worker``, numpy or pandas
(an import contract checks it): request and result bodies cross this process as bytes.
"""
