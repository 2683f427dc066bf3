"""tuneforge: fine-tune causal language models from one typed YAML config.

The package is layered one way: config -> data -> models -> methods -> train -> evaluation -> cli.
"""

__version__ = "0.1.0"
