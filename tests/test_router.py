"""Mixture-of-Recursions routers (``looped.model.router``) against the plain looped model and slow references."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model, tiny_module
from looped import LoopedConfig, LoopedTransformer
from looped.errors import InputError
from looped.model import mixers
from looped.model.cache import DecodeCache
from looped.model.step import LoopStep

SHAPE = dict(max_seq_len=16, d_model=32, n_heads=4, d_ff=64, block_layers=2, loops=3)


def make(**fields) -> LoopedTransformer:
    return tiny_model(**{**SHAPE, **fields})


def tokens(model: LoopedTransformer, batch: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def plain_twin(routed: LoopedTransformer) -> LoopedTransformer:
    """The same weights without the router."""
    plain = LoopedTransformer(dataclasses.replace(routed.config, router="none")).eval()
    state = {k: v for k, v in routed.state_dict().items() if not k.startswith("router.")}
    plain.load_state_dict(state)
    return plain


def spread_scores(model: LoopedTransformer) -> None:
    """Router weights large enough that no two tokens' scores are within rounding of each other."""
    with torch.no_grad():
        for p in model.router.score.parameters():
            p.normal_(generator=torch.Generator().manual_seed(2))


def block_inputs(model: LoopedTransformer) -> list[torch.Tensor]:
    """Records what the block's first layer is given, one entry per loop."""
    seen = []
    model.block[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prelude_layers": 1, "coda_layers": 1, "input_injection": "add"},
        {"attention": "linear"},
        {"attention": "sparse", "mixer_options": {"sparse": {"pattern": "local", "window": 4}}},
        {"pos_encoding": "learned"},
        {"lora_rank": 2, "input_injection": "concat", "n_kv_heads": 2, "qk_norm": True},  # with issue 31's settings
        {"kv_sharing": True, "prelude_layers": 1, "n_kv_heads": 2},
    ],
)
def test_expert_choice_at_capacity_one_unweighted_is_the_plain_looped_model(fields):
    routed = make(router="expert_choice", router_capacity=1.0, **fields)
    routed.router.weighted = False
    x = tokens(routed)
    torch.testing.assert_close(routed(x), plain_twin(routed)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fields", [{}, {"prelude_layers": 1, "input_injection": "add"}, {"attention": "linear"}, {"kv_sharing": True}]
)
def test_token_choice_assigning_depth_l_unweighted_is_the_plain_looped_model(fields):
    routed = make(router="token_choice", **fields)
    routed.router.weighted = False
    with torch.no_grad():
        routed.router.score.bias[-1] = 100.0  # every token's depth: L
    x = tokens(routed)
    torch.testing.assert_close(routed(x), plain_twin(routed)(x), rtol=1e-5, atol=1e-5)


def test_expert_choice_block_sees_exactly_the_top_k_of_the_tokens_still_active():
    """A hook on the block: loop n gets ceil(c_n·t) tokens per row, exactly the states at the positions a slow
    per-row top-k over the still-active tokens picks, in causal order; the others keep their state."""
    # a prelude layer: two equal tokens would tie for the first router if it read their embeddings alone
    model = make(router="expert_choice", router_capacity=[0.75, 0.5, 0.25], prelude_layers=1)
    spread_scores(model)
    seen = block_inputs(model)
    x = tokens(model)
    _, states = model(x, return_loop_states=True)
    before = [model.run_layers(model.prelude, model.embed_tokens(x), None)] + states[:-1]
    active = [list(range(16)) for _ in range(3)]
    for n, capacity in enumerate([0.75, 0.5, 0.25]):
        k = math.ceil(capacity * 16)
        assert seen[n].shape == (3, k, 32)
        for row in range(3):
            scores = [model.router.score[n](before[n][row, p]).item() for p in active[row]]
            best = sorted(range(len(active[row])), key=lambda i: -scores[i])[:k]
            active[row] = sorted(active[row][i] for i in best)
            torch.testing.assert_close(seen[n][row], before[n][row, active[row]])
            left_out = [p for p in range(16) if p not in active[row]]
            torch.testing.assert_close(states[n][row, left_out], before[n][row, left_out])


