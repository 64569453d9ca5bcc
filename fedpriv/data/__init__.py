"""Labelled texts: reading data files and built-in corpora, and splitting a corpus into organisations.

Below the apps: a node reads its own file, the server names the classes and a simulation partitions a corpus
with the same code."""
