"""Small helpers that both the plain-PyTorch reference and the fast path import.

What the two sides must agree on by construction lives here once: the dtype table
(:mod:`.dtypes`), explicit random draws (:mod:`.rng`), stable top-k and selection masks
(:mod:`.select`), the capacity formulas (:mod:`.capacity`), the routing result and the loss
formulas (:mod:`.routing`, :mod:`.losses`) and parameter initialisation (:mod:`.params`).
Nothing here imports the reference (``moespec.reference``) or the fast path
(``moespec.ops``, ``moespec.lower``): this package sits below both. Tests check these helpers
against hand-computed values, never through either side.
"""
