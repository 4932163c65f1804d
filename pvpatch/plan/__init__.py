"""The plan stage: per site, what it becomes and why, as data (nothing is written here).

- `stage`: `make_plan`, `Plan`, `Decision` (with the table edits and findings).
- `backend`: what each op may become, read from a TOML spec (`native` is one, shipped).
- `targets`: which symbol a spec's target names (one rule for plan, rewrite and verify).
- `coverage`: which run-time patchers cover each site, what the kernel will do there,
  and the table edits that leave pvpatch's bytes in place (`--final`).
"""
