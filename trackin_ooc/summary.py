"""What a store holds, as a plain dict (``info --json``) and as a few lines of text (``info``)."""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import StoreError
from .store import GradientStore, open_store, store_kind
from .store.backends import StorageOptions, normalize_path, size_on_disk
from .store.layout import FACTOR_POSITIONS_ATTR


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def store_info(store: GradientStore | str | os.PathLike, *, storage_options: StorageOptions = None) -> dict[str, Any]:
    """A JSON-ready summary of a gradient store, or of an influence output made by ``influence(out=)``.

    Complete or not, the store is opened without reading any gradients.
    """
    if not isinstance(store, GradientStore) and store_kind(store, storage_options=storage_options) == "influence":
        return _influence_info(normalize_path(store), storage_options)
    st = open_store(store, storage_options=storage_options)
    meta = st.attrs
    blocks = st.row_blocks()
    done = int(st.blocks_done().sum())
    labels = st.labels() if st.has_labels else None
    spec = st.spec
    info: dict[str, Any] = {
        "kind": "gradient store",
        "path": st.path,
        "complete": st.complete,
        "row_blocks_written": done,
        "row_blocks": len(blocks),
        "n_examples": st.n_examples,
        "n_checkpoints": st.n_checkpoints,
        "feature_dim": st.feature_dim,
        "checkpoints": [
            {"name": name, "learning_rate": float(lr), "sha256": sha}
            for name, lr, sha in zip(st.checkpoint_names, st.learning_rates, st.checkpoint_hashes)
        ],
        "projection": {
            "kind": spec.kind,
            "dim": spec.dim,
            "seed": spec.seed,
            "layers": [{"name": n, "shape": list(s)} for n, s in spec.layers],
            "n_parameters": spec.n_parameters,
            "description": spec.describe(),
        },
        "preconditioner": preconditioner_info(st),
        "fingerprint": st.fingerprint,
        "dtype": st.dtype,
        "chunk_rows": st.chunk_rows,
        "loss": st.loss_name,
        "labels": labels is not None,
        "n_classes": None if labels is None or labels.dtype.kind not in "iub" else int(len(set(labels.tolist()))),
        "gradient_bytes": st.nbytes,
        "size_on_disk": size_on_disk(st.path, storage_options),
        "created": meta.get("created"),
        "package_version": meta.get("package_version"),
        "format_version": meta.get("format_version"),
        "store_id": st.store_id,
        "nonfinite_examples": [int(i) for i in st.nonfinite_examples()],
        "exact_norms": st.has_exact_norms,
    }
    if spec.kind == "factors":
        info["factors"] = factor_choices(st)
    return info


def preconditioner_info(st: GradientStore) -> dict[str, Any]:
    """What the features are of: plain gradients (``kind`` "none"), or P^{1/2} g with each checkpoint's Adam
    preconditioner ("adam", "adafactor"), the layers whose moments take the rank-1 form, and where each
    checkpoint's moments were read."""
    spec = st.spec
    return {
        "kind": spec.preconditioner,
        "description": spec.describe_preconditioner(),
        "adafactor_layers": [{"kind": k, "module": m, "params": list(p)} for k, m, p in spec.preconditioner_layers],
        "moments": list(st.attrs.get("preconditioner_moments") or []),  # written by capture (capturing.job)
    }


def factor_choices(st: GradientStore) -> dict[str, Any]:
    """Per layer of a ``projection="factors"`` store: stored as factors or flat, and what each would cost
    per example and checkpoint (values; the factors' scoring cost per pair is positions² × width)."""
    plan = dict(st.spec.extra).get("factors") or {}
    positions = st.attrs.get(FACTOR_POSITIONS_ATTR) or {}
    arrays = {f.module: f for f in st.factor_arrays}
    shapes = dict(st.spec.layers)
    layers = []
    for x in plan.get("layers", []):
        kind, module, d_in, d_out = x["kind"], x["module"], int(x["d_in"]), int(x["d_out"])
        t = arrays[module].positions if module in arrays else int(positions.get(module, 0))
        side = 1 + d_out if kind == "embedding" else d_in + d_out
        layers.append(
            {
                "module": module,
                "kind": kind,
                "params": list(x["params"]),
                "d_in": d_in,
                "d_out": d_out,
                "positions": t,
                "store": x["store"],
                "flat_values": d_in * d_out,
                "factor_values": t * side,
                "array": arrays[module].name if module in arrays else None,
            }
        )
    flat = list(plan.get("flat", []))
    return {
        "layers": layers,
        "flat_parameters": flat,
        "flat_values": int(sum(math.prod(shapes[n]) for n in flat)),
        "row_width": st.row_width,
    }


def open_gradient_store(
    path: GradientStore | str | os.PathLike, *, storage_options: StorageOptions = None
) -> GradientStore:
    """``open_store``, refusing an influence output (which is a Zarr group with trackin-ooc attributes too)."""
    if not isinstance(path, GradientStore) and store_kind(path, storage_options=storage_options) == "influence":
        raise StoreError(
            f"{normalize_path(path)} is an influence matrix (written by influence), not a gradient store; "
            "give a store written by capture"
        )
    return open_store(path, storage_options=storage_options)


