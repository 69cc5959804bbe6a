"""The ``dinoserve`` command (``cli.py``): it dispatches to ``training`` (train, export, eval-knn, plot,
bench-methods) and ``service`` (serve, index), importing each only for the commands that need it."""
