"""Everything that runs inside a worker process: the job loop, the body codec, script
wrapping, archive loading and the sandbox self-check's attempts.

The server never imports this package: it starts workers as fresh interpreters
(``tabserve.worker.main``) and talks to them over ``tabserve.protocol``.
"""
