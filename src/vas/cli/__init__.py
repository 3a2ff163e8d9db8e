"""vasctl: the command-line interface (one module per noun, printers in printers.py)."""
