"""The report stage: results as text, JSON, SARIF and HTML (nothing here prints).

- `stage`: scan, plan, patch and verify results as JSON-ready dicts and readable text.
- `sarif`: SARIF 2.1.0 for code-scanning front ends.
- `diff`, `html`: `pvpatch diff`, what a patch did to a file, site by site (and as a page).
- `symbolic`, `forms`: bytes as AT&T text with names; how native forms read without a
  disassembler.
"""
