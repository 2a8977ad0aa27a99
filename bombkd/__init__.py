"""``python -m bombkd``: the ``bombkd`` command. The library is ``bombkd_io`` (data loading) and
``bombkd_train`` (training)."""
