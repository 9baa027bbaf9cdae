"""Sub-commands of the ``sparse-clt-hf`` command line, one module each (``add_parser``, ``run``)."""
