"""The `<Arch>ForPromptScoring` pooling models that `scoring.vllm_plugin.register` names (vLLM 0.32 internals).

Imported only inside vLLM engine processes, when a scoring architecture is resolved. Each class is the
unchanged causal LM plus `PromptScoringPooler`; see scoring/vllm_plugin.py for the output contract.
"""

from __future__ import annotations

from collections.abc import Callable, Set

import torch
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.model_executor.layers.pooler.tokwise.methods import AllPool
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from scoring.stats import chunk_rows_for_budget
from scoring.vllm_plugin import CPU_LOGITS_BUDGET_BYTES, LOGITS_BUDGET_BYTES


def logprob_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, 2) float32 [log p(targets[i]), H(p)] for each row of `logits` (n, V), p = softmax(logits.float()), nats.

    With z = logits - max (per row), e = exp(z) and s = Σ_v e_v:

        log p(target) = z[target] - log s        H = -Σ_v p_v log p_v = log s - Σ_v e_v z_v / s

    One (n, V) tensor is allocated (e; z is `logits` itself, shifted in place when it is float32 already, and
    e·z overwrites e), so no log-probs or probabilities are materialised: on a CPU the passes over V, not the
    matmul, are the cost. The sums are torch's own reductions (Σ e·z as a dot product in float32 loses
    1e-4 nats over 50k terms; this stays within 1e-6). targets (n,) int64.
    """
    z = logits.float()  # (n, V) float32; the caller's tensor when already float32 (compute_logits output, discarded after)
    z.sub_(z.amax(dim=-1, keepdim=True))
    target = z.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    e = torch.exp(z)  # (n, V) in (0, 1]
    total = e.sum(-1)  # (n,) ≥ 1
    dot = e.mul_(z).sum(-1)  # (n,) Σ e·z ≤ 0
    log_total = torch.log(total)
    return torch.stack([target - log_total, log_total - dot / total], dim=-1)


class PromptScoringPooler(Pooler):
    """Pools every prompt position into [log p(next token), entropy] with the model's own output layer.

    AllPool gathers a prompt's hidden states across chunked-prefill steps; the prompts that finish in a
    step are then scored together, the output layer running over a chunk of positions at a time, so the
    float32 logits never exceed LOGITS_BUDGET_BYTES on a GPU, CPU_LOGITS_BUDGET_BYTES on a CPU (chunks that
    stay in the last-level cache: there the passes over V, not the matmul, decide). With tensor parallelism,
    `compute_logits` gathers to the first rank and returns None elsewhere; those ranks return NaN rows,
    which vLLM discards (only the first rank's output is returned).
    """

    def __init__(self, compute_logits: Callable[[torch.Tensor], torch.Tensor | None], vocab_size: int):
        super().__init__()
        self.all_pool = AllPool()
        self.compute_logits = compute_logits
        self.chunk_rows = {"cpu": chunk_rows_for_budget(vocab_size, CPU_LOGITS_BUDGET_BYTES), "gpu": chunk_rows_for_budget(vocab_size, LOGITS_BUDGET_BYTES)}

    def get_supported_tasks(self) -> Set[str]:
        return {"token_classify"}

    def get_pooling_updates(self, task: str) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)  # the targets are the prompt's next tokens

    def forward(self, hidden_states: torch.Tensor, pooling_metadata) -> list[torch.Tensor | None]:
        pooled = self.all_pool(hidden_states, pooling_metadata)  # per prompt: (L, D), None while unfinished
        finished = [i for i, hidden in enumerate(pooled) if hidden is not None]
        if not finished:
            return pooled
        prompt_ids = pooling_metadata.get_prompt_token_ids_cpu()
        hidden = torch.cat([pooled[i] for i in finished])  # (N, D), N = Σ L
        # Row t of a prompt predicts its token t+1; its last row has no target (placeholder 0, NaN below).
        targets = torch.cat([torch.cat([prompt_ids[i][1:], prompt_ids[i].new_zeros(1)]) for i in finished])
        rows = self._score_rows(hidden, targets.to(hidden.device, torch.long))  # (N, 2)
        lengths = [pooled[i].shape[0] for i in finished]
        rows[torch.tensor(lengths).cumsum(0) - 1, 0] = float("nan")
        for i, prompt_rows in zip(finished, rows.split(lengths)):
            pooled[i] = prompt_rows
        return pooled

    def _score_rows(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = torch.full((hidden.shape[0], 2), float("nan"), dtype=torch.float32, device=hidden.device)
        chunk_rows = self.chunk_rows["cpu" if hidden.device.type == "cpu" else "gpu"]
        for start in range(0, hidden.shape[0], chunk_rows):
            stop = start + chunk_rows
            logits = self.compute_logits(hidden[start:stop])  # (rows, V), scale and soft-cap applied
            if logits is not None:
                rows[start:stop] = logprob_entropy_rows(logits, targets[start:stop])
        return rows


class _PromptScoring:
    """Mixin: the causal LM, declared a pooling model, with PromptScoringPooler as its pooler."""

    is_pooling_model = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pooler = PromptScoringPooler(self.compute_logits, vllm_config.model_config.get_vocab_size())


class LlamaForPromptScoring(_PromptScoring, LlamaForCausalLM):
    pass


class MistralForPromptScoring(_PromptScoring, MistralForCausalLM):
    pass


class Qwen2ForPromptScoring(_PromptScoring, Qwen2ForCausalLM):
    pass


class Qwen3ForPromptScoring(_PromptScoring, Qwen3ForCausalLM):
    pass
