"""Generation speed: cached incremental decoding vs re-running the full forward for every token,
``transformers``' ``generate`` on the exported model vs ours, per-token adaptive depth vs fixed L, and
recursive KV sharing vs a cache slot per layer application.

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
  (with the ``[hf]`` extra; skipped without it);
* ``exit RULE`` (``--exit gate_0.5 entropy_2``): ``generate(exit=RULE)``, every new token stopping at
  its own loop, a token's rows looping together and stopped rows leaving the batch (the synchronous
  schedule, ``looped/decoding/per_token.py``), and ``exit RULE depthwise``: the same tokens with each row
  at its own token and loop (depth-wise batching, ``looped/decoding/depthwise.py``); their mean loops per
  token are printed beside their speed, and their ratio to ``cached`` against ``L / mean loops``;
* ``kv shared`` / ``kv per application``: the same weights decoding with ``kv_sharing`` on and off
  (Mixture-of-Recursions' recursive KV sharing: one cache slot per block layer), with the bytes
  each cache holds. The flipped one computes a different function; this row measures cost only.

A trained model makes the adaptive rows mean something: ``--checkpoint`` loads one (a ``.ckpt`` of
``looped run``, e.g. ``recipes/lm/cpu_1x4_exit.yaml``) and ``--prompts`` reads its prompts from a
prepared dataset's held-out split (``data/stdlib``) instead of random tokens.

    python benchmarks/decode.py [--attention linear]
    python benchmarks/decode.py --checkpoint runs/lm/cpu_1x4_exit/version_0/checkpoints/last.ckpt \
        --prompts data/stdlib --batch 8 --exit gate_0.5 gate_0.7 entropy_2

The prompt is read at full depth whatever the rule (one parallel forward), so the adaptive rows also
print *decode* tokens/s: the tokens after the first over the time after the prefill (the prefill,
``prefill``, is timed in the same rounds). That is the rate per-token exit changes, the one compared
with L / mean loops (the mean counts decoded tokens only).

The last lines are the ratios of tokens/s: cached / full, transformers / ours, each exit rule /
fixed L (end to end, and decoding alone), and KV shared / per application.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

from looped import LoopedConfig, LoopedTransformer
from looped.decoding.greedy import SCHEDULES
from looped.model.cache import DecodeCache


def cached(model: LoopedTransformer, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, new_tokens)


def prefill(model: LoopedTransformer, prompt: torch.Tensor, new_tokens: int) -> None:
    """The prompt's forward into a fresh cache: what every decoding below starts with."""
    model(prompt, cache=DecodeCache(prompt.shape[1] + new_tokens))


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


def build_model(args: argparse.Namespace) -> LoopedTransformer:
    """The trained transformer a ``looped run`` checkpoint holds, or a fresh one of the flags' size."""
    if args.checkpoint:
        from looped.tools.export import looped_weights, read_checkpoint

        config, weights = looped_weights(read_checkpoint(Path(args.checkpoint)), Path(args.checkpoint))
        model = LoopedTransformer(config)
        model.load_state_dict(weights)
    else:
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
        model = LoopedTransformer(config)
    return model.eval().to(args.device)


