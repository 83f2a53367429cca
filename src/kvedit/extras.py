"""The optional extras and the command that installs each (torch-free: the CLI's help text names them)."""

RAY_INSTALL = "pip install 'kvedit[ray]'"