def _influence_info(path, storage_options) -> dict[str, Any]:
    from .store.influence_store import open_influence

    da = open_influence(path, storage_options=storage_options)
    attrs = dict(da.attrs)
    return {
        "kind": "influence matrix",
        "path": normalize_path(path),
        "complete": bool(attrs.get("complete", False)),
        "n_test": int(da.sizes["test"]),
        "n_train": int(da.sizes["train"]),
        "normalize": bool(attrs.get("normalize", False)),
        "test_store": attrs.get("test_store"),
        "train_store": attrs.get("train_store"),
        "learning_rates": attrs.get("learning_rates"),
        "chunks": [int(c[0]) for c in da.chunks] if da.chunks else None,
        "dtype": str(da.dtype),
        "size_on_disk": size_on_disk(path, storage_options),
        "created": attrs.get("created"),
        "package_version": attrs.get("package_version"),
    }


def format_info(info: dict[str, Any]) -> str:
    """The human summary ``trackin-ooc info`` prints."""
    if info["kind"] == "influence matrix":
        state = "complete" if info["complete"] else "INCOMPLETE (interrupted; rerun the influence command)"
        lines = [
            f"influence matrix  {info['path']}",
            f"  shape           {info['n_test']:,} test × {info['n_train']:,} train"
            f"{' (cosine, normalized)' if info['normalize'] else ''}",
            f"  from            test {info['test_store']}",
            f"                  train {info['train_store']}",
            f"  dtype           {info['dtype']}, chunks {info['chunks']}",
            f"  size on disk    {human_bytes(info['size_on_disk'])}",
            f"  state           {state}",
        ]
        return "\n".join(lines)
    proj = info["projection"]
    if info["complete"]:
        state = "complete"
    else:
        state = (
            f"INCOMPLETE ({info['row_blocks_written']} of {info['row_blocks']} row blocks written); "
            "scoring refuses it until the capture is rerun"
        )
    ckpts = info["checkpoints"]
    labels = "none"
    if info["labels"]:
        labels = "yes" + (f" ({info['n_classes']} classes)" if info["n_classes"] is not None else "")
    lines = [
        f"gradient store    {info['path']}",
        f"  examples        {info['n_examples']:,}",
        f"  checkpoints     {info['n_checkpoints']}",
    ]
    width = max(len(c["name"]) for c in ckpts) if ckpts else 0
    for i, c in enumerate(ckpts):
        lines.append(f"    {i:>3}  {c['name']:<{width}}  lr {c['learning_rate']:g}")
    layers = proj["layers"]
    layer_text = ""
    if layers:
        names = ", ".join(x["name"] for x in layers[:6]) + (" ..." if len(layers) > 6 else "")
        layer_text = f"\n  layers          {names}"
    pre = info.get("preconditioner") or {"description": "none (SGD form: plain gradients)", "adafactor_layers": []}
    rank1 = [x["module"] or ",".join(x["params"]) for x in pre["adafactor_layers"]]
    rank1_text = f"\n    Adafactor form  {', '.join(rank1[:6])}{' ...' if len(rank1) > 6 else ''}" if rank1 else ""
    lines += [
        f"  projection      {proj['description']}{layer_text}",
        f"  preconditioner  {pre['description']}{rank1_text}",
        f"  features        {info['feature_dim']:,} per example and checkpoint"
        f"{' (the flat part; factors below)' if info.get('factors') else ''}",
        f"  dtype           {info['dtype']} (chunks of {info['chunk_rows']:,} rows)",
        f"  loss            {info['loss'] or 'unknown'}",
        f"  labels          {labels}",
        f"  exact norms     {'yes (self-influence --exact-norms)' if info.get('exact_norms') else 'no'}",
        f"  size on disk    {human_bytes(info['size_on_disk'])} "
        f"(gradients {human_bytes(info['gradient_bytes'])} uncompressed)",
        f"  fingerprint     {info['fingerprint'][:16]}",
    ]
    if info.get("factors"):
        lines += _factor_lines(info["factors"])
    bad = info.get("nonfinite_examples") or []
    if bad:
        shown = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
        lines.append(f"  non-finite      {len(bad):,} example(s) stored as zeros (ids {shown})")
    lines.append(f"  state           {state}")
    return "\n".join(lines)


def _factor_lines(factors: dict[str, Any]) -> list[str]:
    """``info``'s per-layer table of a factor store: each layer's choice and both costs."""
    lines = [
        f"  per layer       {factors['row_width']:,} values stored per example and checkpoint "
        "(factors where cheaper than the flat gradient)"
    ]
    width = max([len(x["module"]) for x in factors["layers"]] + [6])
    for x in factors["layers"]:
        t = x["positions"]
        if x["store"] == "factors":
            what = f"factors  {x['factor_values']:,} values (flat would be {x['flat_values']:,})"
        else:
            what = f"flat     {x['flat_values']:,} values (factors would be {x['factor_values']:,})"
        lines.append(
            f"    {x['module']:<{width}}  {x['kind']:<9} {x['d_in']:>7,} × {x['d_out']:<7,} "
            f"{t:>5,} position{'' if t == 1 else 's'}  {what}"
        )
    rest = [
        n
        for n in factors["flat_parameters"]
        if not any(n in x["params"] for x in factors["layers"] if x["store"] == "flat")
    ]
    if rest:
        shown = ", ".join(rest[:4]) + (" ..." if len(rest) > 4 else "")
        lines.append(f"    other parameters flat: {shown}")
    lines.append(f"    flat part       {factors['flat_values']:,} values")
    return lines
