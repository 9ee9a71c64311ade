"""The Kimi Linear model on megatron-core: fidelity to transformers' reference, shapes, sizes."""

from __future__ import annotations

import pytest
import torch
import yaml

from deltatron.model.config import ModelConfig
from deltatron.model.hf import hf_to_deltatron, load_hf_into, to_hf_config
from deltatron.model.model import build_model, build_model_on_meta, packed_seq_params

from conftest import REPO

# Small, but with every part: KDA and MLA layers, dense first layer, MoE with a shared expert.
SMALL = dict(
    vocab_size=512, hidden_size=64, num_layers=4, kda_num_heads=2, kda_head_dim=16,
    mla_num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    dense_ffn_hidden_size=128, num_experts=4, moe_ffn_hidden_size=32, moe_topk=2,
)


def _hf_reference(cfg: ModelConfig, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.KimiLinearForCausalLM(
        to_hf_config(cfg, attn_implementation="eager", experts_implementation="eager")
    ).float().eval()
    with torch.no_grad():  # move norms and the router bias off their trivial init
        for name, buf in hf.named_buffers():
            if "e_score_correction_bias" in name:
                buf.copy_(torch.randn_like(buf) * 0.1)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.fixture
def small_pair(seeded):
    cfg = ModelConfig(**SMALL)
    hf = _hf_reference(cfg)
    ours = build_model(cfg).eval()
    load_hf_into(ours, hf.state_dict(), cfg)
    return cfg, hf, ours


def test_logits_match_transformers_reference(small_pair):
    cfg, hf, ours = small_pair
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens, None, None)
    assert got.shape == ref.shape == (2, 48, cfg.vocab_size)
    err = (got - ref).abs().max().item()
    assert err < 2e-5 * ref.abs().max().item() + 1e-6, f"max |logit diff| {err}"


