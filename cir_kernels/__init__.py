"""cir_kernels: standalone Triton kernels with a plain-torch reference each (imports torch and triton only).

    from cir_kernels import sample, linear_logprobs, logprobs_from_logits, paged_attention

CUDA tensors go to the Triton kernels, CPU tensors to the torch references (same math); the
`backend="triton" | "torch"` keyword forces one (Triton on CPU needs TRITON_INTERPRET=1).
- sampling.py (+ sampling_triton.py, sampling_select.py) / sampling_reference.py: per-row temperature /
  top-k / top-p / min-p sampling
- logprobs.py: online log-sum-exp row kernels, `logprobs_from_logits`
- linear_logprobs.py: LM head + log-softmax + gather fused over vocabulary chunks
- paged_attention.py / paged_attention_reference.py: attention of varlen queries over a paged KV
  cache, and the KV write into it (`store_kv`)
"""
from cir_kernels.linear_logprobs import linear_logprobs, linear_logprobs_reference
from cir_kernels.logprobs import logprobs_from_logits
from cir_kernels.sampling import sample
from cir_kernels.sampling_reference import sample_reference

from cir_kernels.paged_attention import paged_attention, store_kv
from cir_kernels.paged_attention_reference import paged_attention_reference, plan_reference

__all__ = [
    "linear_logprobs",
    "linear_logprobs_reference",
    "logprobs_from_logits",
    "paged_attention",
    "paged_attention_reference",
    "plan_reference",
    "sample",
    "sample_reference",
    "store_kv",
]
