"""CACARA: multilingual audio retrieval from English-only training against a frozen multilingual text tower."""

__version__ = "0.1.0"
