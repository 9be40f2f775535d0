"""Every Triton kernel of cir_kernels/ compiled for sm_80 (A100) and sm_90 (H100 / H200), every autotune
configuration, without a GPU (the interpreter does not type-check like the compiler: loop-carried
types, scalar branches, constexpr strings). Registers and spills per kernel come from ptxas -v.

    pytest tests/test_kernels_compile.py
    python tests/test_kernels_compile.py      # the registers / spills table of bench/RESULTS.md, then JSON
"""
import json
import sys

import pytest

from cir_kernels.batch_invariant_triton import BLOCK_K, BLOCK_M, BLOCK_N
from cir_kernels.linear_logprobs_triton import _DZ_CONFIGS, _GROUP_M, _LSE_CONFIGS

F, BF, I32, I64 = "*fp32", "*bf16", "*i32", "*i64"
ARCHS = [80, 90]


def _sampler() -> list:
    row = dict(logits_ptr=BF, logits_row_stride="i64", temperature_ptr=F)
    params = dict(top_p_ptr=F, top_k_ptr=I64, min_p_ptr=F, seed_ptr=I64)
    out = dict(tokens_ptr=I64, logprobs_ptr=F)
    warps = {"num_warps": 4}
    return [
        ("_stats_kernel", {**row, **params, "part_f_ptr": F, "part_i_ptr": I32, "state_f_ptr": F, "state_i_ptr": I64,
                           "counter_ptr": I32, **out, "V": "i32", "chunk": "i32", "num_splits": "i32"},
         {"BLOCK_V": 1024, "BLOCK_S": 128}, warps),
        ("_refine_kernel", {**row, **params, "count_part_ptr": I32, "mass_part_ptr": F, "part_f_ptr": F,
                            "part_i_ptr": I32, "buf_x_ptr": F, "buf_i_ptr": I32, "state_f_ptr": F, "state_i_ptr": I64,
                            "counter_ptr": I32, "cursor_ptr": I32, **out, "V": "i32", "chunk": "i32",
                            "num_splits": "i32", "cap": "i32", "max_passes": "i32", "num_passes": "i32",
                            "chunks_per_program": "i32", "num_programs": "i32"},
         {"NUM_PIVOTS": 32, "BLOCK_V": 128, "BLOCK_S": 128}, warps),
        ("_race_kernel", {**row, "min_p_ptr": F, "seed_ptr": I64, "part_f_ptr": F, "part_i_ptr": I32,
                          "state_f_ptr": F, "state_i_ptr": I64, "counter_ptr": I32, **out, "V": "i32", "chunk": "i32",
                          "num_splits": "i32"},
         {"BLOCK_V": 1024, "BLOCK_S": 128}, warps),
    ]


def _logprobs() -> list:
    kernels = []
    for z in (BF, F):  # logprobs_from_logits on bf16 logits; linear_logprobs(fused=False) on fp32 chunks
        kernels.append(("_lse_update_kernel",
                        {"z_ptr": z, "z_row_stride": "i64", "targets_ptr": I64, "state_ptr": F, "num_rows": "i32",
                         "num_cols": "i32", "col_start": "i32", "inv_t": "fp32"},
                        {"BLOCK_V": 2048}, {"num_warps": 8}))
        for entropy in (False, True):
            kernels.append(("_logits_grad_kernel",
                            {"z_ptr": z, "z_row_stride": "i64", "out_ptr": z, "out_row_stride": "i64",
                             "targets_ptr": I64, "lse_ptr": F, "mean_z_ptr": F, "grad_logp_ptr": F,
                             "grad_entropy_ptr": F, "num_cols": "i32", "col_start": "i32", "inv_t": "fp32"},
                            {"HAS_GRAD_ENTROPY": entropy, "BLOCK_V": 2048}, {"num_warps": 8}))
    return kernels


def _linear_logprobs() -> list:
    gemm = {"h_ptr": BF, "h_stride": "i32", "w_ptr": BF, "w_stride": "i32"}
    kernels = []
    for m, n, k, warps, stages in _LSE_CONFIGS:  # every autotune configuration, the bf16 (tensor-core) path
        kernels.append(("_lse_gemm_kernel", {**gemm, "part_ptr": F, "num_rows": "i32", "vocab_size": "i32",
                                             "hidden_size": "i32", "cols_per_split": "i32", "num_splits": "i32",
                                             "inv_t": "fp32", "rows_bucket": "i32"},
                        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "DOT_FP32": False},
                        {"num_warps": warps, "num_stages": stages}))
    for m, n, k, warps, stages in _DZ_CONFIGS:
        kernels.append(("_dz_gemm_kernel", {**gemm, "dz_ptr": BF, "dz_stride": "i32", "targets_ptr": I64, "lse_ptr": F,
                                            "mean_z_ptr": F, "grad_logp_ptr": F, "grad_entropy_ptr": F,
                                            "num_rows": "i32", "num_cols": "i32", "hidden_size": "i32",
                                            "col_start": "i32", "inv_t": "fp32", "rows_bucket": "i32"},
                        {"HAS_GRAD_ENTROPY": True, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": _GROUP_M,
                         "DOT_FP32": False}, {"num_warps": warps, "num_stages": stages}))
    kernels.append(("_target_logit_kernel", {**gemm, "targets_ptr": I64, "out_ptr": F, "vocab_size": "i32",
                                             "hidden_size": "i32", "inv_t": "fp32"},
                    {"BLOCK_D": 1024}, {"num_warps": 4}))
    return kernels


