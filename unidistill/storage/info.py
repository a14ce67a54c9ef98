"""What ``unidistill cache-info`` shows: manifest, shapes, sizes on disk, bytes per token."""

from __future__ import annotations

from unidistill.storage.layout import HEAD_FILE, STORED_K_KEY
from unidistill.storage.reader import CacheReader
from unidistill.storage.manifest import read_unit_markers


def _rows(layout, manifest: dict, n_tokens: int) -> dict:
    """How the rows were made: the packing, and for a packed cache the build's target / padding /
    segment counts (absent until it is complete) and the line with the share of trained tokens;
    for a generated cache, how the teacher answered."""
    tokens = manifest.get("build", {}).get("tokens")
    train_on = manifest.get("settings", {}).get("data", {}).get("train_on")
    return {"packing": layout.packing, "tokens": tokens,
            "packing_description": layout.token_codec.describe(tokens, n_tokens, train_on),
            "generation_description": generation_description(manifest)}


def generation_description(manifest: dict) -> str | None:
    """``cache-build --generate``: how the teacher answered, and what came of it (None for a
    reference cache)."""
    g = manifest.get("settings", {}).get("generation")
    if g is None:
        return None
    how = (f"sampled (temperature {g['temperature']}, top-p {g['top_p']}, top-k "
           f"{g['top_k'] or 'off'})" if g["do_sample"] else "greedy")
    line = (f"the teacher's answers: {how}, at most {g['max_new_tokens']} new tokens, seed "
            f"{g['seed']}, batch {g['batch_size']}")
    done = manifest.get("build", {}).get("generation")
    if done:
        line += (f"; {done['prompts']} prompts ({done['dropped_prompts']} too long, dropped); "
                 f"generate vs forward max |delta log p| {done['max_abs_logp']:.1e}")
    return line


def cache_info(root) -> dict:
    """``root``: a local folder or a URL (``s3://bucket/prefix``); sizes are bytes on disk or
    object sizes in the bucket, from one listing."""
    reader = CacheReader(root, require_complete=False)
    layout, manifest = reader.layout, reader.manifest
    sizes = reader.location.file_sizes()

    def disk_bytes(prefix: str) -> int:
        return sum(n for key, n in sizes.items() if key.startswith(prefix + "/"))
    n_tokens = layout.n_sequences * layout.seq_len
    arrays = {}
    for name, spec in layout.array_specs().items():
        raw = spec["dtype"].itemsize
        for dim in spec["shape"]:
            raw *= dim
        disk = disk_bytes(name)
        arrays[name] = {"shape": list(spec["shape"]), "dtype": str(spec["dtype"]),
                        "raw_bytes": raw, "disk_bytes": disk,
                        "disk_bytes_per_token": disk / n_tokens}
    committed = len(read_unit_markers(reader.location, layout.n_units))

    def per_token(pred, key):
        return sum(a[key] for n, a in arrays.items() if pred(n)) / n_tokens

    head_bytes = sizes.get(HEAD_FILE, 0)  # exact logits: stored once
    logit_names = set(layout.logit_codec.array_specs(layout.grid))  # each codec's own arrays
    hidden_names = {n for j in layout.layers
                    for n in layout.hidden_codec.array_specs(j, layout.grid, layout.hidden_size)}
    is_logits = logit_names.__contains__
    is_hidden = hidden_names.__contains__
    return {
        "path": str(reader.root),
        "status": manifest.get("status"),
        "fingerprint": manifest.get("fingerprint"),
        "format_version": manifest.get("format_version"),
        "package_version": manifest.get("package_version"),
        "units_committed": committed,
        "units_total": layout.n_units,
        "n_sequences": layout.n_sequences,
        "seq_len": layout.seq_len,
        "n_tokens": n_tokens,
        **_rows(layout, manifest, n_tokens),
        STORED_K_KEY: layout.stored_k,
        "logits_mode": layout.logits_mode,
        "logits_description": layout.logit_codec.describe(),
        "tail_temperatures": list(layout.tail_temperatures),
        "head_bytes": head_bytes,
        "layers": list(layout.layers),
        "hidden_dtype": layout.hidden_dtype,
        "settings": manifest.get("settings"),
        "build": manifest.get("build"),
        "arrays": arrays,
        "bytes_per_token": {
            "logits_raw": per_token(is_logits, "raw_bytes"),
            "logits_disk": per_token(is_logits, "disk_bytes") + head_bytes / n_tokens,
            "hidden_raw": per_token(is_hidden, "raw_bytes"),
            "hidden_disk": per_token(is_hidden, "disk_bytes"),
            "total_disk": sum(sizes.values()) / n_tokens,
        },
    }
