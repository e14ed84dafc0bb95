"""The model's variants, hidden states, vocabulary padding and checkpoints."""

import math

import pytest
import torch

from tga.model import (
    CheckpointError,
    ModelConfig,
    ModelConfigError,
    Transformer,
    load_checkpoint,
    save_checkpoint,
)

TINY = dict(vocab_size=101, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.0)


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, **overrides}))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_every_variant_has_right_shapes_and_hidden_state_count(norm_position, norm, activation):
    model = build(norm_position=norm_position, norm=norm, activation=activation)
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    out = model(idx, idx, return_hidden_states=True)
    assert out.logits.shape == (2, 10, TINY["vocab_size"])
    assert len(out.hidden_states) == TINY["n_layer"] + 2
    assert all(h.shape == (2, 10, TINY["n_embd"]) for h in out.hidden_states)
    assert torch.isfinite(out.loss)
    # the last hidden state is the final norm's output, which produces the logits
    assert torch.allclose(out.logits, out.hidden_states[-1] @ model.token_embedding.weight[: TINY["vocab_size"]].T, atol=1e-5)


def test_hidden_states_are_not_returned_unless_asked():
    out = build()(torch.randint(0, 101, (1, 5)))
    assert out.hidden_states is None and out.loss is None


def test_hidden_states_alone_skip_the_head_and_are_the_same(monkeypatch):
    """The geometry asks for hidden states without logits: the same states, bit for bit,
    and the LM head never runs (at GPT-2 small, batch 32 x 1024, its logits are 6 GB)."""
    model = build().eval()
    idx = torch.randint(0, 101, (2, 7))
    full = model(idx, return_hidden_states=True)
    calls = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: calls.append(w.shape) or real_linear(x, w, b))
    alone = model(idx, return_hidden_states=True, return_logits=False)
    assert alone.logits is None and alone.loss is None
    assert all(torch.equal(a, b) for a, b in zip(full.hidden_states, alone.hidden_states))
    assert not any(shape[0] == model.config.vocab_size for shape in calls)  # no (vocab x d) product


def test_pre_and_post_ln_give_different_outputs_from_identical_weights():
    pre, post = build(norm_position="pre"), build(norm_position="post")
    post.load_state_dict(pre.state_dict())
    idx = torch.randint(0, 101, (2, 12))
    assert not torch.allclose(pre(idx).logits, post(idx).logits, atol=1e-3)


def test_post_ln_blocks_renormalize_the_residual_stream():
    model = build(norm_position="post", norm="rmsnorm")
    hidden = model(torch.randint(0, 101, (1, 12)), return_hidden_states=True).hidden_states
    for h in hidden[1:]:  # every block ends in an RMSNorm with unit gains at init
        rms = h.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


@pytest.mark.parametrize("position_encoding", ["learned", "rope"])
def test_attention_is_causal(position_encoding):
    model = build(position_encoding=position_encoding).eval()
    idx = torch.randint(0, 101, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 101
    a, b = model(idx).logits, model(changed).logits
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert not torch.allclose(a[0, 8:], b[0, 8:], atol=1e-6)


def test_rotary_scores_depend_only_on_the_offset():
    from tga.model import RotaryEmbedding

    rotary = RotaryEmbedding(head_size=8, block_size=16, base=10000.0)
    q, k = torch.randn(8), torch.randn(8)
    rq, rk = rotary(q.expand(16, 8)), rotary(k.expand(16, 8))
    scores = rq @ rk.T  # scores[m, n]: query at position m, key at position n
    for offset in (0, 1, 5):
        diagonal = torch.diagonal(scores, offset=-offset)
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-5)
    assert not torch.isclose(scores[3, 2], scores[3, 0])
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(16), atol=1e-5)  # a rotation


def test_rotary_is_the_pairwise_rotation_bit_for_bit():
    """The whole-tensor form must give exactly the textbook rotation of each channel pair
    (a, b) by position·θ_i (Su et al. 2021), in fp32 and under bf16."""
    from tga.model import RotaryEmbedding

    head_size, block, base = 8, 12, 10000.0
    rotary = RotaryEmbedding(head_size, block, base)
    theta = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(block, dtype=torch.float64), theta)
    cos, sin = angles.cos().float(), angles.sin().float()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, block, head_size).to(dtype)
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = cos.to(dtype), sin.to(dtype)
        expected = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
        assert torch.equal(rotary(x), expected)
        assert torch.equal(rotary(x[..., :5, :]), expected[..., :5, :])  # shorter sequences: the first positions


def test_rope_model_has_no_position_table_and_sees_order():
    model = build(position_encoding="rope").eval()
    assert model.position_embedding is None
    assert not any("position" in name for name in model.state_dict())
    idx = torch.randint(0, 101, (1, 10))
    swapped = idx.clone()
    swapped[0, [2, 5]] = idx[0, [5, 2]]
    # the same multiset of tokens in another order must give a different last prediction
    assert not torch.allclose(model(idx).logits[0, -1], model(swapped).logits[0, -1], atol=1e-5)
    with pytest.raises(ModelConfigError, match="even head size"):
        ModelConfig(**{**TINY, "n_embd": 30, "n_head": 2, "position_encoding": "rope"})
    with pytest.raises(ModelConfigError, match="position_encoding"):
        ModelConfig(**{**TINY, "position_encoding": "alibi"})


