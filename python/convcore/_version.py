"""convcore's version (pyproject.toml's), in a module of its own so that the
modules that record it (convcore.io writes it into saved files) need not
import the package's __init__, which imports them."""
__version__ = "0.1.0"
