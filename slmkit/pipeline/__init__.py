"""YAML recipes chaining steps, and the quickstart."""
