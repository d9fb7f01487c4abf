"""CLIP / SigLIP vision towers (llama_vision.model.clip_vision) against the independent
implementations, on tiny random models (nothing downloaded):

1. transformers CLIPVisionModel, quick_gelu and gelu: hidden_states[feature_layer]
   (class token dropped for "default") for -2, -1, 0 and a positive index;
2. transformers SiglipVisionModel: hidden_states semantics (hidden_states[-1] is pre-post-
   layernorm) and `post_layernorm=True` == last_hidden_state;
3. open_clip's VisionTransformer (quick_gelu, with and without LayerScale): the
   penultimate block's patch tokens, taken by hooking its resblocks;
4. load_vision_tower on safetensors / .pt files of each layout; refusals (missing key,
   pickled objects, wrong image size);
5. to_hf then from_hf (and back) are exact;
6. a transformers LlavaForConditionalGeneration state dict (in-memory and saved names)
   converts, and an export with Hub LLaVA names loads back into transformers.
Every weight is perturbed away from its init (zero biases, unit norms would hide mistakes).
"""
from __future__ import annotations

import pytest
import torch

from llama_vision.checkpoint.clip_vision import (
    clip_vision_from_hf,
    clip_vision_from_open_clip,
    clip_vision_to_hf,
    detect_vision_layout,
    load_vision_tower,
    read_vision_state_dict,
    siglip_vision_from_hf,
    siglip_vision_to_hf,
)
from llama_vision.model.clip_vision import CLIP_VIT_L_14_336, SIGLIP_SO400M_14_384, ClipVisionConfig, ClipVisionTower
from llama_vision.utils.io import CheckpointFormatError

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=14)
ATOL = 1e-5


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _pixels(n=2, size=56, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_clip():
    """{act: CLIPVisionModel} with random weights."""
    torch.manual_seed(0)
    return {act: _perturb(CLIPVisionModel(CLIPVisionConfig(**TINY, hidden_act=act)), i)
            for i, act in enumerate(("quick_gelu", "gelu"))}


@pytest.fixture(scope="module")
def hf_siglip():
    torch.manual_seed(0)
    return _perturb(SiglipVisionModel(SiglipVisionConfig(**TINY)), 3)  # with the pooling head


def _tower(cfg: ClipVisionConfig, sd) -> ClipVisionTower:
    tower = ClipVisionTower(cfg)
    tower.load_state_dict(sd, strict=True)
    return tower.eval()


# --- 1. transformers CLIP ---------------------------------------------------------------------
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_matches_transformers_clip(hf_clip, act):
    model = hf_clip[act]
    x = _pixels()
    hidden = model(x, output_hidden_states=True).hidden_states
    assert len(hidden) == TINY["num_hidden_layers"] + 1
    for layer in (-2, -1, 0, 2):
        for select in ("default", "full"):
            cfg = ClipVisionConfig.from_hf_config(model.config.to_dict(), feature_layer=layer, feature_select=select)
            assert cfg.act == act and cfg.kind == "clip"
            tower = _tower(cfg, clip_vision_from_hf(model.state_dict(), cfg))
            out = tower(x)
            ref = hidden[layer][:, 1:] if select == "default" else hidden[layer]
            assert out.shape == (2, cfg.num_tokens, 64) == ref.shape
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_only_the_selected_layers_run(hf_clip):
    cfg = ClipVisionConfig.from_hf_config(hf_clip["gelu"].config.to_dict(), feature_layer=1)
    tower = _tower(cfg, clip_vision_from_hf(hf_clip["gelu"].state_dict(), cfg))
    calls = []
    for i, block in enumerate(tower.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    out = tower(_pixels())
    assert calls == [0] and tower.num_tokens == out.shape[1] == 16 and tower.width == 64
    out.sum().backward()
    no_grad = sorted(n for n, p in tower.named_parameters() if p.grad is None)
    assert no_grad == sorted(tower.unused_parameter_names())
    assert all(n.startswith(("blocks.1.", "blocks.2.", "blocks.3.", "ln_post.")) for n in no_grad)
    # activation checkpointing (training the tower) recomputes the same function and gradients
    grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}
    tower.zero_grad(set_to_none=True)
    tower.train()
    tower.checkpoint_activations = True
    again = tower(_pixels())
    again.sum().backward()
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    for n, g in grads.items():
        torch.testing.assert_close(dict(tower.named_parameters())[n].grad, g, atol=1e-6, rtol=1e-6)


# --- 2. transformers SigLIP -------------------------------------------------------------------
@torch.no_grad()
def test_matches_transformers_siglip(hf_siglip):
    x = _pixels()
    out = hf_siglip(x, output_hidden_states=True)
    hidden = out.hidden_states
    # transformers: the last hidden state is post-LN, hidden_states[-1] is not
    assert not torch.allclose(hidden[-1], out.last_hidden_state)
    dropped = []
    for layer in (-1, -2, 0, 3):
        cfg = ClipVisionConfig.from_hf_config(hf_siglip.config.to_dict(), feature_layer=layer)
        assert cfg.kind == "siglip" and cfg.act == "gelu_tanh" and cfg.feature_select == "full"
        dropped.clear()
        tower = _tower(cfg, siglip_vision_from_hf(hf_siglip.state_dict(), cfg, dropped=dropped))
        torch.testing.assert_close(tower(x), hidden[layer], atol=ATOL, rtol=0)
        assert not hasattr(tower, "class_embedding") and tower.patch_embed.bias is not None
    assert dropped and all(k.startswith("head.") for k in dropped)  # the pooling head is not the tower's
    # "default" has no class token to drop on SigLIP
    cfg = ClipVisionConfig.from_hf_config(hf_siglip.config.to_dict(), feature_select="default")
    assert _tower(cfg, siglip_vision_from_hf(hf_siglip.state_dict(), cfg))(x).shape == (2, 16, 64)
    # post_layernorm on the last layer reproduces last_hidden_state
    cfg = ClipVisionConfig.from_hf_config(hf_siglip.config.to_dict(), feature_layer=-1, post_layernorm=True)
    tower = _tower(cfg, siglip_vision_from_hf(hf_siglip.state_dict(), cfg))
    torch.testing.assert_close(tower(x), out.last_hidden_state, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="post_layernorm=True needs the last layer"):
        cfg.replace(feature_layer=-2)


# --- 3. open_clip -----------------------------------------------------------------------------
@pytest.mark.parametrize("layer_scale", [None, 0.5])
@torch.no_grad()
def test_matches_open_clip(layer_scale):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=4, width=64, head_width=16, mlp_ratio=1.5, patch_size=14, image_size=56,
                        ls_init_value=layer_scale),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1),
        quick_gelu=True,  # OpenAI's ViT-L-14-336 activation
    )
    _perturb(model, 5)
    visual = model.visual
    taps = []
    handles = [b.register_forward_hook(lambda m, a, o: taps.append(o)) for b in visual.transformer.resblocks]
    x = _pixels()
    pooled = visual(x)
    for h in handles:
        h.remove()
    assert pooled.shape == (2, 32)
    cfg = ClipVisionConfig(kind="clip", image_size=56, patch_size=14, width=64, layers=4, heads=4, mlp_dim=96,
                           act="quick_gelu", layer_norm_eps=1e-5, feature_layer=-2)
    dropped = []
    sd = clip_vision_from_open_clip(model.state_dict(), cfg, dropped=dropped)  # whole CLIP: `visual.` found
    assert dropped == ["proj"]
    tower = _tower(cfg, sd)
    penultimate = taps[-2]  # batch-first [N, 1 + g^2, W]
    torch.testing.assert_close(tower(x), penultimate[:, 1:], atol=ATOL, rtol=0)
    # the last layer + post_layernorm: open_clip's ln_post over the tokens, its pooled class token
    cfg_last = cfg.replace(feature_layer=-1, feature_select="full", post_layernorm=True)
    tokens = _tower(cfg_last, sd)(x)
    torch.testing.assert_close(tokens[:, 0] @ visual.proj, pooled, atol=ATOL, rtol=0)


