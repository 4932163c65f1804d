"""The load stage: the ELF model pvpatch reads and writes, and what wraps or rides in it.

- `reader`: the bounds-checked, lazily parsed ELF model (headers, sections, segments,
  symbols, relocations, RELR), read from bytes.
- `writer`: the writer beside it (sections added or grown, headers, symbols, relocation
  sections, `.dynamic`, RELR encoding).
- `compress`, `sign`: the containers around a kernel module (`.ko.xz`/`.zst`/`.gz`, an
  appended signature), opened on load and put back on write.
- `btf`, `ksymtab`: kernel metadata read out of an image (type information, exports).
"""
