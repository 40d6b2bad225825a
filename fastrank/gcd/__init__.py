"""GCD: GRPO for a multi-turn LLM agent plus the generative classification task (Liu et al., "Gradient
Coupling: The Hidden Barrier to Generalization in Agentic Reinforcement Learning").

One concept per module:

    prompts      the paper's agent / critic / suggestion prompts; parse_action, parse_verdict
    policy       a causal LM + tokenizer: batched sampling with per-token log-probs, re-scoring
    envpool      environments in-process or one per worker process (ALFWorld, ScienceWorld)
    rollout      multi-turn episodes, N per task, invalid actions and format errors made explicit
    grpo         group-relative advantages, clipped policy-ratio loss, optional KL
    labels       good/bad labels for (state, action): repeat rule, success rule, external (LLM) labelers
    judge        generative judging of labeled steps and its GRPO samples (L_GCD)
    suggestions  GCD_sugg: judges' advice -> golden rules -> the agent prompt
    coupling     the gradient-coupling diagnostic (cosines between population mean gradients)
    tasks        L0 / L1 / L2 task splits per environment
    metrics      success per level, repeated / looped actions, response length
    modeling     loading the policy: hub / GGUF / SmolLM2 / tiny, LoRA, 4/8-bit; checkpoints
    config       GCDConfig (YAML + key=value overrides)
    update       one optimizer step on L_GRPO + L_GCD (packed or padded micro-batches, optional KL)
    trainer      the update loop (Accelerate, LoRA, mixed precision), evaluation, checkpoints / resume
    report       results.json + report.md + curves
    cli          `fastrank gcd coupling` / `fastrank gcd train` (add_gcd_args)
    tiny         a tiny random causal LM + byte-level BPE tokenizer for tests and CPU smoke runs

Nothing heavy is imported here: `import fastrank.gcd.prompts` must stay cheap.
"""
