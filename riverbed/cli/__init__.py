"""The ``riverbed`` command: a thin layer over the public Python API, one module per command group.

Each command calls the ``Log`` method of the same name with the same options (``topics create``
calls ``Log.create_topic``), so nothing is possible only in the CLI.
"""