# --- 4. files ---------------------------------------------------------------------------------
def _layouts(hf_clip):
    """{layout: (state dict as that layout stores it, prefix)} of one tower."""
    model = hf_clip["quick_gelu"]
    cfg = ClipVisionConfig.from_hf_config(model.config.to_dict())
    ours = clip_vision_from_hf(model.state_dict(), cfg)
    open_clip_sd = {"visual.conv1.weight": ours["patch_embed.weight"], "visual.proj": torch.zeros(64, 8)}
    for k in ("class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias"):
        open_clip_sd["visual." + k] = ours[k]
    for i in range(cfg.layers):
        b, src = f"visual.transformer.resblocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            open_clip_sd[b + f"attn.in_proj_{p}"] = torch.cat([ours[src + f"attn.{n}_proj.{p}"] for n in "qkv"])
            open_clip_sd[b + f"attn.out_proj.{p}"] = ours[src + f"attn.out_proj.{p}"]
            open_clip_sd[b + f"mlp.c_fc.{p}"] = ours[src + f"mlp.fc1.{p}"]
            open_clip_sd[b + f"mlp.c_proj.{p}"] = ours[src + f"mlp.fc2.{p}"]
            for ln in ("ln_1", "ln_2"):
                open_clip_sd[b + f"{ln}.{p}"] = ours[src + f"{ln}.{p}"]
    open_clip_sd["transformer.resblocks.0.ln_1.weight"] = torch.ones(8)  # the text tower's: left alone
    layouts = {
        "hf": ({"vision_model." + k: v for k, v in model.state_dict().items()} | {"text_model.x": torch.ones(1)}, "vision_model."),
        "open_clip": (open_clip_sd, "visual."),
        "ours": (ours, ""),
    }
    return cfg, ours, layouts


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_vision_tower_each_layout(hf_clip, tmp_path, suffix):
    cfg, ours, layouts = _layouts(hf_clip)
    x = _pixels()
    ref = _tower(cfg, ours)(x)
    for layout, (sd, prefix) in layouts.items():
        path = tmp_path / f"{layout}{suffix}"
        sd = {k: v.contiguous() for k, v in sd.items()}
        save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
        assert detect_vision_layout(sd) == (layout, prefix)
        loaded, info = read_vision_state_dict(path, cfg)
        assert (info.layout, info.prefix) == (layout, prefix)
        assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], ours[k]) for k in ours)
        tower = load_vision_tower(path, cfg).eval()
        with torch.no_grad():
            torch.testing.assert_close(tower(x), ref, atol=0, rtol=0)
        assert all(p.requires_grad for p in tower.parameters())
        assert load_vision_tower(path, cfg, dtype=torch.bfloat16).positional_embedding.dtype == torch.bfloat16


