"""Tests for swarm.model: config resolution, layer split, split-invariant init, causality and pipelined backward."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.model import (
    PRESETS,
    Attention,
    Embedding,
    Head,
    ModelConfig,
    Stage,
    apply_rope,
    build_pipeline,
    count_parameters,
    resolve_config,
    resolve_device,
    split_layers,
)

TINY = PRESETS["tiny"]


def run_pipeline(embedding, stages, head, tokens, targets=None):
    h = embedding(tokens)
    for stage in stages:
        h = stage(h)
    return head.logits(h) if targets is None else head(h, targets)


def random_batch(cfg: ModelConfig, batch: int = 2, t: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = cfg.seq_len if t is None else t
    x = torch.randint(0, cfg.vocab_size, (batch, t), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, t), generator=g)
    return x, y


# --------------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "n_layers, n_stages, expected",
    [
        (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
        (8, 8, [(i, i + 1) for i in range(8)]),
        (4, 1, [(0, 4)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
    ],
)
def test_split_layers(n_layers, n_stages, expected):
    spans = split_layers(n_layers, n_stages)
    assert spans == expected
    sizes = [e - s for s, e in spans]
    assert sum(sizes) == n_layers and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # earlier stages take the extra block


@pytest.mark.parametrize("n_layers, n_stages", [(4, 5), (4, 0), (4, -1), (1, 2)])
def test_split_layers_errors(n_layers, n_stages):
    with pytest.raises(ValueError):
        split_layers(n_layers, n_stages)


def test_resolve_config():
    assert resolve_config("small", 4) == PRESETS["small"]
    cfg = resolve_config("tiny", 6)
    assert cfg.n_layers == 6 and cfg.d_model == TINY.d_model
    assert len(split_layers(cfg.n_layers, 6)) == 6
    cfg = resolve_config("tiny", 2, seq_len=16, n_layers=3)
    assert (cfg.seq_len, cfg.n_layers) == (16, 3)
    assert resolve_config("tiny", 5, n_layers=3).n_layers == 5
    with pytest.raises(ValueError, match="tiny.*small.*base.*large"):
        resolve_config("huge", 2)
    with pytest.raises(ValueError):
        resolve_config("tiny", 0)
    with pytest.raises(ValueError, match="d_modle"):
        resolve_config("tiny", 2, d_modle=8)


def test_config_validation_and_dict():
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.to_dict()["d_model"] == TINY.d_model
    with pytest.raises(ValueError):
        ModelConfig(d_model=30, n_heads=4)  # not divisible
    with pytest.raises(ValueError):
        ModelConfig(d_model=12, n_heads=4)  # odd head dim
    with pytest.raises(ValueError):
        ModelConfig(n_layers=0)
    for name, cfg in PRESETS.items():
        assert cfg.vocab_size == 256, name
    assert (PRESETS["small"].d_model, PRESETS["small"].n_layers, PRESETS["small"].seq_len) == (128, 8, 64)
    assert (PRESETS["large"].d_model, PRESETS["large"].n_layers, PRESETS["large"].n_heads) == (1024, 24, 16)


# ------------------------------------------------------------------------------------------ init and determinism


def test_build_pipeline_deterministic_and_rng_untouched():
    state = torch.get_rng_state()
    e1, s1, h1 = build_pipeline(TINY, 2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    e2, s2, h2 = build_pipeline(TINY, 2, seed=3)
    e3, _, _ = build_pipeline(TINY, 2, seed=4)
    for a, b in zip([e1, *s1, h1], [e2, *s2, h2]):
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(pa, pb), na
    assert not torch.equal(e1.tok.weight, e3.tok.weight)
    assert [(s.start, s.end) for s in s1] == [(0, 2), (2, 4)]


def test_init_statistics():
    cfg = PRESETS["small"]
    emb, stages, head = build_pipeline(cfg, 2, seed=0)
    block = stages[0].blocks[0]
    assert abs(emb.tok.weight.std().item() - 0.02) < 0.002
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(block.mlp.down.weight.std().item() - out_std) < 0.1 * out_std
    assert abs(block.attn.proj.weight.std().item() - out_std) < 0.1 * out_std
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.d_model))
    # blocks are not copies of each other, and the head is untied from the embedding
    assert not torch.equal(stages[0].blocks[0].attn.qkv.weight, stages[0].blocks[1].attn.qkv.weight)
    assert head.lm_head.weight.data_ptr() != emb.tok.weight.data_ptr()


def test_rope_buffers_not_persistent():
    stage = Stage(TINY, 0, 1)
    assert not any("rope" in k for k in stage.state_dict())
    assert stage.blocks[0].attn.rope_cos.shape == (TINY.seq_len, TINY.d_model // TINY.n_heads)


def test_parameter_counts():
    emb, stages, head = build_pipeline(TINY, 4, seed=0)
    d, f, v = TINY.d_model, TINY.d_ff, TINY.vocab_size
    per_block = 4 * d * d + 3 * d * f + 2 * d
    assert count_parameters(emb) == v * d
    assert all(count_parameters(s) == per_block for s in stages)
    assert count_parameters(head) == d * v + d
    whole = Stage(TINY, 0, TINY.n_layers)
    assert count_parameters(whole) == sum(count_parameters(s) for s in stages)


# ------------------------------------------------------------------------------------------------ forward pass


@pytest.mark.parametrize("n_stages", [2, 4])
def test_split_equals_unsplit(n_stages):
    x, y = random_batch(TINY)
    emb1, stages1, head1 = build_pipeline(TINY, 1, seed=7)
    emb, stages, head = build_pipeline(TINY, n_stages, seed=7)
    assert len(stages) == n_stages and len(stages1) == 1
    # the same global block has identical weights whatever the split
    flat = [b for s in stages for b in s.blocks]
    for j, (a, b) in enumerate(zip(stages1[0].blocks, flat)):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb), f"block {j}"
    # an independently built Stage matches too (peers build their own shard)
    peer = Stage(TINY, stages[-1].start, stages[-1].end, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(peer.parameters(), stages[-1].parameters()))
    with torch.no_grad():
        ref = run_pipeline(emb1, stages1, head1, x)
        out = run_pipeline(emb, stages, head, x)
        # hand-rolled unsplit run: embedding -> every block -> head
        h = emb(x)
        for block in flat:
            h = block(h)
        manual = head.logits(h)
    assert out.shape == (2, TINY.seq_len, TINY.vocab_size)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(manual, ref, rtol=0, atol=1e-6)
    loss = run_pipeline(emb, stages, head, x, y)
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1  # near-uniform predictions at init


def test_rope_relative_positions():
    attn = Attention(TINY)
    cos, sin = attn.rope_cos, attn.rope_sin
    g = torch.Generator().manual_seed(0)
    q = torch.randn(TINY.head_dim, generator=g).expand(TINY.seq_len, -1)  # same vector at every position
    k = torch.randn(TINY.head_dim, generator=g).expand(TINY.seq_len, -1)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rq[0], q[0])  # position 0 is not rotated
    dot = rq @ rk.T  # [m, n]
    torch.testing.assert_close(dot[5, 2], dot[20, 17], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dot[9, 9], dot[0, 0], rtol=1e-5, atol=1e-5)
    assert (dot[5, 2] - dot[5, 5]).abs() > 1e-3


def test_attention_matches_reference():
    """Attention == softmax(rope(q) rope(k)^T / sqrt(hd) + causal mask) v, written out by hand."""
    attn = Stage(TINY, 0, 1, seed=2).blocks[0].attn
    b, t, d, nh, hd = 2, 12, TINY.d_model, TINY.n_heads, TINY.head_dim
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q, k, v = attn.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, nh, hd).transpose(1, 2) for z in (q, k, v))
        # rotate pairs (i, i + hd/2) by angle pos * base^(-2i/hd)
        inv = TINY.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = (torch.arange(t, dtype=torch.float64)[:, None] * inv).float()
        c, s = ang.cos(), ang.sin()

        def rot(z):
            z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
            return torch.cat([z1 * c - z2 * s, z1 * s + z2 * c], dim=-1)

        scores = rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        out = attn(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


def test_causality():
    emb, stages, head = build_pipeline(TINY, 2, seed=1)
    x, _ = random_batch(TINY, batch=1)
    t = 10
    x2 = x.clone()
    x2[0, t + 1 :] = (x2[0, t + 1 :] + 17) % TINY.vocab_size
    with torch.no_grad():
        a = run_pipeline(emb, stages, head, x)
        b = run_pipeline(emb, stages, head, x2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-4  # later positions do see the change


def test_shorter_sequences_and_too_long():
    emb, stages, head = build_pipeline(TINY, 2, seed=0)
    x, _ = random_batch(TINY, t=TINY.seq_len)
    with torch.no_grad():
        full = run_pipeline(emb, stages, head, x)
        short = run_pipeline(emb, stages, head, x[:, :5])
    assert short.shape == (2, 5, TINY.vocab_size)
    torch.testing.assert_close(short, full[:, :5], rtol=0, atol=1e-5)  # causal prefix is unchanged
    too_long = torch.zeros(1, TINY.seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="seq_len"):
        emb(too_long)
    with pytest.raises(ValueError, match="seq_len"):
        stages[0](torch.zeros(1, TINY.seq_len + 1, TINY.d_model))
    with pytest.raises(ValueError):
        Stage(TINY, 2, 2)
    with pytest.raises(ValueError):
        Stage(TINY, 0, TINY.n_layers + 1)
    with pytest.raises(ValueError):
        head(torch.zeros(1, 4, TINY.d_model), torch.zeros(1, 5, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- backward


def test_pipelined_backward_matches_end_to_end():
    cfg = resolve_config("tiny", 3)
    x, y = random_batch(cfg)
    ref = build_pipeline(cfg, 3, seed=11)
    pip = build_pipeline(cfg, 3, seed=11)

    # end-to-end autograd
    run_pipeline(*ref, x, y).backward()

    # stage by stage, detaching at every boundary as peers would
    emb, stages, head = pip
    inputs, outputs = [], []
    h = emb(x)
    outputs.append(h)
    for stage in stages:
        h_in = h.detach().requires_grad_(True)
        h = stage(h_in)
        inputs.append(h_in)
        outputs.append(h)
    h_in = h.detach().requires_grad_(True)
    loss = head(h_in, y)
    loss.backward()
    grad = h_in.grad
    for stage_out, stage_in in zip(reversed(outputs[1:]), reversed(inputs)):
        torch.autograd.backward(stage_out, grad_tensors=grad)
        grad = stage_in.grad
    torch.autograd.backward(outputs[0], grad_tensors=grad)

    ref_modules = [ref[0], *ref[1], ref[2]]
    pip_modules = [emb, *stages, head]
    n_checked = 0
    for rm, pm in zip(ref_modules, pip_modules):
        for (name, rp), (_, pp) in zip(rm.named_parameters(), pm.named_parameters()):
            assert rp.grad is not None and pp.grad is not None, name
            assert rp.grad.abs().sum() > 0, name
            torch.testing.assert_close(pp.grad, rp.grad, rtol=1e-5, atol=1e-7, msg=name)
            n_checked += 1
    assert n_checked == sum(len(list(m.parameters())) for m in ref_modules)


def test_training_lowers_loss():
    emb, stages, head = build_pipeline(TINY, 2, seed=0)
    params = [p for m in (emb, *stages, head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    x, y = random_batch(TINY, batch=2, t=16, seed=5)
    losses = []
    for _ in range(10):
        loss = run_pipeline(emb, stages, head, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_resolve_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    with pytest.raises(ValueError, match="cuda:99"):  # no CUDA here, or fewer than 100 devices
        resolve_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    emb, stages, head = build_pipeline(TINY, 2, seed=0)
    x, y = random_batch(TINY)
    with torch.no_grad():
        cpu = run_pipeline(emb, stages, head, x, y)
        dev = [m.cuda() for m in (emb, *stages, head)]
        gpu = run_pipeline(dev[0], dev[1:-1], dev[-1], x, y)  # CPU inputs follow the module's device
    assert gpu.device.type == "cuda"
    assert abs(gpu.item() - cpu.item()) < 1e-3


def test_embedding_and_head_shapes():
    emb = Embedding(TINY, seed=0)
    head = Head(TINY, seed=0)
    x, y = random_batch(TINY, batch=3, t=7)
    h = emb(x)
    assert h.shape == (3, 7, TINY.d_model) and h.dtype == torch.float32
    assert head.logits(h).shape == (3, 7, TINY.vocab_size)
    with pytest.raises(ValueError):
        emb(x[0])  # missing batch dimension