def test_token_choice_block_sees_the_tokens_whose_depth_reaches_the_loop():
    model = make(router="token_choice")
    seen = block_inputs(model)
    x = tokens(model)
    model(x)
    depth = model.router.score(model.embed_tokens(x)).argmax(-1) + 1  # [b t]
    assert len(set(depth.flatten().tolist())) > 1  # the check below means something: depths differ
    for n in range(1, 4):
        assert seen[n - 1].shape[1] == int((depth >= n).sum(-1).max())
    assert model.router.tokens_per_loop == [s.shape[1] for s in seen]


@pytest.mark.parametrize("variant", ["bce", "stop_grad"])
def test_expert_choice_aux_and_z_losses_equal_a_slow_reference(variant):
    """Per loop: BCE of the learning router's logits against each row's top-k membership and the mean squared
    logit, by hand over python lists from the routers' outputs; then the mean over the loops."""
    model = make(router="expert_choice", router_capacity=[1.0, 0.5, 0.25], router_aux_loss=variant)
    logits, causal = [], []
    for n in range(3):
        model.router.score[n].register_forward_hook(lambda m, a, out: logits.append(out.squeeze(-1)))
        if variant == "stop_grad":
            model.router.causal[n].register_forward_hook(lambda m, a, out: causal.append(out.squeeze(-1)))
    model(tokens(model))
    learners = causal if variant == "stop_grad" else logits
    aux = [mean_bce(logits[n], learners[n], k) for n, k in enumerate([16, 8, 4])]
    z = [sum(s * s for row in logits[n].tolist() for s in row) / logits[n].numel() for n in range(3)]
    assert [t.shape[1] for t in logits] == [16, 16, 8]  # loop n scores the tokens loop n-1 kept
    assert model.router.losses["aux"].item() == pytest.approx(sum(aux) / 3, rel=1e-5)
    assert model.router.losses["z"].item() == pytest.approx(sum(z) / 3, rel=1e-5)


def test_token_choice_balancing_and_z_losses_equal_a_slow_reference():
    """Switch's balancing loss L·Σ_j f_j·P_j (f_j: the share of tokens given depth j, P_j: the mean probability of
    depth j) and the mean squared log-sum-exp, by hand."""
    model = make(router="token_choice")
    logits = []
    model.router.score.register_forward_hook(lambda m, a, out: logits.append(out))
    model(tokens(model))
    rows = [token for row in logits[0].tolist() for token in row]
    probs = [[math.exp(v) / sum(math.exp(u) for u in token) for v in token] for token in rows]
    share = [sum(1 for p in probs if max(range(3), key=lambda i: p[i]) == j) / len(probs) for j in range(3)]
    mean_p = [sum(p[j] for p in probs) / len(probs) for j in range(3)]
    balance = 3 * sum(f * p for f, p in zip(share, mean_p, strict=True))
    z = sum(math.log(sum(math.exp(v) for v in token)) ** 2 for token in rows) / len(rows)
    assert model.router.losses["aux"].item() == pytest.approx(balance, rel=1e-5)
    assert model.router.losses["z"].item() == pytest.approx(z, rel=1e-5)


def mean_bce(scores: torch.Tensor, learner: torch.Tensor, k: int) -> float:
    """BCE of ``learner``'s logits against membership in each row's top-k of ``scores``, by hand."""
    total, count = 0.0, 0
    for row_scores, row_learner in zip(scores.tolist(), learner.tolist(), strict=True):
        top = set(sorted(range(len(row_scores)), key=lambda i: -row_scores[i])[:k])
        for i, s in enumerate(row_learner):
            p = 1 / (1 + math.exp(-s))
            total -= math.log(p) if i in top else math.log(1 - p)
            count += 1
    return total / count


