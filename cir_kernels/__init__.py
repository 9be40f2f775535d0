"""cir_kernels: standalone Triton kernels with a plain-torch twin each (imports torch and triton only).

    from cir_kernels import sample, linear_logprobs, logprobs_from_logits, paged_attention

Every public function takes `backend=None | "triton" | "torch"`: None sends CUDA tensors to the
Triton kernels and CPU tensors to the torch twin (same math); "triton" on CPU tensors runs the
kernels through Triton's interpreter (TRITON_INTERPRET=1), which is how the tests reach them.
One layout for every kernel X: X.py the public API (argument checks from _checks.py, then
`_checks.pick_backend`, the one backend picker), X_triton.py the Triton kernels and their launchers,
X_reference.py the plain-torch twin (it never imports the Triton file).
- sampling.py / sampling_triton.py (+ device functions sampling_select.py, sampling_race.py,
  sampling_state.py) /
  sampling_reference.py: per-row temperature / top-k / top-p / min-p sampling
- logprobs.py / logprobs_triton.py / logprobs_reference.py: online log-sum-exp row operations,
  `logprobs_from_logits`
- linear_logprobs.py / linear_logprobs_triton.py / linear_logprobs_reference.py: LM head +
  log-softmax + gather fused over vocabulary chunks
- paged_attention.py / paged_attention_triton.py / paged_attention_reference.py: attention of varlen
  queries over a paged KV cache, and the KV write into it (`store_kv`)
- batch_invariant.py / batch_invariant_triton.py / batch_invariant_reference.py: the exact mode's
  ops (each row's bits independent of the batch); batch_invariant_logprobs.py: its log-probs
"""
from cir_kernels.linear_logprobs import linear_logprobs
from cir_kernels.linear_logprobs_reference import linear_logprobs_reference
from cir_kernels.logprobs import logprobs_from_logits
from cir_kernels.paged_attention import paged_attention, store_kv
from cir_kernels.paged_attention_reference import paged_attention_reference, plan_reference
from cir_kernels.sampling import sample
from cir_kernels.sampling_reference import sample_reference

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
