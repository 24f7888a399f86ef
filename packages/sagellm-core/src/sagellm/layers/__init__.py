"""Model building blocks: tensor-parallel linears, rotary embedding, norms, attention, sampler."""