@pytest.mark.parametrize(
    "fields",
    [
        {"router": "expert_choice", "router_capacity": [1.0, 0.5, 0.25]},
        {"router": "expert_choice", "router_capacity": 0.5, "router_aux_loss": "stop_grad"},
        {"router": "token_choice"},
    ],
)
def test_gradients_reach_the_router_through_the_output_and_its_losses(fields):
    model = make(**fields).train()
    x = tokens(model)
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward(retain_graph=True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router.score.parameters())
    model.zero_grad()
    model.router.loss().backward(retain_graph=True)  # the auxiliary losses alone
    learner = model.router.causal if model.router.causal is not None else model.router.score
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    if model.router.causal is not None:  # the stop-gradient router reads states its loss cannot change
        model.zero_grad()
        model.router.losses["aux"].backward()
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.block.parameters())


def test_looped_lm_adds_the_router_losses_and_warms_the_capacity_up():
    module = tiny_module(**SHAPE, router="expert_choice", router_capacity=0.25, router_warmup_steps=4, vocab_size=7)
    x = torch.randint(0, 7, (4, 16), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": x, "labels": x}
    module.train()
    loss = module.training_step(data, 0)  # step 0 of the warm-up: every loop keeps every token
    assert module.model.router.tokens_per_loop == [16, 16, 16]
    plain = module.compute_loss(module.model(x), x)
    assert loss.item() == pytest.approx((plain + module.model.router.loss()).item(), rel=1e-6)
    module.model.router.step = 2  # half-way: capacity 1 - (1 - 0.25)/2
    module.model(x)
    assert module.model.router.tokens_per_loop == [10, 10, 10]
    module.eval()
    module.model(x)  # evaluation runs at the schedule's capacity
    assert module.model.router.tokens_per_loop == [4, 4, 4]


@pytest.mark.parametrize(
    "fields",
    [
        {"router": "expert_choice", "router_capacity": 0.5},
        {"router": "expert_choice", "router_capacity": [1.0, 0.5, 0.25], "router_aux_loss": "stop_grad"},
        {"router": "expert_choice", "router_capacity": 0.5, "attention": "sparse", "prelude_layers": 1},
        {"router": "token_choice", "coda_layers": 1},
        {"router": "expert_choice", "router_capacity": 0.5, "n_kv_heads": 2, "input_injection": "concat"},
        {"router": "expert_choice", "router_capacity": [1.0, 0.5, 0.25], "kv_sharing": True, "prelude_layers": 1},
        {"router": "token_choice", "kv_sharing": True},
    ],
)
def test_flops_of_a_routed_training_step_follow_the_capacity_schedule(fields):
    """torch's count of a training step (forward + backward) within 2% of 3 × the formula, and below the dense
    model's count by what the schedule says."""
    module = tiny_module(**{**SHAPE, "vocab_size": 7, **fields})
    x = torch.randint(0, 7, (4, 16), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": x, "labels": x}

    def counted(m) -> int:
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees
            m.training_step(data, 0).backward()
        return counter.get_total_flops()

    routed = counted(module)
    assert module.flops_per_batch == pytest.approx(routed, rel=0.02)
    dense = tiny_module(**{**SHAPE, "vocab_size": 7, **{k: v for k, v in fields.items() if not k.startswith("router")}})
    dense_flops = counted(dense)
    assert dense.flops_per_batch == pytest.approx(dense_flops, rel=0.01)
    expected = module.flops_per_batch / dense.flops_per_batch
    assert routed / dense_flops == pytest.approx(expected, rel=0.02)
    assert routed < dense_flops


@pytest.mark.parametrize(
    "fields, key, words",
    [
        ({"router_capacity": 0.0}, "router_capacity", "(0, 1]"),
        ({"router_capacity": 1.5}, "router_capacity", "(0, 1]"),
        ({"router_capacity": [1.0, 0.5]}, "router_capacity", "one per loop"),
        ({"router_capacity": [0.5, 1.0, 0.5]}, "router_capacity", "non-increasing"),
        ({"router_warmup_steps": -1}, "router_warmup_steps", ">= 0"),
        ({"router_aux_weight": -1.0}, "router_aux_weight", ">= 0"),
        ({"kv_sharing": True, "router_capacity": [0.5, 0.5, 0.25]}, "router_capacity", "loop 1 must run every"),
        ({"router": "top_k"}, "router", "expert_choice"),
    ],
)
def test_bad_router_settings_name_the_key_and_the_fix(fields, key, words):
    with pytest.raises(InputError, match=rf"^model\.init_args\.config\.{key}: .*{words}".replace("(", r"\(")) as err:
        LoopedConfig(vocab_size=7, max_seq_len=16, loops=3, **{"router": "expert_choice", **fields})
    assert "\n" not in str(err.value)


def test_a_mixer_that_cannot_take_gathered_tokens_is_refused(monkeypatch):
    class Whole(mixers.SoftmaxAttention):
        gathers = False

    monkeypatch.setitem(mixers.MIXERS, "whole", Whole)
    with pytest.raises(InputError, match=r"^model\.init_args\.config\.router: .*'whole'.*router: none"):
        LoopedConfig(vocab_size=7, max_seq_len=16, loops=3, attention="whole", router="token_choice")


def test_the_router_changes_nothing_by_default():
    assert LoopedConfig(vocab_size=7, max_seq_len=16).router == "none"
    assert make().router is None and "router." not in "".join(make().state_dict())


ROUTERS = [
    {"router": "expert_choice", "router_capacity": [1.0, 0.5, 0.25]},
    {"router": "expert_choice", "router_aux_loss": "stop_grad", "prelude_layers": 1, "coda_layers": 1},
    {"router": "token_choice", "input_injection": "add"},
    {"router": "expert_choice", "router_capacity": [1.0, 0.5, 0.25], "kv_sharing": True, "prelude_layers": 1},
    {"router": "token_choice", "kv_sharing": True},
]


def deciding(fields: dict) -> LoopedTransformer:
    """A routed model whose causal decisions keep some tokens and drop others at every loop."""
    model = make(**fields)
    with torch.no_grad():
        for scorer in (model.router.score, model.router.causal):
            for name, p in [] if scorer is None else scorer.named_parameters():
                p.zero_() if name.endswith("bias") else p.normal_(generator=torch.Generator().manual_seed(5))
    return model


@pytest.mark.parametrize("fields", ROUTERS)
def test_causal_routing_never_looks_ahead(fields):
    """With the causal decisions, changing tokens after t changes no logit at t, though the tokens differ
    in which loops they run (some kept, some not)."""
    model = deciding(fields)
    x = tokens(model)
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 1) % model.config.vocab_size
    with model.router.deciding("causal"):
        a, b = model(x), model(y)
        kept = model.router.tokens_per_loop
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    assert any(0 < m < 16 for m in kept), kept


@pytest.mark.parametrize("fields", ROUTERS)
@pytest.mark.parametrize("padded", [False, True])
def test_decoding_with_the_router_gives_the_tokens_of_a_full_forward_per_step(fields, padded):
    """``generate(exit='router')`` over the cache (each loop's slots show only its tokens' keys) against the
    causal full forward re-run over the whole sequence for every new token."""
    model = deciding(fields)
    prompt = tokens(model, batch=3, length=6)
    mask = None
    if padded:  # the first row left-padded by two
        mask = torch.ones_like(prompt)
        mask[0, :2] = 0
    out = model.generate(prompt, max_new_tokens=8, exit="router", attention_mask=mask)
    seq = prompt
    with model.router.deciding("causal"):
        for _ in range(8):
            seq = torch.cat([seq, model(seq, attention_mask=grown(mask, seq))[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(out, seq)
        # the logits too, position by position: the cache's prefill and steps against one full forward
        cache = DecodeCache(out.shape[1])
        steps = [model(prompt, cache=cache, attention_mask=mask)]
        for i in range(6, out.shape[1] - 1):
            steps.append(model(out[:, i : i + 1], cache=cache, attention_mask=grown(mask, out[:, : i + 1])))
        full = model(out[:, :-1], attention_mask=grown(mask, out[:, :-1]))
        kept = cache.routed[:, :, : out.shape[1] - 1].float().mean().item()
    real = slice(None) if mask is None else grown(mask, out[:, :-1]).bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-5, atol=1e-5)
    assert 0.1 < kept < 0.9  # loops ran on some tokens and not on others


@pytest.mark.parametrize("fields", [f for f in ROUTERS if f.get("kv_sharing")])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_sharing_with_a_router_is_the_dense_block_over_loop_one_keys_masked_to_the_routed_tokens(fields, padded):
    """Recursive KV sharing under a router: a routed token's loop n attends to loop 1's keys of every position up
    to its own. The reference runs the router-free twin's dense block on *every* token each loop (its queries
    over loop 1's keys, which do not depend on which queries run) and keeps the update only where the causal
    decisions route, weighted as the router weights it: the gathered forward must agree."""
    model = deciding(fields)
    router, plain = model.router, plain_twin(model)
    x = tokens(model)
    mask = None
    if padded:
        mask = torch.ones_like(x)
        mask[0, :3] = 0
    with router.deciding("causal"):
        routed = model(x, attention_mask=mask)
    padding = plain.padding(mask, *x.shape)
    h = plain.run_layers(plain.prelude, plain.embed_tokens(x, 0, padding), None, padding)
    loop_input, shared, alive, depth = h, plain.shared_kv(), None, None
    for n in range(1, 4):
        if model.config.router == "expert_choice":
            logits = router.score[n - 1](h).squeeze(-1)
            keep = torch.ones_like(logits, dtype=torch.bool) if n == 1 else alive & (logits > 0)
            weight, alive = torch.sigmoid(logits), keep
        else:
            if depth is None:
                probs = router.score(h).softmax(-1)
                depth, weight = probs.argmax(-1) + 1, probs.max(-1).values
            keep = depth >= n
        assert n == 1 or 0 < keep.sum() < keep.numel()  # some tokens routed, some not
        out = plain.loop_step(h, LoopStep(n, loop_input, None, padding, shared))
        h = torch.where(keep[..., None], h + weight[..., None] * (out - h), h)
    reference = plain.readout(h, padding=padding)
    real = slice(None) if mask is None else mask.bool()
    torch.testing.assert_close(routed[real], reference[real], rtol=1e-5, atol=1e-5)


def grown(mask: torch.Tensor | None, seq: torch.Tensor) -> torch.Tensor | None:
    """A prompt's padding mask extended with ones over the tokens after it."""
    return None if mask is None else F.pad(mask, (0, seq.shape[1] - mask.shape[1]), value=1)


def test_decoding_a_routed_model_takes_the_router_exit_and_expert_choice_needs_its_causal_router():
    model = make(router="expert_choice", router_capacity=0.5)
    prompt = tokens(model, length=4)
    with pytest.raises(ValueError, match="exit='router'"):
        model.generate(prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="exit='router'"):
        model.generate(prompt, max_new_tokens=2, exit="entropy_0.5")
    with pytest.raises(ValueError, match="exit='router'"):  # the top-k forward refuses a decode cache itself
        model(prompt, cache=DecodeCache(8))
    with pytest.raises(ValueError, match="has none"):
        make().generate(prompt, max_new_tokens=2, exit="router")
    untrained = make(router="expert_choice", router_aux_weight=0.0)
    with pytest.raises(InputError, match=r"^model\.init_args\.config\.router_aux_weight: .*router_aux_weight > 0"):
        untrained.generate(prompt, max_new_tokens=2, exit="router")


@pytest.mark.parametrize("fields", ROUTERS)
def test_loops_past_the_trained_depth_reuse_the_last_loop_decision(fields):
    """Evaluation's extra loops: the first L loops' states are those of the trained depth; later loops still
    run on routed tokens only (expert-choice: the last loop's router and capacity again)."""
    model = deciding(fields)
    x = tokens(model)
    _, trained = model(x, return_loop_states=True)
    _, deeper = model(x, loops=5, return_loop_states=True)
    for a, b in zip(trained, deeper[:3], strict=False):
        torch.testing.assert_close(a, b)
    tokens_run = model.router.tokens_per_loop
    assert tokens_run[2:] == [tokens_run[2]] * 3  # the last loop's share, again


def test_the_disagreement_of_causal_and_top_k_decisions_is_counted_per_loop():
    """Per loop, over the tokens the router scored: causal decision (logit > 0) vs top-k membership, by hand."""
    model = deciding({"router": "expert_choice", "router_capacity": [1.0, 0.5, 0.25]})
    logits = []
    for n in range(3):
        model.router.score[n].register_forward_hook(lambda m, a, out: logits.append(out.squeeze(-1)))
    model(tokens(model))
    expected = []
    for n, k in enumerate([16, 8, 4]):
        differ = 0
        for row in logits[n].tolist():
            top = set(sorted(range(len(row)), key=lambda i: -row[i])[:k])
            differ += sum((s > 0) != (i in top) for i, s in enumerate(row))
        expected.append(differ / logits[n].numel())
    assert model.router.disagreement.tolist() == pytest.approx(expected)
    assert 0 < sum(expected)


def test_looped_lm_counts_the_training_flops_it_spent_and_keeps_the_count_in_checkpoints():
    """``train/flops`` is MoR's equal-training-FLOPs axis: the sum of every step's ``flops_per_batch`` (a token-choice
    router's loops as that batch routed them), carried across a resume."""
    module = tiny_module(**SHAPE, router="token_choice", vocab_size=7).train()
    spent = []
    for seed in range(3):
        x = torch.randint(0, 7, (4, 16), generator=torch.Generator().manual_seed(seed))
        module.training_step({"input_ids": x, "labels": x}, seed)
        spent.append(module.flops_per_batch)
    assert len(set(spent)) > 1  # the batches routed differently, so the count follows each one
    assert module.training_flops == pytest.approx(sum(spent))
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = tiny_module(**SHAPE, router="token_choice", vocab_size=7)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.training_flops == module.training_flops


@pytest.mark.parametrize("fields", ROUTERS)
def test_a_decoding_step_runs_each_loop_on_the_rows_routed_to_it_alone(fields):
    """Decoding saves the loops a router skips: after the prefill, loop n of a step runs only the rows whose new
    token the causal decisions route to it — as many as the causal full forward gives depth >= n there."""
    model = deciding(fields)
    prompt = tokens(model, batch=6, length=5)
    seen = []
    model.block[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    out = model.generate(prompt, max_new_tokens=8, exit="router")
    loops = model.config.loops
    steps = seen[loops:]  # after the prefill's loops: one entry per loop of every step
    with model.router.deciding("causal"):
        model(out[:, :-1])
    depths = model.router.depths
    assert len(steps) == 7 * loops
    for s in range(7):
        column = 5 + s  # the token that step reads
        for n in range(1, loops + 1):
            assert steps[s * loops + n - 1] == int((depths[:, column] >= n).sum()), (s, n)
    assert sum(steps) < 7 * loops * 6  # some rows skipped some loops


@pytest.mark.parametrize("fields", ROUTERS)
@pytest.mark.parametrize("padded", [False, True])
def test_depthwise_decoding_with_the_router_gives_the_tokens_of_the_synchronous_schedule(fields, padded):
    """``schedule='depthwise'`` (every row at its own token and loop, each token routed loop by loop, the cache
    recursion-wise) against the synchronous schedule, whose tokens equal the causal full forward's (above);
    with an EOS that stops rows at different lengths too."""
    model = deciding(fields)
    prompt = tokens(model, batch=4, length=6)
    mask = None
    if padded:
        mask = torch.ones_like(prompt)
        mask[0, :2] = 0
    for eos in (None, int(prompt[1, -1])):
        synchronous = model.generate(prompt, 10, eos_id=eos, exit="router", attention_mask=mask)
        depthwise = model.generate(prompt, 10, eos_id=eos, exit="router", attention_mask=mask, schedule="depthwise")
        assert torch.equal(depthwise, synchronous), eos