def test_load_vision_tower_refusals(hf_clip, tmp_path):
    cfg, ours, layouts = _layouts(hf_clip)
    # a missing key, named with the file
    victims = {"hf": "encoder.layers.2.layer_norm2.bias", "open_clip": "transformer.resblocks.2.ln_2.bias",
               "ours": "blocks.2.ln_2.bias"}
    for layout, (sd, prefix) in layouts.items():
        path = tmp_path / f"missing_{layout}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items() if k != prefix + victims[layout]}, path)
        with pytest.raises(ValueError, match="missing") as e:
            load_vision_tower(path, cfg)
        assert str(path) in str(e.value) and victims[layout] in str(e.value)
    # an unexpected key under the tower's prefix
    path = tmp_path / "extra.safetensors"
    save_file({**ours, "blocks.0.attn.q_norm.weight": torch.ones(64)}, path)
    with pytest.raises(ValueError, match=r"unexpected.*blocks\.0\.attn\.q_norm\.weight"):
        load_vision_tower(path, cfg)
    # a config that does not fit the file: more layers, another width
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in layouts["hf"][0].items()}, path)
    with pytest.raises(ValueError, match=r"missing encoder\.layers\.4\."):
        load_vision_tower(path, cfg.replace(layers=5))
    with pytest.raises(ValueError, match=r"shape mismatch.*positional_embedding \[17, 64\] != \[17, 128\]"):
        load_vision_tower(path, cfg.replace(width=128, mlp_dim=96))
    # pickled objects are refused, not unpickled
    path = tmp_path / "pickled.pt"
    torch.save({"model": _tower(cfg, ours)}, path)
    with pytest.raises(CheckpointFormatError, match="pickled Python objects") as e:
        load_vision_tower(path, cfg)
    assert str(path) in str(e.value)
    # no tower at all
    path = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="no CLIP/SigLIP vision tower"):
        load_vision_tower(path, cfg)
    # another image size
    with pytest.raises(ValueError, match="interpolation is not supported"):
        _tower(cfg, ours)(_pixels(size=70))


