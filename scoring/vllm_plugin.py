"""vLLM model plugin: exact per-token log-prob and entropy computed inside the engine (vLLM 0.32 internals).

vLLM has no built-in prompt entropy (prompt_logprobs returns top-k log-probs only). This plugin registers, for each supported
architecture `<Arch>ForCausalLM`, a pooling model `<Arch>ForPromptScoring`: the unchanged causal LM whose
pooler runs the model's own output layer (`compute_logits`: lm_head, logit scale and soft-cap) in float32
over every prompt position, in chunks, and returns per prompt of length L a float32 (L, 2) tensor

    row t = [ log p(x_{t+1} | x_<=t),  H(p(. | x_<=t)) ]      (nats; row L-1 has no target: NaN)

so only 8 bytes per token leave the engine. `scoring.vllm_backend` shifts it to the shard layout.

vLLM loads this file in every engine process through the `vllm.general_plugins` entry point
`tokenprio_scoring = "scoring.vllm_plugin:register"` (pyproject.toml): registering the models in the
driver alone fails in the multiprocess engine, whose workers could not resolve the architecture.
The pooler API used here (`Pooler`, `AllPool`, `PoolingMetadata`) is internal and moves between vLLM
minors; the vLLM parity tests (tests/test_vllm_backend.py) catch that.
"""

from __future__ import annotations

# Architectures whose vLLM causal-LM class is subclassed below; Mistral checkpoints with a Llama layout
# load through vLLM's own MistralForCausalLM, which is a LlamaForCausalLM.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

LOGITS_BUDGET_BYTES = 256 * 2**20  # float32 logits held at once per chunk inside the engine (GPU)
CPU_LOGITS_BUDGET_BYTES = 24 * 2**20  # on a CPU: about a last-level cache (128 rows of a 50,257-token vocabulary)


def scoring_architecture(architecture: str) -> str:
    """The registered pooling architecture for a causal LM's `architectures[0]`, e.g. LlamaForPromptScoring."""
    return architecture.removesuffix("ForCausalLM") + "ForPromptScoring"


def register() -> None:
    """Entry point of `vllm.general_plugins`: register every `<Arch>ForPromptScoring` lazily (by name)."""
    from vllm import ModelRegistry

    for architecture in SUPPORTED_ARCHITECTURES:
        name = scoring_architecture(architecture)
        ModelRegistry.register_model(name, f"scoring.vllm_models:{name}")
