"""Data: tokenizer, indexed image-text datasets, transforms, loaders."""