# --- 5. round trips ---------------------------------------------------------------------------
def test_to_hf_from_hf_exact(hf_clip, hf_siglip):
    model = hf_clip["gelu"]
    cfg = ClipVisionConfig.from_hf_config(model.config.to_dict())
    ours = clip_vision_from_hf(model.state_dict(), cfg)
    for prefix in ("", "vision_model.", "model.vision_tower.", "vision_tower.vision_model."):
        hf = clip_vision_to_hf(ours, cfg, prefix=prefix)
        assert hf.keys() == {prefix + k for k in model.state_dict()}
        assert all(torch.equal(hf[prefix + k], v) for k, v in model.state_dict().items())
        back = clip_vision_from_hf(hf, cfg)
        assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    fresh = CLIPVisionModel(model.config)
    fresh.load_state_dict(clip_vision_to_hf(ours, cfg), strict=True)

    scfg = ClipVisionConfig.from_hf_config(hf_siglip.config.to_dict())
    sours = siglip_vision_from_hf(hf_siglip.state_dict(), scfg)
    shf = siglip_vision_to_hf(sours, scfg)
    assert shf.keys() == {k for k in hf_siglip.state_dict() if not k.startswith("head.")}
    back = siglip_vision_from_hf(shf, scfg)
    assert all(torch.equal(back[k], sours[k]) for k in sours)
    headless = SiglipVisionModel(SiglipVisionConfig(**scfg.to_hf_config()))
    headless.load_state_dict(shf, strict=True)
    with pytest.raises(ValueError, match="siglip converter given a clip config"):
        siglip_vision_to_hf(ours, cfg)


