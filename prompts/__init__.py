"""Plain-text prompt sets (one prompt per line), installed as the data package ``ddpo.prompt_sets``."""
