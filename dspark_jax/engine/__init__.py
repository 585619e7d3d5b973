"""The engine: requests and bucketing, the AR loop, the speculative round and loop, sampling, verification.

It knows targets and proposers only through `contracts`. Modules: `contracts`, `sampling`, `verify`,
`decode` (requests, prefill, AR loop), `spec` (speculative round and loop), `generation` (the public
`generate` / `stream` and their statistics).
"""