def test_padded_vocabulary_is_never_predicted_and_loss_matches_unpadded():
    model = build()
    assert model.config.padded_vocab_size == 128
    idx = torch.randint(0, 101, (2, 9))
    out = model(idx, idx)
    assert out.logits.shape[-1] == 101
    reference = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 101), idx.reshape(-1))
    assert torch.allclose(out.loss, reference, atol=1e-6)


def test_uniform_output_gives_loss_log_vocab():
    model = build()
    with torch.no_grad():
        model.token_embedding.weight.zero_()  # tied head -> all logits 0 -> uniform
    idx = torch.randint(0, 101, (2, 9))
    assert math.isclose(model(idx, idx).loss.item(), math.log(101), rel_tol=1e-6)


def test_unigram_bias_starts_at_the_token_prior():
    torch.manual_seed(0)
    prior = 1.0 / torch.arange(1, 102, dtype=torch.float)
    tokens = torch.multinomial(prior / prior.sum(), 20000, replacement=True)
    counts = torch.bincount(tokens, minlength=101)
    smoothed = (counts + 1.0) / (counts + 1.0).sum()
    model = build(norm_position="post", unigram_bias=True)
    model.init_logit_bias(counts)
    assert torch.allclose(model.logit_bias[:101], smoothed.log(), atol=1e-6)
    assert torch.count_nonzero(model.logit_bias[101:]) == 0  # padding rows stay masked, not biased
    idx, targets = tokens[:1600].view(100, 16), tokens[1600:3200].view(100, 16)  # independent draws
    entropy = -(counts / counts.sum() * smoothed.log()).sum().item()  # cross-entropy of the data vs the prior
    assert entropy < math.log(101) - 0.3
    assert model(idx, targets).loss.item() == pytest.approx(entropy, abs=0.05)
    without = build(norm_position="post", unigram_bias=False)
    assert without.logit_bias is None and "logit_bias" not in without.state_dict()
    without.init_logit_bias(counts)  # a no-op for models without the bias
    assert without(idx, targets).loss.item() == pytest.approx(math.log(101), abs=0.05)
    with pytest.raises(ValueError, match="vocab_size=101"):
        model.init_logit_bias(counts[:50])


def test_swiglu_and_gelu_mlps_hold_about_the_same_weights():
    assert ModelConfig(n_embd=384, activation="swiglu").mlp_width == 1024
    swiglu = build(activation="swiglu").num_parameters()
    gelu = build(activation="gelu").num_parameters()
    assert abs(swiglu - gelu) / gelu < 0.05


@pytest.mark.parametrize(
    "activation, mlp_hidden, width",
    [("gelu", None, 128), ("relu", None, 128), ("swiglu", None, 88), ("relu", 32, 32), ("swiglu", 40, 40)],
)
def test_mlp_width_defaults_and_override(activation, mlp_hidden, width):
    model = build(activation=activation, mlp_hidden=mlp_hidden)
    mlp = model.blocks[0].mlp
    assert mlp.down.in_features == width
    assert mlp.up.out_features == (2 * width if activation == "swiglu" else width)


def test_relu_activation_is_relu():
    mlp = build(activation="relu", mlp_hidden=32).blocks[0].mlp
    x = torch.randn(3, TINY["n_embd"])
    assert torch.allclose(mlp(x), mlp.down(torch.relu(mlp.up(x))))


def test_xavier_init_has_per_matrix_variance_and_no_depth_scaling():
    d = 64
    model = build(init="xavier", n_embd=d, n_head=4, n_layer=8, activation="swiglu", mlp_hidden=96)
    block = model.blocks[0]
    # each of W^Q, W^K, W^V and W^O is d x d: variance 2/(d+d) = 1/d, whatever the depth
    for part in block.attn.qkv.weight.split(d, dim=0):
        assert part.std().item() == pytest.approx(d ** -0.5, rel=0.05)
    assert block.attn.proj.weight.std().item() == pytest.approx(d ** -0.5, rel=0.05)
    assert block.mlp.up.weight.std().item() == pytest.approx(math.sqrt(2 / (d + 96)), rel=0.05)
    assert block.mlp.down.weight.std().item() == pytest.approx(math.sqrt(2 / (96 + d)), rel=0.05)
    assert model.token_embedding.weight.std().item() == pytest.approx(d ** -0.5, rel=0.05)


