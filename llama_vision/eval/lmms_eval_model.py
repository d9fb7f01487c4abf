"""Our model inside the harnesses users already run.

lmms-eval (0.7.x)::

    python -m lmms_eval --model llama_vision --model_args pretrained=DIR,tp=1 --tasks vqav2_val

``setup.py`` registers :func:`lmms_eval_manifest` under lmms-eval's ``lmms_eval.models``
entry-point group, so ``--model llama_vision`` is this class (it replaces lmms-eval's own
``llama_vision``, which runs transformers' Mllama), for Meta, HF and our checkpoints alike.
It answers ``generate_until``, ``loglikelihood`` and ``generate_until_multi_round``.
Under torchrun, ``tp=N`` shards one model over N processes and the remaining factor of the
world size runs data-parallel (lmms-eval splits the requests by ``rank``/``world_size``).

VLMEvalKit's message format (a list of ``{"type": "image" | "text", "value": ...}``) goes
through the same conversion: :meth:`LlamaVisionLMM.generate_inner` is VLMEvalKit's model
method name.

Nothing here is imported by the rest of llama_vision; lmms-eval is needed only to use the
class (``pip install --no-deps lmms-eval==0.7.3``; see docs/eval.md).
"""
from __future__ import annotations

import os
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

import model_parallel as mp
from llama_vision import inference
from llama_vision.tokenizer import ChatFormat

from .loglikelihood import continuation_logprobs

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


