"""Model-agnostic pure pieces shared by targets and drafts: norms, RoPE, attention, MLPs, MoE, params."""
