"""Peak memory (and time) of the lm_head + log-prob step, forward AND backward: chunked vs naive.

  naive        logits = hidden @ W^T -> .float() -> log_softmax -> gather    (float32 [T, V] materialized)
  chunk-<c>    model.py's own code path (model._token_logprobs, what response_logprobs runs after the decoder):
               chunks of c tokens, each under torch.utils.checkpoint, so backward recomputes one chunk at a time
hidden [T, d] and W [V, d] are leaves that require grad (W is the tied embedding: it gets a gradient in training).
Peak = memory above what was allocated before the first forward (hidden, W, targets): torch.cuda on GPU,
ru_maxrss in a fresh process per variant on CPU (plus an analytic estimate, since CPU RSS is coarse).

  python bench/logprob_memory.py --device cpu                 # T=1024, d=256, chunks 256 and 64 (CPU-sized)
  python bench/logprob_memory.py --device cpu --cpu-full      # T=8192, chunk 2048 (about 15 GB of RAM)
  python bench/logprob_memory.py --device cuda                # T=8192, V=151936, d=1536, bf16
"""

from __future__ import annotations

import argparse
import types

import torch

import common


def naive_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()  # [T, V] float32
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [T]


class _HeadOnly(torch.nn.Module):
    """The two methods model._token_logprobs calls on a causal LM, around a fixed hidden-state tensor."""

    def __init__(self, hidden, head):
        super().__init__()
        self.hidden, self.head = hidden, head

    def get_decoder(self):
        return lambda **_: types.SimpleNamespace(last_hidden_state=self.hidden.unsqueeze(0))  # [1, T, d]

    def get_output_embeddings(self):
        return self.head


def analytic_bytes(variant: str, T: int, V: int, d: int, elt: int) -> int:
    """Rough peak above the inputs. In backward of log_softmax three float32 [n, V] tensors are alive at once
    (the saved log-softmax, the gather's gradient, log_softmax's input gradient; n = T naive, n = c chunked),
    plus grad hidden [T, d] and grad W [V, d] -- twice for chunked: each chunk's dW is summed into a buffer."""
    n = T if variant == "naive" else min(T, int(variant.split("-")[1]))
    return 3 * 4 * n * V + (1 if variant == "naive" else 2) * V * d * elt + T * d * elt


def measure(variant: str, args) -> dict:
    import model as M

    dev, dtype = args.device, getattr(torch, args.dtype)
    T, V, d = args.tokens, args.vocab, args.hidden
    torch.manual_seed(0)  # W's init uses the global generator: same inputs in every variant's process
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(T, d, device=dev, generator=gen) * 1.0).to(dtype).requires_grad_(True)
    head = torch.nn.Linear(d, V, bias=False, device=dev, dtype=dtype)
    torch.nn.init.normal_(head.weight, std=0.02)
    targets = torch.randint(0, V, (T,), device=dev, generator=gen)
    shim, index = _HeadOnly(hidden, head), torch.arange(T, device=dev)

    if variant == "naive":
        fn = lambda: naive_logprobs(hidden, head.weight, targets)  # noqa: E731
    else:
        c = int(variant.split("-")[1])
        fn = lambda: M._token_logprobs(shim, None, None, None, None, None, index, targets, 1.0, False, c)[0]  # noqa: E731

    def step():
        hidden.grad = head.weight.grad = None
        logp = fn()
        logp.sum().backward()
        return logp

    mem = common.MemoryProbe(dev).start()  # baseline: hidden, W, targets (no grads yet)
    times = common.time_fn(step, dev, args.warmup, args.iters)
    peak = mem.stop()
    with torch.no_grad():
        logp_ref = fn()  # the value, to check that every variant computes the same log-probs
    out = {
        "variant": variant,
        "tokens": T,
        "vocab": V,
        "hidden": d,
        "dtype": args.dtype,
        "times_s": times,
        "median_s": common.median(times),
        **peak,
        "analytic_bytes": analytic_bytes(variant, T, V, d, hidden.element_size()),
        "logp_mean": logp_ref.float().mean().item(),
    }
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--tokens", type=int, default=None, help="T (default 8192 on cuda or with --cpu-full, else 1024)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=None, help="d (default 1536 on cuda or with --cpu-full, else 256)")
    p.add_argument("--chunk-sizes", default=None, help="comma list (default 2048,512 on cuda, 256,64 on cpu)")
    p.add_argument(
        "--dtype", default=None, help="compute dtype of hidden and W (default bfloat16 on cuda, float32 on cpu)"
    )
    p.add_argument("--cpu-full", action="store_true", help="the GPU sizes on CPU (naive needs ~15 GB)")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    big = gpu or args.cpu_full
    args.tokens = args.tokens or (8192 if big else 1024)
    args.hidden = args.hidden or (1536 if big else 256)
    args.chunk_sizes = args.chunk_sizes or ("2048,512" if big else "256,64")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.worker:
        return common.worker_main(args, measure)

    variants = ["naive"] + [f"chunk-{int(c)}" for c in args.chunk_sizes.split(",") if c]
    res = common.run_variants(__file__, variants, args.variant_timeout)
    naive = res["naive"].get("peak_bytes")
    rows = []
    for v, r in res.items():
        r.setdefault("variant", v)
        if naive and r.get("peak_bytes"):
            r["reduction_vs_naive"] = naive / r["peak_bytes"]
            r["time_vs_naive"] = r["median_s"] / res["naive"]["median_s"]
            r["analytic_reduction_vs_naive"] = res["naive"]["analytic_bytes"] / r["analytic_bytes"]
        rows.append(
            r
            | {
                "peak_gib": r.get("peak_bytes", 0) / common.GiB if "peak_bytes" in r else None,
                "analytic_gib": r["analytic_bytes"] / common.GiB if "analytic_bytes" in r else None,
            }
        )
    print(
        f"\nT={args.tokens} V={args.vocab} d={args.hidden} {args.dtype}, forward+backward, "
        f"{common.device_name(args.device)}\n"
    )
    print(
        common.table(
            rows,
            [
                ("variant", "variant", ""),
                ("peak_gib", "peak GiB (measured)", ".3f"),
                ("analytic_gib", "peak GiB (analytic)", ".3f"),
                ("reduction_vs_naive", "x lower than naive", ".2f"),
                ("analytic_reduction_vs_naive", "x lower (analytic)", ".2f"),
                ("median_s", "s/iter", ".3f"),
                ("time_vs_naive", "time vs naive", ".2f"),
                ("error", "error", ""),
            ],
        )
    )
    common.write_results("logprob_memory", args, res)


if __name__ == "__main__":
    main()
