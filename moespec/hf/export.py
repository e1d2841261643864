"""``moespec export DIR --to-hf OUT``: a network artifact written as a transformers checkpoint
(config.json and model.safetensors of the family its spec matches; see
:func:`moespec.hf.network.save_hf`). The checkpoint is written beside ``OUT`` and renamed
into place, so a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from moespec.errors import BuildError, OutputError
from moespec.hf.network import save_hf
from moespec.outputs import make_parents, remove_created, temp_sibling, writing
from moespec.runtime.load import load
from moespec.runtime.network import MoENetwork


def export_to_hf(artifact: Path, out: Path, *, force: bool = False) -> Path:
    """Write the transformers checkpoint of the network artifact ``artifact`` to ``out``
    (replaced only with ``force``); an error when the artifact holds a layer or a network no
    supported transformers family computes."""
    module = load(artifact, device="cpu")
    if not isinstance(module, MoENetwork):
        raise BuildError(
            f"{artifact}: a layer artifact ({type(module).__name__}); --to-hf exports a network (build a "
            "spec with a `model:` section without --layer)"
        )
    if out.exists() and not force:
        raise OutputError(out, "exists (pass --force to replace it)")
    created = make_parents(out)
    tmp = temp_sibling(out)
    try:
        with writing(out):
            save_hf(module.eval(), tmp)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        remove_created(created)
        raise
    return out
