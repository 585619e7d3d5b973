"""Proposers: what drafts tokens for the engine to verify (contract: `engine.contracts.Proposer`).

* `dspark`: DSpark / DFlash drafts (a family backbone, Markov head, confidence head), loaded from the
  DeepSpec layout by `dspark_checkpoint`;
* `prompt_lookup`: model-free n-gram drafting from the row's own context.
"""
