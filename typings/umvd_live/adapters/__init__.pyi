# `adapters/` is installed as `umvd_live.adapters` (pyproject's package-dir), a mapping mypy cannot
# follow from the source tree: these stubs give mypy that name by re-exporting the modules it checks
# as `adapters.*`, so one definition is checked and every import of it is typed. One stub per module.
