"""Inference helpers behind tools/infer_image.py and tools/infer_video.py: load a
checkpoint (at the tensor-parallel degree torchrun gives), build prompts, answer one
request, a JSONL batch, or an interactive chat."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

import model_parallel as mp

from .generation import Generator
from .tokenizer import ChatFormat, load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int = 0

    def kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def add_common_args(p) -> None:
    """The checkpoint, sampling and device flags shared by the inference CLIs."""
    p.add_argument("--tokenizer", help="tokenizer.model (default: CKPT/tokenizer.model)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU, else cpu)")


def teardown() -> None:
    """Leave the TP group cleanly (every rank, after its last collective): a process that
    exits with the process group's threads alive can abort in their destructors."""
    if mp.is_model_parallel():
        mp.barrier()
        mp.destroy_model_parallel()


def setup(ckpt: str, tokenizer: str | None = None, device: str | None = None, dtype: str = "bf16", tp: int | None = None,
          lora: str | None = None) -> Generator:
    """Join the process groups when launched by torchrun, load model + tokenizer, ->
    Generator. tp: the tensor-parallel degree (default: every process of the job); the
    remaining factor of the world size is data-parallel (e.g. evaluation shards). lora: a
    LoRA dir or PEFT adapter dir run unmerged on the checkpoint (in the model's dtype)."""
    from .checkpoint import load_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = world if tp is None else tp
    device = mp.process_device(device)  # default: this process's local GPU, else the CPU
    if world > 1:
        mp.init_model_parallel(tp, device=device)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if str(device).startswith("cpu") and torch_dtype == torch.float16:
        raise ValueError("fp16 is not supported on CPU; use bf16 or fp32")
    tok_path = tokenizer or str(Path(ckpt) / "tokenizer.model")
    if not Path(tok_path).exists():
        raise FileNotFoundError(f"tokenizer not found: {tok_path} (pass --tokenizer)")
    model = load_model(ckpt, tp=tp, device=device, dtype=torch_dtype)
    if lora:
        from .checkpoint.peft import load_adaptors
        from .model.lora import lora_modules

        load_adaptors(model, lora)
        for host in lora_modules(model).values():
            host.adaptor.to(torch_dtype)  # no precision policy at inference: one compute dtype
    return Generator(model, load_tokenizer(tok_path))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prompt_tokens(gen: Generator, text: str, n_media: int, raw: bool, placeholder: int | None = None) -> list[int]:
    """Token ids for one request. Chat mode (instruct models): one user turn with the media
    first, then the text, in Meta's chat format. Raw mode (base models): media
    placeholders, <|begin_of_text|>, the text."""
    tok = gen.tokenizer
    placeholder = tok.image_token_id if placeholder is None else placeholder
    if raw:
        return [placeholder] * n_media + tok.encode(text, bos=True, eos=False)
    content = [{"type": "image"} for _ in range(n_media)] + ([{"type": "text", "text": text}] if text else [])
    ids = ChatFormat(tok).encode_dialog([{"role": "user", "content": content}])
    if placeholder != tok.image_token_id:
        ids = [placeholder if t == tok.image_token_id else t for t in ids]
    return ids


def answer_images(gen: Generator, images: list, text: str, sampling: Sampling, raw: bool = False, on_token: Callable | None = None) -> str:
    ids = prompt_tokens(gen, text, len(images), raw)
    new = gen.generate([ids], [images], on_token=on_token, **sampling.kwargs())[0]
    return gen.tokenizer.decode(new)


def describe_images(images: list, processor) -> str:
    """'800x600 -> 2x2 tiles of 560 px' per image, for the user's log."""
    parts = []
    for i, im in enumerate(images):
        _, (h, w) = processor(im)
        parts.append(f"image {i}: {im.width}x{im.height} px -> {h}x{w} tiles of {processor.tile_size} px")
    return "; ".join(parts)


