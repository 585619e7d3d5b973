"""Proposers: what drafts tokens for the engine to verify (contract: `engine.contracts.Proposer`).

* `dspark`: DSpark / DFlash drafts (a family backbone, Markov head, confidence head), loaded from the
  DeepSpec layout by `dspark_checkpoint`;
* `eagle3`: EAGLE-3 drafts (one decoder layer over fused target features, a chain drafted token by token),
  loaded by `eagle3_checkpoint` (docs/eagle3.md);
* `mtp`: the multi-token-prediction module of a DeepSeek-V3 target checkpoint (MTP-1 or chained MTP-k),
  loaded by `mtp_checkpoint` from the target directory itself (docs/deepseek.md §4);
* `mtp_v4` / `dspark_v4`: the MTP module and the DSpark draft (`mtp.0..2`, dispatched on `dspark_*` config fields)
  of a DeepSeek-V4 target checkpoint (docs/deepseek.md §10, §12);
* `prompt_lookup`: model-free n-gram drafting from the row's own context.

`load_draft` is the one entry point for trained drafts: it picks the loader from `architectures` in the
checkpoint's `config.json` (a DeepSeek-V3 `model_type` means the target's own MTP module).
"""

from __future__ import annotations


def load_draft(path, dtype="bfloat16", mesh=None):
    """Load a draft checkpoint directory, or a Hugging Face repo id (`models.loading.resolve_checkpoint`): EAGLE-3
    (`Qwen3Eagle3Model`, `LlamaForCausalLMEagle3`), DSpark / DFlash, or the MTP module of a DeepSeek-V3 target
    checkpoint."""
    from dspark_jax.config import read_json
    from dspark_jax.errors import CheckpointError
    from dspark_jax.models.loading import resolve_checkpoint
    from dspark_jax.proposers import dspark_checkpoint, eagle3_checkpoint

    directory = resolve_checkpoint(path, "draft")  # a directory, or a hub repo id `owner/name[@revision]`
    if not directory.is_dir():
        raise CheckpointError(f"draft checkpoint directory {directory} does not exist")
    from dspark_jax.proposers import mtp_checkpoint

    if mtp_checkpoint.is_mtp_directory(directory):  # a DeepSeek-V3 target checkpoint: its MTP module
        return mtp_checkpoint.load_mtp(directory, dtype=dtype, mesh=mesh)
    archs = read_json(directory / "config.json").get("architectures") or []
    if archs and "Eagle3" in str(archs[0]):  # unsupported EAGLE-3 variants are refused by name there
        return eagle3_checkpoint.load_draft(directory, dtype=dtype, mesh=mesh)
    return dspark_checkpoint.load_draft(directory, dtype=dtype, mesh=mesh)
