"""Self-speculative decoding: a looped model drafting with n < L loops and verifying at L, against plain decoding.

Every row decodes the same greedy continuation of the same prompts (checked before timing), ``--samples``
batches of ``--batch`` prompts one after another (a text's acceptance varies: a run of blank lines drafts
perfectly, code less so); the rows are
timed alternately, round after round, in one process (medians; each row leads a round in turn):

* ``plain (L)``: ``LoopedTransformer.generate``, every token through all L loops, one position per step;
* ``draft n, k tokens``: ``generate(..., draft_loops=n, draft_tokens=k)`` (``looped/decoding/speculative.py``):
  each round the first n loops draft k tokens one at a time in the model's own cache slots, then loops
  n+1..L verify the draft's states in one pass over k + 1 positions; its acceptance rate (draft tokens the
  full model agreed with) is printed beside its speed;
* ``transformers assistant n`` (with the ``[hf]`` extra, ``--hf``): ``generate(assistant_model=
  model.draft_model(n))`` on the exported model, ``transformers``' assisted decoding with the same weights at
  n loops as the assistant (its own cache: loops 1..n run twice), against ``transformers generate`` plain.

A trained model is what makes the acceptance mean something: ``--checkpoint`` loads one (a ``.ckpt`` of
``looped run``, e.g. ``recipes/lm/cpu_1x4.yaml``) and ``--prompts`` reads prompts from a prepared dataset's
held-out split; without them a random model of the flags' size (the toy run) drafts badly.

    python benchmarks/self_speculative.py --checkpoint runs/lm/cpu_1x4/version_0/checkpoints/last.ckpt \\
        --prompts data/stdlib --hf

The last line is the best row's tokens/s ratio to plain decoding, with its acceptance rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from decode import build_model, held_out_prompts  # benchmarks/decode.py: the same model and prompts

from looped.decoding.speculative import SelfSpeculativeDecoder
from looped.model.cache import DecodeCache


def acceptance(model, prompts: list[torch.Tensor], new_tokens: int, draft_loops: int, draft_tokens: int) -> float:
    """The share of draft tokens the full model agreed with, decoding every prompt (one untimed run)."""
    drafted = accepted = 0
    for prompt in prompts:
        cache = DecodeCache(prompt.shape[1] + new_tokens)
        decoder = SelfSpeculativeDecoder(model, draft_loops, model.config.loops, cache, draft_tokens)
        first = model(prompt, cache=cache)[:, -1].argmax(-1)
        decoder.decode(first, new_tokens, None, None)
        drafted, accepted = drafted + decoder.drafted, accepted + decoder.accepted
    return accepted / max(drafted, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a trained model's .ckpt (its config replaces the size flags)")
    parser.add_argument("--prompts", help="a prepared dataset folder: prompts from its held-out split")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--block-layers", type=int, default=1, help="k")
    parser.add_argument("--loops", type=int, default=4, help="L")
    parser.add_argument("--attention", default="softmax")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8, help="batches decoded one after another per row")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[3, 6], help="k: draft tokens per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hf", action="store_true", help="also time transformers' assisted decoding")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = build_model(args)
    config = model.config
    count = args.samples * args.batch
    if args.prompts:
        prompt = held_out_prompts(args.prompts, count, args.prompt_len).to(args.device)
    else:
        prompt = torch.randint(0, config.vocab_size, (count, args.prompt_len), device=args.device)
    prompts = list(prompt.split(args.batch))  # a text's acceptance varies: several texts, each its own batch
    new = args.new_tokens

    def each(decode) -> torch.Tensor:
        return torch.cat([decode(p) for p in prompts])

    methods = {"plain (L)": lambda: each(lambda p: model.generate(p, new))}
    accepted: dict[str, float] = {}
    with torch.inference_mode():
        for n in range(1, config.loops):
            for k in args.draft_tokens:
                name = f"draft {n}, {k} tokens"
                methods[name] = lambda n=n, k=k: each(lambda p: model.generate(p, new, draft_loops=n, draft_tokens=k))
                accepted[name] = acceptance(model, prompts, new, n, k)
    if args.hf:
        from looped.hf import from_looped

        hf = from_looped(model).eval()
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        methods["transformers generate"] = lambda: each(
            lambda p: hf.generate(p, attention_mask=torch.ones_like(p), **kwargs)
        )
        for n in range(1, config.loops):
            draft = hf.draft_model(n)
            methods[f"transformers assistant {n}"] = lambda d=draft: each(
                lambda p: hf.generate(p, attention_mask=torch.ones_like(p), assistant_model=d, **kwargs)
            )
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        outputs = {name: fn() for name, fn in methods.items()}  # warm up, and the check
        for name in methods:
            assert torch.equal(outputs[name], outputs["plain (L)"]), f"{name} decoded other tokens than plain decoding"
        order = list(methods.items())
        for r in range(args.rounds):
            for name, fn in order[r % len(order) :] + order[: r % len(order)]:  # each row leads in turn
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    print(
        f"cpu, {torch.get_num_threads()} threads, fp32; ({config.block_layers}⊗{config.loops}) {config.attention}, "
        f"d_model {config.d_model}, vocab {config.vocab_size}, {args.samples} × batch {args.batch}, "
        f"prompt {args.prompt_len} + "
        f"{new} new tokens{', trained: ' + args.checkpoint if args.checkpoint else ' (random weights)'}; "
        f"median of {args.rounds} rounds"
    )
    rate = {name: count * new / statistics.median(t) for name, t in times.items()}
    print(f"{'method':<28} {'s':>7} {'tokens/s':>9} {'vs plain':>9} {'acceptance':>11}")
    for name, t in times.items():
        base = rate["transformers generate"] if name.startswith("transformers assistant") else rate["plain (L)"]
        share = f"{accepted[name]:>10.0%}" if name in accepted else ""
        print(f"{name:<28} {statistics.median(t):>7.2f} {rate[name]:>9.0f} {rate[name] / base:>9.2f} {share:>11}")
    best = max(accepted, key=lambda name: rate[name])
    print(
        f"best self-speculative ({best}) / plain L={config.loops} tokens/s ratio: "
        f"{rate[best] / rate['plain (L)']:.2f} at {accepted[best]:.0%} acceptance"
    )


if __name__ == "__main__":
    main()
