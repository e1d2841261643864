"""The artifact directory: ``moespec build SPEC -o DIR`` writes it, ``moespec.load(DIR)`` reads it.

The files' names and the manifest reader live in ``moespec.runtime.layout`` (readers need
them too); here ``artifact`` writes the directory atomically, ``report`` derives the
numbers/IR/graph report and ``render`` renders the standalone ``module.py``. Timing a built
layer is ``moespec.bench``, not part of export.
"""
