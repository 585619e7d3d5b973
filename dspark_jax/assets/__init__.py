"""The built-in trained pair shipped with the package (HF-format directories).

`TARGET` is a small Qwen3-architecture model trained here; `DSPARK_DRAFT` / `DFLASH_DRAFT` are drafts trained
against it (see `configs/fixture_pair.yaml` and the README's training section for how they were made), and
`EAGLE3_DRAFT` an EAGLE-3 draft trained against it later (`configs/fixture_eagle3.yaml`, docs/eagle3.md §9).
"""

from pathlib import Path

ROOT = Path(__file__).parent
TARGET = ROOT / "target"
DSPARK_DRAFT = ROOT / "dspark_draft"
DFLASH_DRAFT = ROOT / "dflash_draft"
EAGLE3_DRAFT = ROOT / "eagle3_draft"
