"""The Llama family both ways (``looped.convert.llama``), against ``transformers``' own models.

Each source is a random-weight model built here from ``transformers``' config classes at a scaled-down
version of a published shape (grouped-query attention on), saved with a tokenizer. Our logits must equal
``transformers``' on the same folder (fp32, max |Δ| ≤ 1e-4) with and without a left-padded batch; the
Llama export must load in a process that never imports ``looped`` and give our logits; import → export
→ import must give the same weights.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from looped.convert.llama import export_llama, load_hf_folder, plain_state, read_source, read_weights  # noqa: E402
from looped.errors import InputError  # noqa: E402
from looped.hf.tokenization import vocab_tokenizer  # noqa: E402

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, num_hidden_layers=3, bos_token_id=1, eos_token_id=2)
SOURCES = {
    # SmolLM2-135M: 576 wide, 9 heads over 3 kv heads, 1536 MLP, tied, θ 1e5, ε 1e-5
    "smollm2-like": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=128,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        ),
    ),
    # Llama 3.2: untied head, llama3 RoPE scaling whose bands all fall inside this head width
    "llama3-like": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    # Qwen2: bias on q, k, v only
    "qwen2-like": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=80,
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
        ),
    ),
    # Qwen3-0.6B: 1024 wide, 16 heads of 128 (wider than the model) over 8 kv heads, q/k norm, tied, θ 1e6
    "qwen3-like": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
}


def save_source(folder, name: str) -> torch.nn.Module:
    """A random-weight ``transformers`` model of shape ``name`` saved with a tokenizer in ``folder``."""
    config_class, model_class, shape = SOURCES[name]
    torch.manual_seed(0)
    model = model_class(config_class(**COMMON, **shape)).float().eval()
    with torch.no_grad():  # large, distinct weights, norm scales and biases included: a wrong map shows
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in pname else 0.15 * torch.randn_like(p))
    model.save_pretrained(folder)
    vocab_tokenizer(["<pad>", "<s>", "<eos>", *(f"w{i}" for i in range(VOCAB - 3))], 64, 2).save_pretrained(folder)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1 left-padded by 7
    return ids, mask


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, save_source(folder, request.param)


def test_our_logits_equal_transformers(source):
    folder, reference = source
    ours = load_hf_folder(folder).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max() <= 1e-4
        # padded: transformers places a left-padded row's tokens by the position_ids generate() gives it
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = reference(ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(ids, attention_mask=mask)
    tokens = mask.bool()
    assert (mine[tokens] - theirs[tokens]).abs().max() <= 1e-4
    alone = ours(ids[1:, 7:])[0]  # and a padded row is the row alone
    assert (mine[1, 7:] - alone).abs().max() <= 1e-4


LOAD_WITHOUT_LOOPED = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ids, mask, out = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(folder)
    ids, mask = torch.load(ids), torch.load(mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions).logits
    assert not [m for m in sys.modules if m == "looped" or m.startswith("looped.")], "looped was imported"
    torch.save({"type": type(model).__name__, "logits": logits}, out)
    """
)


@pytest.mark.slow  # spawns a process
@pytest.mark.parametrize("name", ["smollm2-like", "llama3-like"])
def test_llama_export_loads_without_looped_and_round_trips(name, tmp_path):
    save_source(tmp_path / "source", name)
    source = read_weights(read_source(tmp_path / "source"))
    ours = load_hf_folder(tmp_path / "source").eval()
    out = export_llama(source.config, plain_state(source), tmp_path / "export", bos_token_id=1, eos_token_id=2)
    vocab_tokenizer(["<pad>", "<s>", "<eos>", *(f"w{i}" for i in range(VOCAB - 3))], 64, 2).save_pretrained(out)
    ids, mask = batch()
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(mask, tmp_path / "mask.pt")
    args = [out, tmp_path / "ids.pt", tmp_path / "mask.pt", tmp_path / "out.pt"]
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LOOPED, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["type"] == "LlamaForCausalLM"
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask)
    assert (mine[mask.bool()] - theirs["logits"][mask.bool()]).abs().max() <= 1e-4
    again = read_weights(read_source(out))  # import -> export -> import: the same config and weights, bit for bit
    assert again.config == source.config
    first, second = plain_state(source), plain_state(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unsupported_and_incomplete_folders_are_one_line(tmp_path):
    save_source(tmp_path / "ok", "qwen2-like")
    config = (tmp_path / "ok" / "config.json").read_text()
    cases = {
        "is a GPT2LMHeadModel; supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM": (
            lambda f: (f / "config.json").write_text(config.replace("Qwen2ForCausalLM", "GPT2LMHeadModel"))
        ),
        "has no \\*.safetensors weights": lambda f: (f / "model.safetensors").unlink(),
        "has no tokenizer": lambda f: (f / "tokenizer.json").unlink(),
        "has no config.json": lambda f: (f / "config.json").unlink(),
    }
    for message, damage in cases.items():
        folder = tmp_path / f"case{len(message)}"
        save_source(folder, "qwen2-like")
        damage(folder)
        with pytest.raises(InputError, match=message) as err:
            read_source(folder)
        assert "\n" not in str(err.value)


def test_a_looped_or_qwen_model_is_refused_as_llama(tmp_path):
    save_source(tmp_path / "q", "qwen3-like")
    source = read_weights(read_source(tmp_path / "q"))
    with pytest.raises(InputError, match="not a plain Llama: qk_norm: True"):
        export_llama(source.config, plain_state(source), tmp_path / "out")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_kv_heads=3), "n_kv_heads: 3 does not divide n_heads=4"),
        (dict(n_kv_heads=0), "n_kv_heads: must be >= 1"),
        (dict(head_width=0), "head_width: must be >= 1"),
        (dict(head_width=7), "n_heads: RoPE needs an even head width, but the head width is 7"),
        (dict(norm_eps=0.0), "norm_eps: must be > 0"),
        (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling: rope_type 'yarn' is not supported"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling: llama3 scaling needs"),
    ],
)
def test_new_config_fields_are_checked(fields, message):
    from looped.model import LoopedConfig

    with pytest.raises(InputError, match=f"model.init_args.config.{message}"):
        LoopedConfig(d_model=32, n_heads=4, **fields)


def test_a_wider_head_and_grouped_kv_shape_the_projections():
    from looped.model import LoopedConfig, LoopedTransformer

    model = LoopedTransformer(
        LoopedConfig(vocab_size=11, max_seq_len=8, d_model=32, n_heads=4, n_kv_heads=2, head_width=16, qk_norm=True)
    )
    attn = model.block[0].attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (64, 32, 64)
    assert attn.q_norm.weight.shape == (16,)


def test_a_source_whose_kv_heads_do_not_divide_its_heads_is_one_line(tmp_path):
    save_source(tmp_path, "qwen2-like")
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"num_key_value_heads": 2', '"num_key_value_heads": 3'))
    with pytest.raises(InputError, match="config.json num_key_value_heads: 3 does not divide num_attention_heads=4"):
        read_source(tmp_path)
