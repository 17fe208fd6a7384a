"""``winnow serve --workers N``: N scorer processes behind one HTTP endpoint.

One Python process has one GIL, so one scorer cannot keep a many-core GPU host
busy. With ``--workers N`` (``WINNOW_WORKERS``) the ``winnow serve`` process
becomes a supervisor: it starts N worker processes, each a complete scorer
(the same composition root as a single ``winnow serve``) and a member of the
scorer's consumer group, so Kafka splits the frames partitions between them
and the group's labels-per-hour cap counts each as a replica. Every worker
watches the models topic itself, so a release reaches each of them.

The supervisor owns the HTTP port; each worker listens on a private Unix
socket (:mod:`service.workers.client`). The parts:

- :mod:`service.workers.pool`: starts, watches and restarts the processes,
  forwards SIGTERM for a drain;
- :mod:`service.workers.fanout`: admin writes reach every worker or none, and
  a restarted worker is given them again;
- :mod:`service.workers.metrics`: one ``/metrics`` from the workers' own, each
  series labelled with its ``worker``;
- :mod:`service.workers.gateway`: the HTTP app; :mod:`service.workers.serve`
  runs it.
"""