def test_packed_documents_match_reference_run_per_document(small_pair):
    """Several documents in one packed row behave exactly like separate sequences."""
    cfg, hf, ours = small_pair
    lengths = [17, 5, 26]
    docs = [torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    cu = torch.tensor([0, 17, 22, 48], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(torch.cat(docs, 1), None, None, packed_seq_params=packed_seq_params(cu, 26))
        ref = torch.cat([hf(d).logits for d in docs], 1)
        unpacked = ours(torch.cat(docs, 1), None, None)
    err = (packed - ref).abs().max().item()
    assert err < 2e-5 * ref.abs().max().item() + 1e-6, f"max |logit diff| {err}"
    # without boundaries the later documents see the earlier ones: the test can tell the difference
    assert (unpacked[:, 17:] - ref[:, 17:]).abs().max().item() > 1e-3


def test_gradients_flow_to_every_parameter(seeded):
    cfg = ModelConfig(**SMALL)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    loss = model(tokens, None, None, labels=tokens)
    assert loss.shape == (2, 32)
    loss.mean().backward()
    # with top-2 of 4 experts and 64 tokens, every expert is chosen at least once in practice
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_parameter_count_matches_architecture_arithmetic(seeded):
    cfg = ModelConfig(**yaml.safe_load(open(f"{REPO}/conf/model/tiny.yaml")))
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.parameter_counts()["total"]


def test_kimi_linear_48b_a3b_parameter_counts_on_meta_device(process_groups):
    cfg = ModelConfig(**yaml.safe_load(open(f"{REPO}/conf/model/kimi_linear_48b_a3b.yaml")))
    assert cfg.layer_pattern()[::2].replace("G", "k").replace("+", "M") == (
        "kkkMkkkMkkkMkkkMkkkMkkkMkkM"
    )
    model = build_model_on_meta(cfg)
    built = sum(p.numel() for p in model.parameters())
    counts = cfg.parameter_counts()
    print(
        f"\nKimi-Linear-48B-A3B: total {counts['total'] / 1e9:.2f}B, "
        f"active {counts['active'] / 1e9:.2f}B with embeddings and output layer, "
        f"{counts['active_no_embedding'] / 1e9:.2f}B without; built on meta: {built / 1e9:.2f}B"
    )
    assert built == counts["total"]
    assert abs(counts["total"] / 1e9 - 49.1) < 0.1
    assert abs(counts["active_no_embedding"] / 1e9 - 2.73) < 0.02
    assert abs(counts["active"] / 1e9 - 3.48) < 0.02


def test_hf_mapping_reports_missing_and_extra_tensors(small_pair):
    cfg, hf, _ = small_pair
    sd = hf.state_dict()
    broken = {k: v for k, v in sd.items() if "layers.1.self_attn.q_proj" not in k}
    with pytest.raises(KeyError, match="layers.1.self_attn.q_proj"):
        hf_to_deltatron(broken, cfg)
    with pytest.raises(KeyError, match="does not use"):
        hf_to_deltatron({**sd, "model.layers.0.extra.weight": torch.zeros(1)}, cfg)


def test_invalid_model_config_names_the_problem():
    with pytest.raises(ValueError, match="mla_layers"):
        ModelConfig(num_layers=4, mla_layers=[5])
    with pytest.raises(ValueError, match="moe_topk"):
        ModelConfig(num_experts=4, moe_topk=8)


def test_a_log_and_dt_bias_stay_out_of_weight_decay(seeded):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from deltatron.train.config import OptimConfig
    from deltatron.train.optim import build_optimizer

    cfg = ModelConfig(**SMALL)
    model = build_model(cfg)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = build_optimizer([ddp], OptimConfig(weight_decay=0.1), bf16=False, distributed=False)
    decay_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            # megatron-core scales each group's decay by wd_mult (0 for biases and 1-D params)
            decay_of[id(p)] = group["weight_decay"] * group["wd_mult"]
    kda = model.decoder.layers[0].self_attention
    assert decay_of[id(kda.A_log)] == 0.0 and decay_of[id(kda.dt_bias)] == 0.0
    assert decay_of[id(kda.linear_q.weight)] == pytest.approx(0.1)
    assert kda.A_log.dtype == torch.float32 and kda.dt_bias.dtype == torch.float32


def _rope_calls(monkeypatch):
    """Count megatron-core's unfused RoPE kernels (bshd and thd), which stay in place."""
    from megatron.core.models.common.embeddings import rope_utils

    calls = {"bshd": 0, "thd": 0}
    for fmt in calls:
        original = getattr(rope_utils, f"_apply_rotary_pos_emb_{fmt}")

        def counted(*args, _fmt=fmt, _original=original, **kwargs):
            calls[_fmt] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(rope_utils, f"_apply_rotary_pos_emb_{fmt}", counted)
    return calls


def small_batch(cfg: ModelConfig, packed: bool, cu: list[int], seed: int):
    """(tokens, forward kwargs): one row of packed documents with offsets cu (48 tokens), or two
    rows of 24."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        tokens = torch.randint(0, cfg.vocab_size, (1, cu[-1]), generator=gen)
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        return tokens, dict(packed_seq_params=packed_seq_params(torch.tensor(cu), max(lengths)))
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=gen), {}


def logits_and_grads(model, tokens, kw) -> tuple[torch.Tensor, dict]:
    """Logits and every parameter's gradient of a fixed loss on them (fresh gradients)."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens, None, None, **kw)
    (logits.float().square().mean() + logits[..., :7].sum()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [True, False], ids=["thd", "bshd"])
def test_nope_mla_skips_the_empty_rotation_exactly(seeded, monkeypatch, packed):
    """rotary_percent 0: megatron-core's RoPE (2 host syncs per call on THD) is never called,
    and logits and every parameter gradient equal those of megatron-core's own path."""
    from megatron.core.transformer import multi_latent_attention

    from deltatron.model.mla import KimiMLASelfAttention

    cfg = ModelConfig(**SMALL)
    model = build_model(cfg)
    n_mla = sum(isinstance(l.self_attention, KimiMLASelfAttention) for l in model.decoder.layers)
    assert n_mla > 0
    tokens, kw = small_batch(cfg, packed, cu=[0, 17, 22, 48], seed=3)

    def run():
        return logits_and_grads(model, tokens, kw)

    calls = _rope_calls(monkeypatch)
    logits, grads = run()
    assert calls == {"bshd": 0, "thd": 0}

    # megatron-core's path: its own apply_rotary_pos_emb in the MLA module's namespace
    monkeypatch.setattr(
        multi_latent_attention, "apply_rotary_pos_emb",
        multi_latent_attention.apply_rotary_pos_emb.original,
    )
    ref_logits, ref_grads = run()
    fmt = "thd" if packed else "bshd"
    assert calls[fmt] == 2 * n_mla  # q and k of every MLA layer (the test can tell)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_megatron_rope_with_an_empty_frequency_table_is_the_identity():
    """What the skip relies on, checked in megatron-core's own function: zero-width freqs leave
    t unchanged (bshd and thd, mscale, MLA interleaving); nonzero widths still reach it."""
    from megatron.core.transformer import multi_latent_attention

    wrapped = multi_latent_attention.apply_rotary_pos_emb
    original = wrapped.original

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    cfg = ModelConfig(**SMALL).to_transformer_config()
    torch.manual_seed(0)
    empty = torch.empty(26, 1, 1, 0)
    kw = dict(config=cfg, mscale=1.7, cp_group=OneRank(), mla_rotary_interleaved=True)
    t = torch.randn(12, 2, 3, 8, requires_grad=True)  # bshd
    out = original(t, empty[:12], **kw)
    assert torch.equal(out, t)
    upstream = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, t, upstream)[0], upstream)
    t = torch.randn(48, 3, 8)  # thd, three documents
    cu = torch.tensor([0, 17, 22, 48], dtype=torch.int32)
    assert torch.equal(original(t, empty, cu_seqlens=cu, **kw), t)
    assert wrapped(t, empty, cu_seqlens=cu, **kw) is t
    # a real table goes to megatron-core unchanged
    freqs = torch.randn(26, 1, 1, 8)
    rotated = wrapped(t, freqs, cu_seqlens=cu, **kw)
    assert torch.equal(rotated, original(t, freqs, cu_seqlens=cu, **kw))
    assert not torch.allclose(rotated, t)
