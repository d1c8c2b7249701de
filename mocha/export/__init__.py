"""Exporting trained MoCHA models: mocha's own pretrained form and a transformers-native folder."""