class LlamaVisionLMM(lmms):
    """lmms-eval model: ``pretrained`` = a checkpoint folder (Meta, HF or ours)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        tp: int = 1,
        device: str | None = None,
        dtype: str = "bf16",
        batch_size: int | str = 1,
        tokenizer: str | None = None,
        raw: bool = False,
        max_new_tokens: int = 1024,
        num_frames: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"llama_vision: unknown model_args {sorted(kwargs)}; known: pretrained, tp, device, dtype, batch_size, tokenizer, raw, max_new_tokens, num_frames")
        self.gen = inference.setup(pretrained, tokenizer, device, dtype, tp=int(tp))
        self.gen.model.eval()
        self.tokenizer = self.gen.tokenizer
        self.batch_size = int(batch_size)
        self.raw = _as_bool(raw)
        self.default_max_new_tokens = int(max_new_tokens)
        self.num_frames = None if num_frames is None else int(num_frames)
        self._rank, self._world_size = mp.dp_rank(), mp.dp_size()

    # -- lmms-eval request types ------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            # One generation budget per chunk: requests of one task share their kwargs.
            for group in _same_kwargs(chunk):
                contents = [self._contents(ctx, self._visuals(visual_fn, doc_id, task, split)) for ctx, _, visual_fn, doc_id, task, split in group]
                out += self.answer_batch([[{"role": "user", "content": c}] for c in contents], group[0][1])
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[tuple[str, ...]]:
        """Each round is a new user turn of one dialog (previous answers kept as assistant
        turns); rounds come from the task's doc_to_text(round_idx=..., previous_output=...)
        until it signals the end."""
        out = []
        for r in requests:
            ctx, gen_kwargs, visual_fn, doc_to_text, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            dialog = [{"role": "user", "content": self._contents(ctx, self._visuals(visual_fn, doc_id, task, split))}]
            answers, info, round_idx = [], None, 0
            while True:
                reply = self.answer_batch([dialog], gen_kwargs)[0]
                answers.append(reply)
                dialog.append({"role": "assistant", "content": reply})
                round_idx += 1
                visuals, ctx, terminal, _, info = doc_to_text(doc, previous_output=answers, round_idx=round_idx, previous_round_info=info)
                if terminal:
                    break
                dialog.append({"role": "user", "content": self._contents(ctx, list(visuals or []))})
            out.append(tuple(answers))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for r in requests:
            ctx, target, visual_fn, doc_id, task, split = r.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            dialog = [{"role": "user", "content": self._contents(ctx, self._visuals(visual_fn, doc_id, task, split))}]
            context_ids, media = self.encode([dialog])
            cont_ids = self.tokenizer.encode(continuation, bos=False, eos=False)
            out += continuation_logprobs(self.gen.model, context_ids, [cont_ids], media)
        return out

    # -- VLMEvalKit ----------------------------------------------------------------------------

    def generate_inner(self, message: list[dict[str, Any]], dataset: str | None = None) -> str:
        """VLMEvalKit's call: message = [{"type": "image", "value": path}, {"type": "text", "value": str}, ...]."""
        content = []
        for item in message:
            kind, value = item.get("type"), item.get("value")
            if kind == "image":
                content.append({"type": "image", "image": Image.open(value).convert("RGB")})
            elif kind == "video":
                content.append({"type": "video", "path": value})
            elif kind == "text":
                content.append({"type": "text", "text": value})
            else:
                raise ValueError(f"message item {item!r}: type must be image, video or text")
        return self.answer_batch([[{"role": "user", "content": content}]], {})[0]

    # -- the shared path: dialogs with media -> prompt ids + media tensors -> answers ------------

    def answer_batch(self, dialogs: list[list[dict[str, Any]]], gen_kwargs: dict[str, Any]) -> list[str]:
        """Dialogs (user content items {"type": "image", "image": PIL} / {"type": "video",
        "path": ...} / {"type": "text", "text": ...}) -> the assistant's next reply each,
        cut at the first of gen_kwargs["until"]."""
        ids, media = self.encode(dialogs)
        max_new = int(gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        kw = {"max_new_tokens": max_new, "temperature": temperature, "top_p": float(gen_kwargs.get("top_p") or 1.0), "seed": 0}
        new = self.gen.generate_from_tensors(ids, media_inputs=media, **kw)
        until = gen_kwargs.get("until") or []
        return [_cut(self.tokenizer.decode(n), [until] if isinstance(until, str) else until) for n in new]

    def encode(self, dialogs: list[list[dict[str, Any]]]) -> tuple[list[list[int]], dict[str, Any]]:
        """-> (prompt ids per dialog, the batch's media inputs)."""
        from llama_vision.inputs import prepare_image_batch

        model, tok = self.gen.model, self.tokenizer
        video_token = model.modalities["video"].token_id if "video" in model.modalities else None
        rows, images, videos = [], [], []
        for dialog in dialogs:
            row_images, row_videos = [], []
            messages = []
            for m in dialog:
                if isinstance(m["content"], str):
                    messages.append(m)
                    continue
                parts = []
                for item in m["content"]:
                    if item["type"] == "image":
                        row_images.append(item["image"])
                        parts.append({"type": "image"})
                    elif item["type"] == "video":
                        row_videos.append(item["path"])
                        parts.append({"type": "image", "video": True})
                    else:
                        parts.append({"type": "text", "text": item["text"]})
                messages.append({"role": m["role"], "content": parts})
            ids = self._dialog_ids(messages, video_token)
            rows.append(ids)
            images.append(row_images)
            videos.append(row_videos)
        media: dict[str, Any] = {}
        image_inputs = prepare_image_batch(model, [self._without_videos(r, video_token) for r in rows], images, device=self.gen.device)
        if image_inputs is not None:
            media["image"] = image_inputs
        if any(videos):
            media["video"] = self._video_inputs(videos)
        return rows, media

    def _dialog_ids(self, messages: list[dict[str, Any]], video_token: int | None) -> list[int]:
        """Meta's chat format (or raw: media placeholders, <|begin_of_text|>, the text); a
        video item is a placeholder where an image item would sit, then swapped to <|video|>."""
        tok = self.tokenizer
        order = [bool(p.get("video")) for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image"]
        if any(order) and video_token is None:
            raise ValueError("a request has a video but this checkpoint has no video adapters")
        if self.raw:
            text = "".join(p.get("text", "") for m in messages if not isinstance(m["content"], str) for p in m["content"])
            ids = [tok.image_token_id] * len(order) + tok.encode(text, bos=True, eos=False)
        else:
            clean = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [{k: v for k, v in p.items() if k != "video"} for p in m["content"]]} for m in messages]
            ids = ChatFormat(tok).encode_dialog(clean)
        flags = iter(order)
        return [video_token if t == tok.image_token_id and next(flags) else t for t in ids]

    @staticmethod
    def _without_videos(row: list[int], video_token: int | None) -> list[int]:
        return row if video_token is None else [t for t in row if t != video_token]

    def _video_inputs(self, videos: list[list[str]]):
        from llama_vision.model.video import VideoConfig, video_inputs_from_paths

        model = self.gen.model
        cfg = dict(model.args.video)
        if self.num_frames is not None:
            cfg["num_frames"] = self.num_frames
        v, ratios, frames = video_inputs_from_paths(videos, VideoConfig(**cfg), model.args.vision_chunk_size, model.args.vision_max_num_chunks)
        dtype = model.vision_model.vision_projection.weight.dtype
        return v.to(self.gen.device, dtype), ratios.to(self.gen.device), frames.to(self.gen.device)

    def _visuals(self, visual_fn, doc_id, task, split) -> list[Any]:
        if visual_fn is None:
            return []
        return list(self.flatten([visual_fn(self.task_dict[task][split][doc_id])]))

    @staticmethod
    def _contents(context: str, visuals: list[Any]) -> list[dict[str, Any]]:
        """Media first (where Meta's prompts put <|image|>), then the text; lmms-eval's
        "<image>" markers in the text are dropped."""
        items: list[dict[str, Any]] = []
        for v in visuals:
            if isinstance(v, Image.Image):
                items.append({"type": "image", "image": v.convert("RGB")})
            elif isinstance(v, str) and v.lower().endswith(VIDEO_SUFFIXES):
                items.append({"type": "video", "path": v})
            elif isinstance(v, str) and os.path.exists(v):
                items.append({"type": "image", "image": Image.open(v).convert("RGB")})
            else:
                raise ValueError(f"unsupported visual {type(v).__name__}: {str(v)[:80]!r} (images and video files only)")
        return items + [{"type": "text", "text": context.replace("<image>", "").strip()}]

    @staticmethod
    def flatten(items: list) -> list:
        return [x for sub in items for x in (sub if isinstance(sub, (list, tuple)) else [sub])]


def _same_kwargs(chunk: list[tuple]) -> list[list[tuple]]:
    """Consecutive requests with equal generation kwargs, in order."""
    groups: list[list[tuple]] = []
    for args in chunk:
        if groups and groups[-1][0][1] == args[1]:
            groups[-1].append(args)
        else:
            groups.append([args])
    return groups


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point: ``--model llama_vision`` is this class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="llama_vision", simple_class_path="llama_vision.eval.lmms_eval_model.LlamaVisionLMM")
