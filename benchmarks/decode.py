"""Generation speed: cached incremental decoding vs re-running the full forward for every token, and
``transformers``' ``generate`` on the exported model vs ours.

All decode the same greedy continuation of the same prompts with a ``(k⊗L)``
model; they are timed alternately, round after round, in one process (medians; each
method starts a round in turn), so machine noise hits them alike:

* ``cached``: ``LoopedTransformer.generate`` — one prefill forward fills a
  ``DecodeCache`` (one slot per layer application), then one position per step;
* ``full``: the forward over the whole growing sequence for every new token,
  argmax of the last position (what decoding costs without a cache);
* ``transformers``: the model exported (``looped.hf``, saved and loaded back with
  ``AutoModelForCausalLM``) decoding with ``generate(do_sample=False)``: its ``LoopedCache``
  holds the same ``DecodeCache``, so the difference is ``generate``'s own per-step work
  (with the ``[hf]`` extra; skipped without it).

    python benchmarks/decode.py [--attention linear]

The last two lines are the ratios of tokens/s, cached / full and transformers / ours (cached).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time

import torch

from looped import LoopedConfig, LoopedTransformer


def cached(model: LoopedTransformer, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, new_tokens)


def full(model: LoopedTransformer, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    seq = prompt
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def exported(model: LoopedTransformer, device: str):
    """The model through ``looped.hf``: saved as a ``transformers`` folder and loaded back with the Auto class."""
    from transformers import AutoModelForCausalLM

    from looped.hf import from_looped

    with tempfile.TemporaryDirectory() as folder:
        from_looped(model).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder).eval().to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--block-layers", type=int, default=2, help="k")
    parser.add_argument("--loops", type=int, default=3, help="L")
    parser.add_argument("--attention", default="softmax", help="mixer name (softmax, linear, sparse)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)

    config = LoopedConfig(
        vocab_size=args.vocab,
        max_seq_len=args.prompt_len + args.new_tokens,
        d_model=args.d_model,
        n_heads=8,
        d_ff=4 * args.d_model,
        block_layers=args.block_layers,
        loops=args.loops,
        attention=args.attention,
    )
    model = LoopedTransformer(config).eval().to(args.device)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    methods = {"cached (generate)": cached, "full forward per token": full}
    if importlib.util.find_spec("transformers") is not None:
        hf = exported(model, args.device)
        methods["transformers generate"] = lambda _, prompt, n: hf.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        outputs = [fn(model, prompt, 4) for fn in methods.values()]  # warm up
        assert all(torch.equal(outputs[0], out) for out in outputs), "the decoders disagree"
        order = list(methods.items())
        for r in range(args.rounds):
            for name, fn in order[r % len(order) :] + order[: r % len(order)]:  # each method leads in turn
                sync()
                start = time.perf_counter()
                fn(model, prompt, args.new_tokens)
                sync()
                times[name].append(time.perf_counter() - start)

    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"{device}, fp32; ({args.block_layers}⊗{args.loops}) {args.attention}, "
        f"d_model {args.d_model}, batch {args.batch}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
        f"vocab {args.vocab}; median of {args.rounds} rounds"
    )
    tokens = args.batch * args.new_tokens
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"{'method':<24} {'s':>8} {'tokens/s':>10}")
    for name, t in times.items():
        print(f"{name:<24} {statistics.median(t):>8.2f} {rate[name]:>10.0f}")
    print(f"cached / full generation tokens/s ratio: {rate['cached (generate)'] / rate['full forward per token']:.2f}")
    if "transformers generate" in rate:
        ratio = rate["transformers generate"] / rate["cached (generate)"]
        print(f"transformers generate / our generate tokens/s ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