def test_prenorm_sums_are_the_sums_before_the_norms():
    for norm_position in ("pre", "post"):
        model = build(norm_position=norm_position).eval()
        idx = torch.randint(0, 101, (2, 9))
        out = model(idx, return_hidden_states=True, return_prenorm_sums=True)
        plain = model(idx)
        assert plain.prenorm_sums is None
        assert torch.equal(out.logits, plain.logits)  # collecting changes nothing
        assert len(out.prenorm_sums) == TINY["n_layer"]
        for l, (block, sums) in enumerate(zip(model.blocks, out.prenorm_sums)):
            x = out.hidden_states[l]
            if norm_position == "post":
                after_attention = x + block.attn(x)
                assert torch.allclose(sums.attention, after_attention, atol=1e-5)
                mid = block.attn_norm(after_attention)
                assert torch.allclose(sums.mlp, mid + block.mlp(mid), atol=1e-5)
                assert torch.allclose(block.mlp_norm(sums.mlp), out.hidden_states[l + 1], atol=1e-5)
            else:  # Pre-LN: the residual stream itself
                after_attention = x + block.attn(block.attn_norm(x))
                assert torch.allclose(sums.attention, after_attention, atol=1e-5)
                assert torch.equal(sums.mlp, out.hidden_states[l + 1])
    no_mlp = build(mlp=False)(torch.randint(0, 101, (1, 5)), return_prenorm_sums=True)
    assert all(sums.mlp is None for sums in no_mlp.prenorm_sums)


def test_attention_probs_are_what_the_layer_applies():
    attn = build(position_encoding="rope").blocks[0].attn.eval()
    x = torch.randn(2, 7, TINY["n_embd"])
    probs = attn.attention_probs(x)
    assert torch.allclose(probs.sum(-1), torch.ones(2, TINY["n_head"], 7))
    assert torch.count_nonzero(probs.triu(1)) == 0  # causal
    _, _, v = attn._heads(x)
    y = (probs @ v).transpose(1, 2).reshape(2, 7, TINY["n_embd"])
    assert torch.allclose(attn(x), attn.proj(y), atol=1e-5)


def test_tied_embeddings_and_depth_scaled_init():
    model = build(n_layer=8)
    assert model.token_embedding.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert proj_std == pytest.approx(0.02 / math.sqrt(16), rel=0.15)
    assert qkv_std == pytest.approx(0.02, rel=0.1)


def test_ablations_remove_residual_and_mlp():
    no_mlp = build(mlp=False)
    assert all(block.mlp is None for block in no_mlp.blocks)
    attention_only = build(residual=False, mlp=False)
    hidden = attention_only(torch.randint(0, 101, (1, 12)), return_hidden_states=True).hidden_states
    assert len(hidden) == TINY["n_layer"] + 2


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd=30 is not divisible by n_head=4"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"activation": "tanh"}, "activation"),
        ({"init": "kaiming"}, "init"),
        ({"mlp_hidden": 0}, "mlp_hidden=0"),
        ({"mlp_hidden": 2.5}, "mlp_hidden=2.5"),
        ({"n_layer": 0}, "n_layer"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_model_settings_name_the_culprit(overrides, culprit):
    with pytest.raises(ModelConfigError, match=culprit):
        ModelConfig(**{**TINY, **overrides})


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size=16"):
        build()(torch.zeros(1, 17, dtype=torch.long))


def test_checkpoint_round_trip(tmp_path):
    model = build()
    save_checkpoint(tmp_path / "m.pt", model, {"step": 7})
    loaded, extra = load_checkpoint(tmp_path / "m.pt")
    assert extra == {"step": 7}
    idx = torch.randint(0, 101, (1, 8))
    assert torch.equal(model(idx).logits, loaded(idx).logits)
    assert not list(tmp_path.glob("*.tmp"))


def test_loaded_checkpoint_is_deterministic_despite_dropout(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build(dropout=0.5), {})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    idx = torch.randint(0, 101, (2, 8))
    assert not loaded.training
    assert torch.equal(loaded(idx).logits, loaded(idx).logits)


def test_checkpoint_from_before_a_key_existed_keeps_its_old_meaning(tmp_path):
    # Written before position_encoding and unigram_bias existed: learned positions, no bias.
    # Also before init and mlp_hidden: GPT-2 init, the default FFN width.
    old = build(position_encoding="learned", unigram_bias=False)
    save_checkpoint(tmp_path / "old.pt", old, {})
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    for key in ("position_encoding", "unigram_bias", "init", "mlp_hidden"):
        del payload["model_config"][key]
    torch.save(payload, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt")
    assert (loaded.config.position_encoding, loaded.config.unigram_bias) == ("learned", False)
    assert (loaded.config.init, loaded.config.mlp_hidden) == ("gpt2", None)
    idx = torch.randint(0, 101, (1, 8))
    assert torch.equal(old.eval()(idx).logits, loaded(idx).logits)


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    model = build()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    with pytest.raises(CheckpointError, match="another architecture: n_layer=3 \\(expected 4\\)"):
        load_checkpoint(path, expected_config=ModelConfig(**{**TINY, "n_layer": 4}))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match="not a tga checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_are_byte_identical_whatever_their_file_name(tmp_path):
    model = build()
    save_checkpoint(tmp_path / "a.pt", model, {"step": 1})
    save_checkpoint(tmp_path / "sub" / "b.pt", model, {"step": 1})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "b.pt").read_bytes()
