"""Shadow deployments and mirroring from the kernel sample stream, and a mirror sink.

- spec.py: the policy's `mirror:` section as frozen dataclasses (no YAML here).
- policy.py: reads that section for agent/policy/loader.py, with file:line: field messages.
- shadow.py: replays a share of a model's decoded requests to a shadow V2 server, off the
  reader thread, and compares the shadow's outputs with the primary's.
- compare.py: output agreement and numeric difference, never exposing values.
- sink.py: redacted inference records in rotating JSONL files, for offline evaluation.
- mirror.py: the agent's one Mirror (shadows + sink), fed by a pipeline exchange tap.

Kept import-light: agent/policy/schema.py imports spec.py.
"""
