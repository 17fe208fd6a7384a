"""Winnow's learning role: model creation, fine-tuning, export and releases."""
