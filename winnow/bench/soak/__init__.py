"""``winnow bench soak``: the three roles under a steady load for N minutes, watched for leaks.

The scorer, the trainer and the label app run as their own ``winnow`` processes
on one broker. After a short capacity measurement (or at ``--rate``), frames
stream at 80 % of the scorer's capacity; a simulated team answers label
requests through the label app's API, so the trainer releases models that the
scorer swaps in; halfway, the frames shift (brightness), so drift alarms fire.
Every ``--sample-seconds`` each role's RSS, open file descriptors and threads
(from ``/proc``) and asyncio tasks (``winnow_asyncio_tasks``) are sampled with
the scorer's consumer lag; at the end the predictions topic is read to its end
and every acknowledged frame must have been decided.
"""

from winnow.bench.soak.run import SoakConfig, run_soak, run_soak_command

__all__ = ["SoakConfig", "run_soak", "run_soak_command"]
