"""The Arrow Flight process: a process of its own, speaking TabPy's Flight protocol.

Started by the front end (``server.flight.FlightService``) when ``TABPY_ARROW_ENABLE`` is true, as
a fresh interpreter in which numpy and pandas cannot be imported: it moves Arrow record
batches and file descriptors, and never converts a table. pyarrow stays out of the front
end, whose import contract forbids numpy (which ``import pyarrow`` loads when it can).

What a Flight client sees (TabPy's protocol; see docs/api.md):

* ``getUniquePath`` returns a fresh UUID; ``DoPut`` to a path descriptor stores the table;
  ``POST /evaluate {"script", "dataPath"}`` on the HTTP port runs a script over it and
  answers the path of the result; ``GetFlightInfo`` describes a stored table and
  ``DoGet`` with its ticket streams it once and removes it; ``ListFlights`` lists tables;
  the actions ``clear``, ``shutdown`` and ``healthcheck``.

What it does unlike TabPy:

* Tables belong to the user who stored them: a caller lists, describes and fetches only its
  own, and two users may use the same path without meeting.
* Tables live ``TABSERVE_FLIGHT_TTL`` seconds and all of them together at most
  ``TABSERVE_FLIGHT_MAX_MB``; the store is one dict behind one lock.
* ``clear`` and ``shutdown`` need the ``manage`` permission, ``DoPut`` needs ``evaluate``.
* Every call is authenticated by the front end's ``Authenticator`` (over the control
  channel), so Basic, bearer and whatever it learns later behave exactly as on HTTP. As in
  TabPy, a successful Basic call is answered with a session token the client may send back
  as ``Bearer``; the token stands for those credentials, which are checked again each time.
* It binds ``TABSERVE_BIND_ADDRESS`` and advertises a location a client can reach.

Tables are held as sealed Arrow IPC files in memfds (fdpass.py); ``/evaluate`` takes one
out of the store and the front end hands the descriptor to a worker, never the bytes.

Modules: ``main`` (the entry point: the control loop and the front end's requests),
``service`` (the Flight calls), ``auth`` (who a call runs as, asked of the front end),
``store`` (the tables) and ``control`` (the socket to the front end).
"""
