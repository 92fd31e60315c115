"""Command-line interface (layer 5). Nothing imports this package."""
