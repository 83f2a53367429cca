"""The editing methods' names, in the order `kvedit` lists them.

Torch-free, so that the command line checks `--method` and prints its help without loading a model library.
`registry.METHODS` holds one editor per name, in this order (a test checks that the two agree).
"""

METHOD_NAMES: tuple[str, ...] = (
    "ft-keys",
    "ft-key-gate",
    "ft-key-up",
    "ft-values",
    "rome",
    "memit",
    "pmet",
    "pmet-no-attn-delta",
    "pmet-update-attn",
    "pmet-even-spread",
    "alphaedit",
    "rome-fast",
    "memit-fast",
    "kn",
    "t-patcher",
)
