"""The rewrite stage: apply a plan to the file's bytes, relocations, symbols and tables.

- `stage`: `apply_plan`, `Rewrite` (site edits, table edits, injected thunks).
- `thunk`: the register-saving thunks, generated as bytes; `unwind`: their unwind data
  (DWARF CFI and kernel ORC) from one description of each thunk's stack.
- `modversions`: symbol versions for the symbols a rewrite adds to a module.
- `output`: output files written whole or not at all (and compressed again).
"""
