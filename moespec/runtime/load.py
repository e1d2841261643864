"""``moespec.load(DIR)``: rebuild a layer from an artifact directory and load its weights.

Every check is loud: a missing file, a malformed manifest or one of another format version or
moespec release series (``moespec/runtime/manifest.py``), a ``spec.lock.yaml`` or
``model.safetensors`` whose size or SHA-256 differs from the manifest's record (tampered,
corrupted, or replaced by another artifact's), an edited lock file, weights written for another
spec or layer, and any missing, unexpected or reshaped tensor raise :class:`ArtifactError`
listing what is wrong. The one opt-out, ``verify=False`` for files edited on purpose, skips only
the size and SHA-256 comparison, and says so in a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from moespec import __version__
from moespec.ir.build import spec_hash
from moespec.runtime.layer import MoELayer
from moespec.runtime.layout import LAYOUT, LOCK, MANIFEST, NETWORK, WEIGHTS, ArtifactError
from moespec.runtime.manifest import check_unchanged, read_manifest, verify_files
from moespec.spec.schema import Spec

log = logging.getLogger(__name__)
_MAX_LISTED = 20  # keys listed per category in an error message


def check_spec_hash(spec: Spec, expected: str, where: Path) -> None:
    """Raise if the resolved spec's SHA-256 differs from ``expected`` (the lock was edited)."""
    actual = spec_hash(spec)
    if actual != expected:
        raise ArtifactError(
            f"{where}: the resolved spec does not match the artifact (sha256 {actual[:12]}..., manifest "
            f"says {expected[:12]}...); the lock file was edited. Rebuild with `moespec build` instead."
        )


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def check_state_dict(module: torch.nn.Module, state: Mapping[str, Tensor], where: Path) -> None:
    """Raise unless ``state`` has exactly the module's keys, shapes and dtypes (never a warning)."""
    expected = module.state_dict()
    controllers = set(getattr(module, "_controllers", ()))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes, dtypes = [], []
    for k, want in expected.items():
        got = state.get(k)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            shapes.append(f"{k}: file has {list(got.shape)}, the spec needs {list(want.shape)}")
        elif got.dtype != want.dtype:
            why = ""
            if k in controllers:
                # Artifacts written before controller state was kept in fp32 hold it in the
                # layer's dtype (already rounded): refuse rather than upcast a rounded value.
                why = " (a running controller's state, kept in fp32: rebuild the artifact)"
            dtypes.append(f"{k}: file has {got.dtype}, the spec needs {want.dtype}{why}")
    if missing or unexpected or shapes or dtypes:
        blocks = [f"{where}: the weights do not match the layer the spec builds"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
            ("dtype mismatches", dtypes),
        ):
            if items:
                blocks.append(_listing(title, items))
        raise ArtifactError("\n".join(blocks))


def read_weights(path: Path, *, spec_sha256: str, layer: str) -> dict[str, Tensor]:
    """Tensors of ``model.safetensors``, after checking its metadata names this spec and layer."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable weights file ({e})") from None
    problems = []
    if meta.get("format") != LAYOUT:
        problems.append(f"layout {meta.get('format')!r}, expected {LAYOUT!r}")
    if meta.get("spec_sha256") != spec_sha256:
        problems.append(f"spec sha256 {str(meta.get('spec_sha256'))[:12]}... is not {spec_sha256[:12]}...")
    if meta.get("layer") != layer:
        problems.append(f"layer {meta.get('layer')!r} is not {layer!r}")
    if problems:
        raise ArtifactError(f"{path}: weights were written for another artifact: " + "; ".join(problems))
    return state


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    *,
    verify: bool = True,
    allow_large: bool = False,
) -> MoELayer | torch.nn.Module:
    """The layer (or, for a network artifact, the :class:`MoENetwork`) of the artifact
    directory ``path``, with its weights, on ``device`` (the spec's
    ``target.device`` if None; :class:`~moespec.errors.TargetError` if this machine lacks it).

    Validates the manifest and its versions, checks that ``spec.lock.yaml`` and
    ``model.safetensors`` have the size and SHA-256 it records (each hashed in one streaming
    pass before it is read), rebuilds the module from the lock file (checked against the
    manifest's spec hash), loads the weights after an exact key/shape/dtype check, and returns
    it in training mode like ``moespec.build``. Raises :class:`ArtifactError` on any mismatch.

    ``verify=False`` skips only the size and SHA-256 comparison, for files edited on purpose
    (fine-tuned weights saved over ``model.safetensors``); it logs a warning saying so. Every
    other check still runs. ``allow_large``: load even if the weights may not fit in memory
    (refused with the estimate otherwise, before anything is allocated).
    """
    from moespec.ops import registered_op_set  # (registers torch.ops.moespec.*)
    from moespec.runtime.build import build_layer
    from moespec.spec.load import load_spec

    root = Path(path)
    manifest = read_manifest(root)
    missing_ops = sorted(set(manifest.op_set) - set(registered_op_set()))
    if missing_ops:
        raise ArtifactError(
            f"{root}: the artifact uses ops this moespec {__version__} does not provide: "
            f"{', '.join(missing_ops)} (built by moespec {manifest.moespec_version}); rebuild it "
            "from its spec.lock.yaml with `moespec build`"
        )
    prints = verify_files(root, manifest, (LOCK, WEIGHTS)) if verify else {}
    if not verify:
        log.warning(
            "%s: verify=False: not comparing the sizes and sha256 of %s and %s with %s; "
            "they load as they are (every other check still runs)",
            root,
            LOCK,
            WEIGHTS,
            MANIFEST,
        )
    loaded = load_spec(root / LOCK)
    check_spec_hash(loaded.spec, manifest.spec_sha256, root / LOCK)
    # On `device`, or target.device when None (TargetError if this machine has no such device).
    if manifest.layer == NETWORK:
        from moespec.runtime.network import build_network

        module: torch.nn.Module = build_network(
            loaded.spec, seed=manifest.seed, device=device, allow_large=allow_large
        )
    else:
        module = build_layer(
            loaded.spec, layer=manifest.layer, seed=manifest.seed, device=device, allow_large=allow_large
        )
    state = read_weights(root / WEIGHTS, spec_sha256=manifest.spec_sha256, layer=manifest.layer)
    check_unchanged(root, prints)  # hash, then read: nothing was swapped in between
    check_state_dict(module, state, root / WEIGHTS)
    module.load_state_dict(state, strict=True)
    return module
