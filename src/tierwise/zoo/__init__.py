"""The model zoo: architectures, training and export (torch), and the on-disk store (no torch).

`tierwise.models.store` is importable without torch; `architectures`, `train`, `export` and
`build` need the `train` extra.
"""
