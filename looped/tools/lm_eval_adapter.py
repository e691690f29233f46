"""EleutherAI's lm-evaluation-harness on a ``LoopedLM`` checkpoint: model name ``looped``.

lm-eval finds models only in its own registry (no plugin entry points), so the adapter
must be imported before its CLI runs. Both of these do that, then hand every argument
to lm-eval's own command line:

    looped lm-eval --model looped --model_args checkpoint=runs/x/last.ckpt,tokenizer=data/pile \\
        --tasks lambada_openai,hellaswag --batch_size 16
    python -m looped.tools.lm_eval_adapter --model looped --model_args ... --tasks ...

From Python: ``import looped.tools.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="looped", ...)``.

``model_args``: ``checkpoint`` (a Lightning ``.ckpt``; a sharded FSDP2 checkpoint directory
must first be consolidated, see README), ``tokenizer`` (a ``tokenizer.json`` or a directory
holding one, e.g. the prepared Pile directory), ``loops`` (L at evaluation, default the
trained one), ``max_length`` (default the model's ``max_seq_len``), ``eot_token``.
Install with ``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval's own models (hf, vllm...): its registry skips them once ours is in
import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from looped.errors import InputError
from looped.model.cache import DecodeCache
from looped.tokenizer import load_tokenizer
from looped.training.checkpoint import read_checkpoint
from looped.training.module import LoopedLM


@register_model("looped")
class LoopedEvalLM(LM):
    """lm-eval's ``LM`` interface over a ``LoopedTransformer``: scores are sums of token log-probabilities."""

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str | None = None,
        loops: int | None = None,
        max_length: int | None = None,
        eot_token: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        path = Path(checkpoint)
        if path.is_dir():
            raise InputError(
                f"model_args checkpoint={path} is a sharded (FSDP2) checkpoint directory; consolidate it first: "
                f"python -m lightning.fabric.utilities.consolidate_checkpoint {path} --output_file {path}.full.ckpt"
            )
        if tokenizer is None:
            raise InputError("model_args tokenizer=... is required: a tokenizer.json or the prepared data directory")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        read_checkpoint(path, flag="model_args checkpoint")  # a missing or broken file named, before loading
        module = LoopedLM.load_from_checkpoint(str(path), map_location=self._device)
        self.model = module.model.eval()
        # The tokenizer the data was prepared with (looped.tools.prepare): a tokenizer.json, or bytes.
        try:
            self.tokenizer = load_tokenizer(tokenizer, eos_token=eot_token)
        except (FileNotFoundError, ValueError) as error:
            raise InputError(f"model_args tokenizer={tokenizer}: {error}") from error
        vocab = self.model.config.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise InputError(
                f"vocabulary mismatch: tokenizer {tokenizer} has {self.tokenizer.vocab_size} ids but the "
                f"checkpoint's model has vocab_size={vocab}; use the tokenizer the model was trained with"
            )
        self.loops = int(loops) if loops is not None else None
        self.max_length = int(max_length or self.model.config.max_seq_len)
        if self.max_length > self.model.config.max_seq_len:
            raise InputError(
                f"model_args max_length={self.max_length} exceeds the model's "
                f"max_seq_len={self.model.config.max_seq_len}"
            )
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.eot_token_id = self.tokenizer.eos_id

    # -- helpers ---------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(Σ log p(continuation | context), continuation is the greedy one)`` per (context, continuation) ids.

        One padded forward per batch; the softmax runs only over the positions that predict
        each continuation, on the model's device.
        """
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            # Input is context + continuation minus the last token, cut from the left to max_length.
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in chunk]
            batch = torch.full((len(inputs), max(map(len, inputs))), self.eot_token_id, dtype=torch.long)
            for row, seq in enumerate(inputs):  # right padding: causal attention never sees it
                batch[row, : len(seq)] = torch.tensor(seq)
            logits = self.model(batch.to(self._device), loops=self.loops)
            for row, ((_, cont), seq) in enumerate(zip(chunk, inputs)):
                scored = F.log_softmax(logits[row, len(seq) - len(cont) : len(seq)].float(), dim=-1)
                target = torch.tensor(cont, device=scored.device)
                total = scored.gather(1, target[:, None]).sum().item()
                results.append((total, bool((scored.argmax(-1) == target).all())))
        return results

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces of the context belong to the continuation's first token (as lm-eval's HF model does).
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        if not ctx:
            return [self.eot_token_id], whole
        return ctx, whole[len(ctx) :]

    # -- lm-eval's interface -----------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args[:2]) for request in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for request in requests:
            windows = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(request.args[0]),
                    prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            totals.append(sum(score for score, _ in self._score(windows)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, options = request.args[0], dict(request.args[1] or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop("max_gen_toks", 256))
            temperature = float(options.pop("temperature", 0.0) or 0.0)
            sample = bool(options.pop("do_sample", False)) and temperature > 0
            # Context cut from the left so that it and max_new tokens fit max_length (as lm-eval's HF model does).
            ids = (self.tok_encode(context) or [self.eot_token_id])[-max(1, self.max_length - max_new) :]
            max_new = min(max_new, self.max_length - len(ids))
            new: list[int] = []
            text = ""
            # One prefill fills the decode cache; every later token is one position per layer application.
            cache = DecodeCache(capacity=len(ids) + max(max_new, 1))
            logits = self.model(torch.tensor([ids], device=self._device), loops=self.loops, cache=cache)
            for _ in range(max_new):
                last = logits[0, -1].float()
                token = int(torch.multinomial(F.softmax(last / temperature, -1), 1)) if sample else int(last.argmax())
                if token == self.eot_token_id:
                    break
                new.append(token)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
                logits = self.model(torch.tensor([[token]], device=self._device), loops=self.loops, cache=cache)
            for stop in until:  # cut at the first stop sequence, which is not part of the answer
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def main(argv: list[str] | None = None) -> None:
    """``looped lm-eval ...`` / ``python -m looped.tools.lm_eval_adapter ...``: lm-eval's CLI, ``looped`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
