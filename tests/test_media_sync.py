"""What an FSDP rank runs when its micro-batch lacks a modality another rank's has
(training.media_sync): blank, unattended image and video inputs and every embedding table
read. They run the media modules and change nothing: the same loss, bitwise, and exact
zero gradients for the modules only they reached."""
from __future__ import annotations

import torch

from _helpers import tiny_model
from llama_vision.data.batch import IGNORE_INDEX
from llama_vision.data.video_dataset import VideoBatch
from llama_vision.model.video import VideoConfig, add_video_adapters
from llama_vision.training.losses import lm_loss_sum
from llama_vision.training.media_sync import blank_batch, embedding_tables, media_present, with_dummy_media


def _text_batch(vocab: int) -> VideoBatch:
    tokens = torch.tensor([[1, 5, 9, 33, 17, 4], [2, 8, 3, 0, 0, 0]])
    labels = torch.tensor([[5, 9, 33, 17, 4, IGNORE_INDEX], [8, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    assert int(tokens.max()) < vocab
    return VideoBatch(tokens=tokens, labels=labels, lengths=torch.tensor([6, 3]), images=None,
                      aspect_ratios=torch.ones(2, 1, 2, dtype=torch.long), num_tiles=torch.zeros(2, 1, dtype=torch.long),
                      num_images=torch.zeros(2, dtype=torch.long), keys=["a", "b"])  # fmt: skip


def _loss_and_grads(model, batch, every_table: bool):
    model.zero_grad(set_to_none=True)
    media = batch.media_inputs()
    with embedding_tables(model, every_table):
        logits = model(batch.tokens, batch.images, batch.aspect_ratios if batch.images is not None else None, media_inputs=media)
    loss = lm_loss_sum(logits, batch.labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dummy_media_run_the_media_modules_and_change_nothing():
    model = tiny_model()
    add_video_adapters(model, VideoConfig(num_frames=2, frames_per_group=2, tiles_per_frame=1, n_latents=3, depth=1, heads=4,
                                          every_k_image_layers=1))  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():  # open the gates: a closed gate would zero the adapters' gradients anyway
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1].startswith("gate"):
                p.fill_(0.5)
    batch = _text_batch(model.args.vocab_size)
    assert media_present(batch, model.args.vocab_size) == [False, False, False]
    plain_loss, plain = _loss_and_grads(model, batch, every_table=False)
    dummy = with_dummy_media(batch, [True, True], tile_size=model.args.vision_chunk_size)
    assert dummy.images.shape[:3] == (2, 1, 1) and dummy.videos.shape[:4] == (2, 1, 1, 1) and int(dummy.num_images.sum()) == 0
    loss, grads = _loss_and_grads(model, dummy, every_table=True)
    assert torch.equal(loss, plain_loss)
    for n, g in plain.items():  # the trunk's gradients are the text-only run's
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=0, msg=n)
    reached = set(grads) - set(plain)
    prefixes = ("vision_model.", "video_aggregator.", "text_model.cross_attention_layers.",
                "text_model.video_cross_attention_layers.", "text_model.learnable_embedding.", "text_model.placeholder_embeddings.")
    for prefix in prefixes:  # every media module ran (it has a gradient) and learnt nothing
        assert any(n.startswith(prefix) for n in reached), prefix
    for n in reached:
        assert n.startswith(prefixes), n
        assert not grads[n].any(), n


def test_blank_batch_has_no_target():
    blank = blank_batch(_text_batch(512))
    assert type(blank) is VideoBatch and blank.num_targets == 0 and len(blank) == 1


def _trainable_llava(video: bool = False):
    """The tiny trunk with a small CLIP tower + projector (and its projector video modality),
    everything trainable."""
    import llama_vision
    from _helpers import tiny_params
    from llama_vision.model.clip_vision import ClipVisionConfig, ClipVisionTower
    from llama_vision.model.llava import LlavaVideoConfig, add_llava_modality, add_llava_video_modality

    torch.manual_seed(0)
    model = llama_vision.build_model(tiny_params(vision_num_cross_attention_layers=0))
    tower = ClipVisionTower(ClipVisionConfig(image_size=28, patch_size=14, width=24, layers=1, heads=2, mlp_dim=48,
                                             feature_layer=-1))
    add_llava_modality(model, tower, 24)
    if video:
        add_llava_video_modality(model, LlavaVideoConfig(num_frames=2))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _assert_unattended_dummy_changes_nothing(model, dummy, plain_loss, plain) -> None:
    """Under unattended_images the dummy gives the plain batch's loss bitwise, its gradients,
    and exact zero gradients to the tower and projector, which it reached."""
    from llama_vision.training.media_sync import unattended_images

    with unattended_images(model):
        loss, grads = _loss_and_grads(model, dummy, every_table=True)
    assert torch.equal(loss, plain_loss)
    for n, g in plain.items():
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=0, msg=n)
    reached = set(grads) - set(plain)
    for prefix in ("vision_model.vision_encoder.", "vision_model.projector."):
        assert any(n.startswith(prefix) for n in reached), prefix
    for n in reached:
        assert not grads[n].any(), n


def test_a_llava_models_dummy_image_runs_tower_and_projector_and_changes_nothing():
    """A projector image modality's dummy (one blank image, no placeholder anywhere) goes
    through the tower and projector into the decoder input with weight 0: the text-only
    loss bitwise, the trunk's gradients unchanged, exact zero gradients for tower and
    projector (they ran: FSDP's backward reaches them in the same order as on an image
    rank). Without `unattended_images` such an image is an error, as before."""
    from llama_vision.training.media_sync import projector_blank

    model = _trainable_llava()
    batch = _text_batch(model.args.vocab_size)
    plain_loss, plain = _loss_and_grads(model, batch, every_table=False)
    assert projector_blank(model) == (1, 28)
    dummy = with_dummy_media(batch, [True, False], tile_size=0, projector=projector_blank(model))
    assert dummy.images.shape == (2, 1, 1, 3, 28, 28) and dummy.aspect_ratios[:, 0].tolist() == [[28, 28], [0, 0]]
    try:
        _loss_and_grads(model, dummy, every_table=True)
    except ValueError as e:
        assert "placeholder" in str(e)
    else:
        raise AssertionError("an image without placeholders must be an error outside unattended_images")
    _assert_unattended_dummy_changes_nothing(model, dummy, plain_loss, plain)
    assert model.unattended_media is False


def test_a_projector_video_modalitys_dummy_frame_runs_tower_and_projector_and_changes_nothing():
    """A LLaVA model's projector video modality (its frames through the image tower and
    projector): a rank whose ProjectorVideoBatch has no clip while another's has gets one
    blank frame in row 0, no placeholder anywhere, kept with weight 0: the loss bitwise,
    exact zero gradients for tower and projector, which ran (FSDP's units in the same order
    as on a video rank). media_present sees a projector batch's frames as videos."""
    import dataclasses

    from llama_vision.data.video_dataset import ProjectorVideoBatch
    from llama_vision.training.media_sync import projector_blank

    model = _trainable_llava(video=True)
    text = _text_batch(model.args.vocab_size)
    batch = ProjectorVideoBatch(**{f.name: getattr(text, f.name) for f in dataclasses.fields(text)
                                   if f.name in {g.name for g in dataclasses.fields(ProjectorVideoBatch)}})
    assert media_present(batch, model.args.vocab_size)[1] is False
    plain_loss, plain = _loss_and_grads(model, batch, every_table=False)
    dummy = with_dummy_media(batch, [False, True], tile_size=0, projector=projector_blank(model))
    assert dummy.frames.shape == (2, 1, 1, 3, 28, 28) and dummy.frame_counts.tolist() == [[1], [0]]
    assert media_present(dummy, model.args.vocab_size)[1] is True
    _assert_unattended_dummy_changes_nothing(model, dummy, plain_loss, plain)