def held_out_prompts(folder: str, batch: int, length: int) -> torch.Tensor:
    """``[batch length]`` consecutive token windows of a prepared dataset's held-out split (``looped prepare``)."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    data = StreamingDataset(str(Path(folder) / "val"), item_loader=TokensLoader(block_size=length))
    stride = max(1, len(data) // batch)  # spread over the split, not one file
    return torch.stack([data[i * stride] for i in range(batch)]).long()


def flipped_kv_sharing(model: LoopedTransformer) -> LoopedTransformer:
    """The same weights with ``kv_sharing`` the other way round."""
    config = dataclasses.replace(model.config, kv_sharing=not model.config.kv_sharing)
    other = LoopedTransformer(config).to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict())
    return other.eval()


def cache_bytes(model: LoopedTransformer, prompt: torch.Tensor, new_tokens: int) -> int:
    """Bytes the decode cache of a generation of ``new_tokens`` holds (its buffers are made at full length)."""
    cache = DecodeCache(prompt.shape[1] + new_tokens)
    model(prompt, cache=cache)
    return cache.nbytes


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
    parser.add_argument("--checkpoint", help="a trained model's .ckpt (its config replaces the size flags)")
    parser.add_argument("--prompts", help="a prepared dataset folder: prompts from its held-out split")
    parser.add_argument("--exit", nargs="*", default=[], help="adaptive-depth rules to time (gate_0.5, entropy_2)")
    parser.add_argument(
        "--schedules",
        nargs="*",
        choices=SCHEDULES,
        default=list(SCHEDULES),
        help="how the adaptive rows share the block",
    )
    parser.add_argument("--no-full", action="store_true", help="skip the full forward per token (the slowest row)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers row")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = build_model(args)
    config = model.config
    if args.prompt_len + args.new_tokens > config.max_seq_len:
        parser.error(f"--prompt-len + --new-tokens exceed the model's max_seq_len {config.max_seq_len}")
    if args.prompts:
        prompt = held_out_prompts(args.prompts, args.batch, args.prompt_len).to(args.device)
    else:
        prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    methods = {"cached (generate)": cached} | ({} if args.no_full else {"full forward per token": full})
    exact = list(methods)  # these must decode the same tokens
    mean_loops: dict[str, float] = {}
    for rule in args.exit:
        with torch.inference_mode():
            decoded = {s: model.generate(prompt, args.new_tokens, exit=rule, schedule=s) for s in args.schedules}
            loops = model.generate(prompt, args.new_tokens, exit=rule, return_loops=True).loops
        assert all(torch.equal(d, next(iter(decoded.values()))) for d in decoded.values()), "the schedules disagree"
        for schedule in args.schedules:
            name = f"exit {rule}" + ("" if schedule == "synchronous" else f" {schedule}")
            methods[name] = lambda model, prompt, n, rule=rule, s=schedule: model.generate(
                prompt, n, exit=rule, schedule=s
            )
            mean_loops[name] = loops[:, 1:].float().mean().item()  # the decoded tokens (the first is the prefill's)
    if mean_loops:
        methods["prefill"] = prefill
    kv_bytes: dict[str, int] = {}  # the cached row's cache and that of the same weights, kv_sharing flipped
    if all(layer.attn.kv_cache for layer in model.block) and config.loops > 1:
        other = flipped_kv_sharing(model)
        flipped = "kv per application" if config.kv_sharing else "kv shared"
        methods[flipped] = lambda _, prompt, n: other.generate(prompt, n)
        with torch.inference_mode():
            kv_bytes = {
                "cached (generate)": cache_bytes(model, prompt, args.new_tokens),
                flipped: cache_bytes(other, prompt, args.new_tokens),
            }
    if importlib.util.find_spec("transformers") is not None and not args.no_hf:
        hf = exported(model, args.device)
        # An explicit mask: given only pad_token_id, generate() would mask every prompt token equal to it.
        methods["transformers generate"] = lambda _, prompt, n: hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        exact.append("transformers generate")
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        outputs = {name: fn(model, prompt, 4) for name, fn in methods.items()}  # warm up
        assert all(torch.equal(outputs[exact[0]], outputs[name]) for name in exact), "the decoders disagree"
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
        f"{device}, fp32; ({config.block_layers}⊗{config.loops}) {config.attention}, "
        f"d_model {config.d_model}, batch {args.batch}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
        f"vocab {config.vocab_size}{', trained: ' + args.checkpoint if args.checkpoint else ''}; "
        f"median of {args.rounds} rounds"
    )
    tokens = args.batch * args.new_tokens
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"{'method':<24} {'s':>8} {'tokens/s':>10} {'mean loops':>11} {'cache MB':>9}")
    for name, t in times.items():
        if name == "prefill":
            print(f"{name:<24} {statistics.median(t):>8.2f}")
            continue
        loops = f"{mean_loops.get(name, config.loops):>11.2f}"
        size = f"{kv_bytes[name] / 2**20:>9.2f}" if name in kv_bytes else ""
        print(f"{name:<24} {statistics.median(t):>8.2f} {rate[name]:>10.0f} {loops} {size}")
    if not args.no_full:
        print(
            f"cached / full generation tokens/s ratio: {rate['cached (generate)'] / rate['full forward per token']:.2f}"
        )
    if "transformers generate" in rate:
        ratio = rate["transformers generate"] / rate["cached (generate)"]
        print(f"transformers generate / our generate tokens/s ratio: {ratio:.2f}")
    if mean_loops:  # decoding alone: the tokens after the first, over the time after the prefill
        first = statistics.median(times["prefill"])
        decode_rate = {
            name: args.batch * (args.new_tokens - 1) / (statistics.median(times[name]) - first)
            for name in ["cached (generate)", *mean_loops]
        }
        print(f"prefill {first:.3f} s; decode tokens/s: " + ", ".join(f"{n} {r:.0f}" for n, r in decode_rate.items()))
    for name, loops in mean_loops.items():
        ratio, ideal = rate[name] / rate["cached (generate)"], config.loops / loops
        decode = decode_rate[name] / decode_rate["cached (generate)"]
        print(
            f"{name} / fixed L={config.loops} tokens/s ratio: {ratio:.2f} end to end, {decode:.2f} decoding "
            f"at {loops:.2f} mean loops (L / mean loops = {ideal:.2f}; decoding at {decode / ideal:.2f} of it)"
        )
    if kv_bytes:
        shared, per_application = (
            ("cached (generate)", "kv per application") if config.kv_sharing else ("kv shared", "cached (generate)")
        )
        ratio = rate[shared] / rate[per_application]
        size = kv_bytes[shared] / kv_bytes[per_application]
        print(f"kv shared / kv per application tokens/s ratio: {ratio:.2f}, cache bytes ratio: {size:.2f}")


if __name__ == "__main__":
    main()