def test_configs():
    c = CLIP_VIT_L_14_336
    assert (c.grid, c.num_tokens, c.selected_layer, c.head_dim) == (24, 576, 23, 64)  # LLaVA-1.5's 576 image tokens
    assert c.replace(feature_select="full").num_tokens == 577
    s = SIGLIP_SO400M_14_384
    assert (s.grid, s.num_tokens, s.selected_layer, s.head_dim) == (27, 729, 26, 72)  # 384 // 14 = 27
    assert ClipVisionConfig.from_hf_config(c.to_hf_config()) == c
    assert ClipVisionConfig.from_hf_config(s.to_hf_config()) == s.replace(feature_layer=-2)
    # the presets take transformers' full-size towers key for key (built on the meta device)
    with torch.device("meta"):
        big_clip = CLIPVisionModel(CLIPVisionConfig(**c.to_hf_config()))
        big_siglip = SiglipVisionModel(SiglipVisionConfig(**{**s.to_hf_config(), "vision_use_head": True}))
    assert len(clip_vision_from_hf(big_clip.state_dict(), c)) == 3 + 2 + 24 * 16 + 2  # patch, class, positions, ln_pre, blocks, ln_post
    assert len(siglip_vision_from_hf(big_siglip.state_dict(), s)) == 3 + 27 * 16 + 2
    # a Hub llava-1.5 config.json: only non-default vision keys
    llava = {"model_type": "llava", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
             "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                               "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                               "patch_size": 14, "projection_dim": 768}}
    assert ClipVisionConfig.from_hf_config(llava) == c
    assert ClipVisionConfig.from_hf_config({"model_type": "llava"}) == c  # LlavaConfig's default tower
    # a whole CLIPConfig / SiglipConfig: its vision_config, our default selection
    whole = transformers.CLIPConfig(vision_config=dict(TINY, hidden_act="gelu")).to_dict()
    assert ClipVisionConfig.from_hf_config(whole) == ClipVisionConfig(
        kind="clip", image_size=56, patch_size=14, width=64, layers=4, heads=4, mlp_dim=96, act="gelu")
    whole = transformers.SiglipConfig(vision_config=TINY).to_dict()
    assert ClipVisionConfig.from_hf_config(whole).replace(feature_layer=-1).to_hf_config()["model_type"] == "siglip_vision_model"
    # LLaVA-OneVision: 26 SigLIP blocks, last one, all tokens == block 26 of SO400M's 27
    ov = transformers.LlavaOnevisionConfig().to_dict()
    o = ClipVisionConfig.from_hf_config(ov)
    assert (o.kind, o.layers, o.feature_layer, o.feature_select, o.selected_layer) == ("siglip", 26, -1, "full", 26)
    assert o.replace(layers=27, feature_layer=-2) == s
    with pytest.raises(ValueError, match="drops token 0"):
        ClipVisionConfig.from_hf_config({**ov, "vision_feature_select_strategy": "default"})
    with pytest.raises(ValueError, match="several layers"):
        ClipVisionConfig.from_hf_config({**llava, "vision_feature_layer": [-2, -5]})
    with pytest.raises(ValueError, match="feature_layer 25 outside"):
        c.replace(feature_layer=25)


# --- 6. LLaVA checkpoints ---------------------------------------------------------------------
def test_llava_state_dict_converts(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY),
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_id=63,
    )
    llava = _perturb(LlavaForConditionalGeneration(config), 7)
    memory = llava.state_dict()
    # transformers 5.23 names (in memory)
    assert "model.vision_tower.embeddings.patch_embedding.weight" in memory
    assert {"model.multi_modal_projector.linear_1.weight", "model.language_model.embed_tokens.weight",
            "lm_head.weight"} <= memory.keys()
    cfg = ClipVisionConfig.from_hf_config(config.to_dict())
    assert (cfg.feature_layer, cfg.feature_select) == (-2, "default")
    ours = clip_vision_from_hf(memory, cfg)
    x = _pixels()
    tower = _tower(cfg, ours)
    with torch.no_grad():
        ref = llava.model.vision_tower(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(x), ref, atol=ATOL, rtol=0)
    # as transformers 5.23 saves it ("vision_tower.", no "vision_model.")
    llava.save_pretrained(tmp_path / "saved")
    saved_tower, info = read_vision_state_dict(tmp_path / "saved", cfg)
    assert (info.layout, info.prefix) == ("hf", "vision_tower.")
    assert all(torch.equal(saved_tower[k], ours[k]) for k in ours)
    # an export with the Hub's LLaVA names loads back into transformers
    on_disk = load_file(tmp_path / "saved" / "model.safetensors")
    export = {k: v for k, v in on_disk.items() if not k.startswith("vision_tower.")}
    export |= clip_vision_to_hf(ours, cfg, prefix="vision_tower.vision_model.")
    save_file({k: v.contiguous() for k, v in export.items()}, tmp_path / "saved" / "model.safetensors",
              metadata={"format": "pt"})
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        again = reloaded.model.vision_tower(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
    tower2 = load_vision_tower(tmp_path / "saved", cfg)
    assert read_vision_state_dict(tmp_path / "saved", cfg)[1].prefix == "vision_tower.vision_model."
    with torch.no_grad():
        torch.testing.assert_close(tower2.eval()(x), ref, atol=ATOL, rtol=0)