def run_jsonl(requests: Iterable[dict], handle: Callable[[dict], str], out_path: str) -> int:
    """Answer each request ({"image"/"images"/"video": ..., "prompt": ...}); a bad request
    gets an "error" field instead of stopping the batch. Output is written atomically."""
    rows = []
    for i, req in enumerate(requests):
        try:
            rows.append({**req, "answer": handle(req)})
        except (ValueError, FileNotFoundError, OSError) as e:
            rows.append({**req, "error": f"{type(e).__name__}: {e}"})
    if is_main():
        tmp = Path(f"{out_path}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out_path)
    return sum("error" not in r for r in rows)


def read_jsonl(path: str) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: bad JSON ({e.msg})") from None
    return rows


def chat_loop(gen: Generator, images: list, sampling: Sampling, read: Callable[[], str] = input, write: Callable[[str], None] = print) -> None:
    """Multi-turn chat about the given images; rank 0 reads, every rank generates."""
    messages: list[dict[str, Any]] = []
    first = True
    while True:
        line = mp.broadcast_object(_read_line(read) if is_main() else None)
        if line is None or line.strip() in ("/exit", "/quit"):
            return
        content = ([{"type": "image"} for _ in images] if first else []) + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": content})
        ids = ChatFormat(gen.tokenizer).encode_dialog(messages)
        new = gen.generate([ids], [images], **sampling.kwargs())[0]
        reply = gen.tokenizer.decode(new)
        messages.append({"role": "assistant", "content": reply})
        first = False
        if is_main():
            write(reply)


def _read_line(read: Callable[[], str]) -> str | None:
    try:
        return read()
    except EOFError:
        return None


def answer_video(gen: Generator, video_path: str, text: str, sampling: Sampling, raw: bool = False, num_frames: int | None = None) -> tuple[str, str]:
    """One video + prompt -> (answer, summary of what the model saw). The chat template
    puts the <|video|> placeholder where an image item would sit."""
    import dataclasses

    from .model.video import VideoConfig, video_inputs_from_paths

    model = gen.model
    if "video" not in model.modalities:
        raise ValueError("this checkpoint has no video adapters (params.json has no 'video' entry)")
    if model.modalities["video"].fusion == "projector":
        return _answer_projector_video(gen, video_path, text, sampling, raw, num_frames)
    cfg = VideoConfig(**model.args.video)
    if num_frames is not None:
        cfg = dataclasses.replace(cfg, num_frames=num_frames)
    videos, ratios, frames = video_inputs_from_paths([[video_path]], cfg, model.args.vision_chunk_size, model.args.vision_max_num_chunks)
    token = model.modalities["video"].token_id
    ids = prompt_tokens(gen, text, 1, raw, placeholder=token)
    if not raw:  # the chat format emits the image id for media items; this one is a video
        ids = [token if t == gen.tokenizer.image_token_id else t for t in ids]
    dtype = model.vision_model.vision_projection.weight.dtype
    media = {"video": (videos.to(gen.device, dtype), ratios.to(gen.device), frames.to(gen.device))}
    new = gen.generate_from_tensors([ids], media_inputs=media, **sampling.kwargs())[0]
    h, w = ratios[0, 0].tolist()
    summary = f"video: {int(frames[0, 0])} frames sampled -> {h}x{w} tiles of {model.args.vision_chunk_size} px each"
    return gen.tokenizer.decode(new), summary


def _answer_projector_video(gen: Generator, video_path: str, text: str, sampling: Sampling, raw: bool,
                            num_frames: int | None) -> tuple[str, str]:
    """answer_video for a LLaVA model's projector video modality: the placeholder expands
    to the sampled frames' tokens in the prompt (llama_vision.inputs.prepare_videos)."""
    from .inputs import prepare_videos

    model = gen.model
    video = model.modalities["video"]
    ids = prompt_tokens(gen, text, 1, raw, placeholder=video.token_id)
    rows, media = prepare_videos(model, [ids], [[video_path]], device=gen.device, num_frames=num_frames)
    new = gen.generate_from_tensors(rows, media_inputs={"video": media}, **sampling.kwargs())[0]
    frames = int(media[1][0, 0])
    summary = (f"video: {frames} frames sampled -> {video.tokens_per_item(frames)} decoder input tokens "
               f"({frames} x {media[0].shape[-1]} px frames through the tower and projector)")
    return gen.tokenizer.decode(new), summary
