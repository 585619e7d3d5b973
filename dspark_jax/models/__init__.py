"""Target model families, one package each (`qwen3`, `gemma4`, `deepseek_v3`), the registry that maps
`model_type` to a family, and checkpoint loading. Targets know nothing of speculation."""
