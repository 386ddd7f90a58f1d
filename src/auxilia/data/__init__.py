"""Sources, datasets, batch plans and loaders for bundled data."""
