"""Observability records every layer can write into: metrics, state rows, progress, worker logs.

A leaf package: nothing here imports another latticaray package, so the mesh, the object store,
the scheduler and the runtime all record into it without an upward import. What reads it (the
dashboard, the CLI, ``latticaray.util.state``) sits above the runtime.

    metrics   the Prometheus registry and the metric families (cheap tallies for hot paths)
    model     the rows a node reports about itself (StateSource) and their bounded wire codec
    gather    one mesh snapshot from a StateSource: the local report plus its members' reports
    query     Ray-style filters, lists and summaries over a snapshot (pure functions)
    progress  progress bars for long transfers (tqdm.auto; after a delay; quiet if not interactive)
    logs      worker output to the driver: the wire batch, batching, rate limit, dedup, printing
    capture   a worker process's stdout/stderr as lines tagged with the running task
    text      plain-text views of a snapshot (`latticaray status`, `latticaray list`)
"""