def _paged_attention() -> list:
    strides = {k: "i32" for k in ("q_stride_t", "q_stride_h", "cache_stride_block", "cache_stride_tok",
                                  "cache_stride_head", "out_stride_split", "out_stride_t", "out_stride_h",
                                  "lse_stride_split", "lse_stride_t", "block_tables_stride_b")}
    kernels = []
    # decode (BLOCK_M 16: one token x a group of 7 heads, Qwen2.5-7B) and prefill tiles, one or many KV splits
    for block_m, splits in ((16, 1), (16, 8), (64, 1), (64, 8)):
        kernels.append(("_paged_attention_kernel",
                        {"q_ptr": BF, "k_cache_ptr": BF, "v_cache_ptr": BF, "out_ptr": BF if splits == 1 else F,
                         "lse_ptr": F, "cu_seqlens_q_ptr": I32, "block_tables_ptr": I32, "seq_lens_ptr": I32,
                         "scale_log2": "fp32", **strides},
                        {"HEAD_DIM": 128, "GROUP": 7, "BLOCK_SIZE": 16, "BLOCK_M": block_m, "BLOCK_N": 64,
                         "BLOCK_D": 128, "NUM_SPLITS": splits, "MIN_SPLIT_LEN": 256, "DOT_FP32": False},
                        {"num_warps": 4}))
    kernels.append(("_combine_splits_kernel",
                    {"partial_ptr": F, "lse_ptr": F, "out_ptr": BF, **{k: "i32" for k in (
                        "partial_stride_split", "partial_stride_t", "partial_stride_h", "lse_stride_split",
                        "lse_stride_t", "out_stride_t", "out_stride_h")}},
                    {"HEAD_DIM": 128, "NUM_SPLITS": 8, "BLOCK_S": 8, "BLOCK_D": 128}, {"num_warps": 4}))
    kernels.append(("_store_kv_kernel",
                    {"k_ptr": BF, "v_ptr": BF, "k_cache_ptr": BF, "v_cache_ptr": BF, "slot_mapping_ptr": I64,
                     "k_stride_t": "i32", "k_stride_h": "i32", "v_stride_t": "i32", "v_stride_h": "i32"},
                    {"NUM_HEADS": 4, "HEAD_DIM": 128, "BLOCK_H": 4, "BLOCK_D": 128}, {"num_warps": 4}))
    return kernels


def _batch_invariant() -> list:
    strides = {f"{t}_stride_{d}": "i64" for t, dims in (("a", "bmk"), ("b", "bkn"), ("out", "bmn")) for d in dims}
    return [("_bmm_kernel", {"a_ptr": "*" + dtype, "b_ptr": "*" + dtype, "out_ptr": F, "M": "i32", "N": "i32",
                             "K": "i32", **strides},
             {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "IEEE": ieee},
             {"num_warps": 4, "num_stages": 3})
            for dtype, ieee in (("fp32", True), ("bf16", False))]


KERNELS = {
    "cir_kernels.sampling_triton": _sampler,
    "cir_kernels.logprobs_triton": _logprobs,
    "cir_kernels.linear_logprobs_triton": _linear_logprobs,
    "cir_kernels.paged_attention_triton": _paged_attention,
    "cir_kernels.batch_invariant_triton": _batch_invariant,
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", list(KERNELS))
def test_every_kernel_compiles(compile_cuda, module, arch):
    kernels = KERNELS[module]()
    report = compile_cuda(module, kernels, arch)
    assert [r["kernel"] for r in report] == [k[0] for k in kernels]
    assert all(r["registers"] > 0 for r in report), report


def test_every_triton_kernel_is_listed():
    """A kernel added to a *_triton.py file must be added here too."""
    import importlib

    for module, specs in KERNELS.items():  # @triton.jit objects (interpreted or not) carry arg_names
        jitted = {name for name, obj in vars(importlib.import_module(module)).items()
                  if name.endswith("_kernel") and hasattr(obj, "arg_names")}
        assert jitted == {k[0] for k in specs()}, (module, jitted)


if __name__ == "__main__":
    from conftest import compile_kernels

    rows = []
    print("| arch | kernel | constexprs | warps / stages | registers | spill bytes |\n|---|---|---|---|---|---|")
    for arch in ARCHS:
        for module, specs in KERNELS.items():
            for r in compile_kernels(module, specs(), arch):
                consts = ", ".join(f"{k}={v}" for k, v in r["constants"].items())
                opts = f"{r['options'].get('num_warps')} / {r['options'].get('num_stages', '-')}"
                print(f"| sm_{arch} | {module.split('.')[-1]}.{r['kernel']} | {consts} | {opts} | {r['registers']} "
                      f"| {r['spill_bytes']} |", flush=True)
                rows.append({"arch": arch, "module": module, **r})
    print(json.dumps({"compiled": len(rows), "spilling": sum(r["spill_bytes"] > 0 for r in rows)}))
    sys.exit(0)
