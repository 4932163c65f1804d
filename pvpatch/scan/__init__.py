"""The scan stage: find a file's paravirt site table and decode its entries into `Site`s.

- `stage`: the entry point (`scan_elf`, `ScanResult`) and the seam every table family
  sits behind.
- `paravirt` (`.parainstructions`, Linux 2.6-6.7; its layouts in `layouts`) and
  `altinstr` (`.altinstructions` DIRECT_CALL entries, Linux 6.8+): the two families.
- `sites`: the family-neutral site model and what a call through the ops table looks like.
- `integrity`: a table entry is input, not truth (each site's bytes checked).
- `ops`, `opsource`: which op a site's slot means (BTF, DWARF or a shipped catalog).
"""
