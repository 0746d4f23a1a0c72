"""Inspection sharded by connection over worker processes (`infertap run --workers N`).

    parent (agent/runtime.py)                    worker i (agent/workers/worker.py, spawned)
    sensor, API, discovery, policy watcher,      RingReader on ring i -> Pipeline -> engine
    verdicts, circuit breaker, event hub   <---  metrics (prometheus multiprocess files),
    WorkerPool (pool.py): spawn, restart,        events, call summaries, flow ends, snapshots
    route reports, merge snapshots       --->    policy, pod names, which events are wanted

Each flow's records go to one ring (bpf/intercept.c ring_for), so one worker sees a connection
whole and in order. What crosses between the processes is plain data (messages.py): never a
payload byte, never a raw PII value.
"""
