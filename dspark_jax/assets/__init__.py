"""The built-in trained pair shipped with the package (HF-format directories).

`TARGET` is a small Qwen3-architecture model trained here; `DSPARK_DRAFT` / `DFLASH_DRAFT` are drafts trained
against it (see `configs/fixture_pair.yaml` and the README's training section for how they were made).
"""

from pathlib import Path

ROOT = Path(__file__).parent
TARGET = ROOT / "target"
DSPARK_DRAFT = ROOT / "dspark_draft"
DFLASH_DRAFT = ROOT / "dflash_draft"
