"""What the trainer and the gateway share, with neither torch nor a web stack: the model bundle's card
(``model_card``), DINO's evaluation transform (``transform``), the weighted k-NN vote (``knn``), the attention
masks (``segmentation``) and the synthetic shapes generator (``synthetic``).

Imports go one way: ``dinoserve`` (the command line) → ``service`` and ``training`` → ``core``; ``service``
never imports ``training`` or torch, ``training`` never imports ``service``, and ``core`` imports neither
(``tests/test_architecture.py``). docs/architecture.md draws it.
"""

__version__ = "0.1.0"
