"""The long-running build worker: jobs from a queue, builds as child `cloudbuild build` processes,
results into a store.

Modules, one subject each:
- `job`: the job document, its JSON Schema and the operator's allowed options.
- `protocols`: what a queue and a store must do (`Queue`, `Store`), the errors they raise.
- `dirqueue`, `dirstore`: the embedded `dir://` queue and store (one machine, no server).
- `urls`: `open_queue(url)` / `open_store(url)`: scheme -> implementation, the one place new kinds plug in.
- `supervisor`: slots, leases, exit code -> queue action, draining; knows only the protocols.
- `observe`: Prometheus metrics and the health endpoint.
"""
