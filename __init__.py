"""tunewright: fine-tune large language models in plain PyTorch.

The repository root is the ``tunewright`` package; each top-level folder is a subpackage
(``tunewright.models``, ``tunewright.training``, ...). Nothing heavy is imported here so that
``tune --help`` stays fast.
"""

__version__ = "0.1.0"
