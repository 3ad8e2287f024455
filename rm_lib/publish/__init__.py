"""The model card and the Hub upload."""
