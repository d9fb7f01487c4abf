"""Our model inside the harnesses users already run.

lmms-eval (0.7.x)::

    python -m lmms_eval --model llama_vision --model_args pretrained=DIR,tp=1 --tasks vqav2_val

``setup.py`` registers :func:`lmms_eval_manifest` under lmms-eval's ``lmms_eval.models``
entry-point group, so ``--model llama_vision`` is this class (it replaces lmms-eval's own
``llama_vision``, which runs transformers' Mllama), for Meta, HF and our checkpoints alike.
It answers ``generate_until``, ``loglikelihood`` and ``generate_until_multi_round``.

Under torchrun, ``tp=N`` shards one model over N processes and the remaining factor of the
world size runs data-parallel. lmms-eval splits the documents over every process (by
``RANK``/``WORLD_SIZE``), so the N processes of one tensor-parallel group hold different
requests: they exchange theirs batch by batch and all run the group's union (the forwards
of a TP group must be identical), each keeping its own answers.

VLMEvalKit's message format (a list of ``{"type": "image" | "video" | "text", "value":
...}``) goes through the same conversion: :meth:`LlamaVisionLMM.generate_inner` is
VLMEvalKit's model method name.

Nothing here is imported by the rest of llama_vision; lmms-eval is needed only to use the
class (``pip install --no-deps lmms-eval==0.7.3``; see docs/eval.md).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from lmms_eval.api.instance import Instance

try:
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # lmms-eval < 0.7
    GenerationResult = None
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

import model_parallel as mp
from llama_vision import inference
from llama_vision.tokenizer import ChatFormat

from .loglikelihood import continuation_logprobs

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MODEL_ARGS = ("pretrained", "tp", "device", "dtype", "batch_size", "tokenizer", "raw", "max_new_tokens", "num_frames")

# A request made ready for the model: (dialog, generation kwargs or continuation text).
# A dialog is a list of messages {"role", "content": str | [content items]}; content items
# are {"type": "image", "image": PIL} / {"type": "video", "path": str} / {"type": "text", "text": str}.
Dialog = list[dict[str, Any]]


class LlamaVisionLMM(lmms):
    """lmms-eval model: ``pretrained`` = a checkpoint folder (Meta, HF or ours).

    model_args: ``pretrained`` (required), ``tp`` (tensor-parallel degree, default 1),
    ``device`` (default: the local GPU, else the CPU), ``dtype`` (bf16 | fp16 | fp32),
    ``batch_size``, ``tokenizer`` (default ``pretrained/tokenizer.model``), ``raw`` (true:
    base-model prompts ``<|image|><|begin_of_text|>text`` instead of the chat format),
    ``max_new_tokens`` (when a task sets none), ``num_frames`` (frames sampled per video;
    default: the checkpoint's video config).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
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
        kwargs.pop("max_batch_size", None)  # lmms-eval's --max_batch_size (for batch_size=auto): nothing to size
        if kwargs:
            raise ValueError(f"llama_vision: unknown model_args {sorted(kwargs)}; known: {', '.join(MODEL_ARGS)}")
        if not pretrained:
            raise ValueError("llama_vision: model_args needs pretrained=CHECKPOINT_DIR")
        if not os.path.isdir(str(pretrained)):
            raise FileNotFoundError(f"llama_vision: pretrained={pretrained!r} is not a checkpoint folder")
        if dtype not in inference.DTYPES:
            raise ValueError(f"llama_vision: dtype must be one of {sorted(inference.DTYPES)}, got {dtype!r}")
        tp = _positive_int(tp, "tp")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.default_max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.num_frames = None if num_frames is None else _positive_int(num_frames, "num_frames")
        self.raw = _as_bool(raw, "raw")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % tp:
            raise ValueError(f"llama_vision: tp={tp} must divide the number of processes ({world}); "
                             f"launch with torchrun --nproc_per_node=<a multiple of {tp}> -m lmms_eval ...")
        self.gen = inference.setup(str(pretrained), tokenizer, device, dtype, tp=tp)
        self.gen.model.eval()
        self.tokenizer = self.gen.tokenizer
        # lmms-eval shards documents over all processes by these (and sets them itself too).
        self._rank, self._world_size = int(os.environ.get("RANK", "0")), world

    @property
    def device(self):
        """The model's device (lmms-eval puts its cross-rank count tensors there)."""
        return self.gen.device

    # -- lmms-eval request types ------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def prepare(args: tuple) -> tuple[Dialog, dict]:
            ctx, gen_kwargs, visual_fn, doc_id, task, split = args
            return self._dialog(ctx, self._visuals(visual_fn, doc_id, task, split)), gen_kwargs

        return self._in_chunks([r.args for r in requests], prepare, self._generate, "generate_until")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """lmms-eval's multi-round protocol: round 0 is the request's context and visuals;
        after each round the task's ``doc_to_text(doc, previous_output=[answers so far],
        round_idx=k, previous_round_info=...)`` returns ``(visuals, context, terminal,
        outputs, info)``: the next round's own prompt (each round is a fresh single-turn
        request, as in lmms-eval's reference models; the task carries whatever history it
        wants in the context), until ``terminal``. ``outputs`` (when not None) replaces the
        answers so far. -> the answers of every round, one list per request (a list, which
        lmms-eval passes to the task's process_results as is)."""
        states = []
        for r in requests:
            ctx, gen_kwargs, visual_fn, doc_to_text, doc_id, task, split = r.args
            states.append(_Rounds(self.task_dict[task][split][doc_id], ctx, gen_kwargs, doc_to_text,
                                  lambda v=visual_fn, d=doc_id, t=task, s=split: self._visuals(v, d, t, s)))
        while True:
            active = [s for s in states if not s.done]
            # Under TP every rank of the group runs every round of the group's requests.
            if not self._group_any(bool(active)):
                break
            replies = self._in_chunks(active, lambda s: (self._dialog(s.context, s.visuals()), s.gen_kwargs), self._generate)
            for s, reply in zip(active, replies):
                s.advance(reply)
        return [list(s.outputs) for s in states]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """-> (negative log-likelihood of the continuation, whether it is the greedy
        continuation) per request: lmms-eval's convention, see :meth:`_score`."""
        def prepare(args: tuple) -> tuple[Dialog, str]:
            if len(args) == 2:  # the unconditional requests of acc_mutual_info: no visuals
                ctx, target, visuals = args[0], args[1], []
            else:
                ctx, target, visual_fn, doc_id, task, split = args
                if callable(target):
                    target = target(self.task_dict[task][split][doc_id])
                visuals = self._visuals(visual_fn, doc_id, task, split)
            return self._dialog(ctx, visuals), str(target)

        return [_pass_through(pair) for pair in self._in_chunks([r.args for r in requests], prepare, self._score, "loglikelihood")]

    # -- VLMEvalKit ----------------------------------------------------------------------------

    def generate_inner(self, message: list[dict[str, Any]] | str, dataset: str | None = None) -> str:
        """VLMEvalKit's call: message = [{"type": "image", "value": path}, {"type": "text",
        "value": str}, ...] (a video item's value is a file path; a bare str is text) -> the
        answer. Same prompt as lmms-eval's requests: the items in order, in one user turn."""
        items = [message] if isinstance(message, str) else message
        content = []
        for item in items:
            if isinstance(item, str):
                item = {"type": "text", "value": item}
            kind, value = item.get("type"), item.get("value")
            if kind == "image":
                content.append({"type": "image", "image": _load_image(value)})
            elif kind == "video":
                content.append({"type": "video", "path": str(value)})
            elif kind == "text":
                content.append({"type": "text", "text": str(value)})
            else:
                raise ValueError(f"llama_vision: message item {item!r}: type must be image, video or text")
        return self._in_chunks([([{"role": "user", "content": content}], {})], lambda x: x, self._generate)[0]

    # -- the shared path: dialogs with media -> prompt ids + media tensors -> answers ------------

    def _in_chunks(self, items: Sequence[Any], prepare: Callable[[Any], tuple], run: Callable[[list], list], desc: str | None = None) -> list:
        """run([prepare(x) for x in chunk]) per chunk of batch_size items, in order.

        Under tensor parallelism the ranks of one TP group (which lmms-eval gives different
        documents) must run identical forwards: at each step every rank prepares its next
        chunk, the group exchanges them, every rank runs the union and keeps its own part;
        a rank with fewer chunks takes part with empty ones until the group is done."""
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        out: list = []
        tp = mp.tp_size()
        n = len(chunks) if tp == 1 else max(mp.all_gather_object(len(chunks), group="tp"))
        bar = tqdm(total=len(items), desc=desc, disable=desc is None or self.rank != 0)
        for i in range(n):
            mine = [prepare(x) for x in chunks[i]] if i < len(chunks) else []
            if tp == 1:
                out += run(mine)
            else:
                parts = mp.all_gather_object(mine, group="tp")
                union = [w for p in parts for w in p]
                start = sum(len(p) for p in parts[: mp.tp_rank()])
                out += (run(union) if union else [])[start : start + len(mine)]
            bar.update(len(mine))
        bar.close()
        return out

    def _group_any(self, flag: bool) -> bool:
        return flag if mp.tp_size() == 1 else any(mp.all_gather_object(flag, group="tp"))

    def _generate(self, items: list[tuple[Dialog, dict]]) -> list[str]:
        """(dialog, gen_kwargs) -> the assistant's next reply each; batches of consecutive
        items with the same kwargs and media kind."""
        out: list[str] = []
        for batch in _batches(items, self.batch_size, key=lambda it: (it[1], _has_video(it[0]))):
            out += self.answer_batch([d for d, _ in batch], batch[0][1])
        return out

    def _score(self, items: list[tuple[Dialog, str]]) -> list[tuple[float, bool]]:
        """(dialog, continuation) -> (-log p(continuation | dialog's prompt), is greedy).

        The NEGATIVE log-likelihood (summed over the continuation's tokens): lmms-eval's
        models return a loss there and its multiple_choice scoring picks the argmin
        (lmms_eval/api/task.py, process_results), so acc is lm-eval's argmax-likelihood
        acc and acc_norm its per-character normalised one."""
        out: list[tuple[float, bool]] = []
        for batch in _batches(items, self.batch_size, key=lambda it: _has_video(it[0])):
            context_ids, media = self.encode([d for d, _ in batch])
            conts = [self._continuation_ids(c) for _, c in batch]
            room = self.gen.model.args.max_seq_len
            for ctx, cont in zip(context_ids, conts):
                if len(ctx) + len(cont) > room:
                    raise ValueError(f"llama_vision: context ({len(ctx)} tokens) + continuation ({len(cont)}) exceed max_seq_len={room}")
            out += [(-logp, greedy) for logp, greedy in continuation_logprobs(self.gen.model, context_ids, conts, media)]
        return out

    def _continuation_ids(self, continuation: str) -> list[int]:
        # The chat format's assistant turn starts right after its header's "\n\n": the
        # space lmms-eval puts before a choice (target_delimiter " ") is not part of it.
        text = continuation if self.raw else continuation.lstrip()
        ids = self.tokenizer.encode(text, bos=False, eos=False)
        if not ids:
            raise ValueError(f"llama_vision: empty continuation {continuation!r}")
        return ids

    def answer_batch(self, dialogs: list[Dialog], gen_kwargs: dict[str, Any]) -> list[str]:
        """Dialogs -> the assistant's next reply each, cut at the first of
        gen_kwargs["until"] (lmms-eval's generation kwargs: max_new_tokens, temperature,
        top_p, do_sample, until)."""
        ids, media = self.encode(dialogs)
        new = self.gen.generate_from_tensors(ids, media_inputs=media, **self._sampling(gen_kwargs, max(map(len, ids))))
        until = gen_kwargs.get("until") or []
        return [_cut(self.tokenizer.decode(n), [until] if isinstance(until, str) else list(until)) for n in new]

    def _sampling(self, gen_kwargs: dict[str, Any], prompt_len: int) -> dict[str, Any]:
        room = self.gen.model.args.max_seq_len - prompt_len
        if room < 1:
            raise ValueError(f"llama_vision: a prompt of {prompt_len} tokens leaves no room to generate (max_seq_len={self.gen.model.args.max_seq_len})")
        # A task's budget is cut to what the context window has left.
        max_new = min(int(gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens), room)
        # transformers' semantics: do_sample=false is greedy whatever the temperature;
        # do_sample=true without a temperature samples at 1.0.
        do_sample = gen_kwargs.get("do_sample")
        sample = None if do_sample is None else _as_bool(do_sample, "do_sample")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if sample is False:
            temperature = 0.0
        elif sample and gen_kwargs.get("temperature") is None:
            temperature = 1.0
        # seed=None: sampling draws from torch's RNG, which lmms-eval seeds (--seed); under
        # TP, Generator broadcasts one draw to the group.
        return {"max_new_tokens": max_new, "temperature": temperature, "top_p": float(gen_kwargs.get("top_p") or 1.0), "seed": None}

    def encode(self, dialogs: list[Dialog]) -> tuple[list[list[int]], dict[str, Any]]:
        """-> (prompt ids per dialog, the batch's media inputs)."""
        from llama_vision.inputs import prepare_images, prepare_videos

        model = self.gen.model
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
            rows.append(self._dialog_ids(messages, video_token))
            images.append(row_images)
            videos.append(row_videos)
        media: dict[str, Any] = {}
        # (a LLaVA model's projector modalities expand each placeholder to the item's tokens)
        rows, image_inputs = prepare_images(model, rows, images, device=self.gen.device)
        if image_inputs is not None:
            media["image"] = image_inputs
        if any(videos) and model.modalities["video"].fusion == "projector":
            rows, media["video"] = prepare_videos(model, rows, videos, device=self.gen.device, num_frames=self.num_frames)
        elif any(videos):
            media["video"] = self._video_inputs(videos)
        return rows, media

    def _dialog_ids(self, messages: list[dict[str, Any]], video_token: int | None) -> list[int]:
        """Meta's chat format (or raw: media placeholders, <|begin_of_text|>, the text); a
        video item is a placeholder where an image item would sit, then swapped to <|video|>."""
        tok = self.tokenizer
        order = [bool(p.get("video")) for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image"]
        if any(order) and video_token is None:
            raise ValueError("llama_vision: a request has a video but this checkpoint has no video adapters (params.json has no 'video' entry)")
        if self.raw:
            text = "".join(m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"]) for m in messages)
            ids = [tok.image_token_id] * len(order) + tok.encode(text, bos=True, eos=False)
        else:
            clean = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [{k: v for k, v in p.items() if k != "video"} for p in m["content"]]} for m in messages]
            ids = ChatFormat(tok).encode_dialog(clean)
        flags = iter(order)
        return [video_token if t == tok.image_token_id and next(flags) else t for t in ids]

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
        return self.flatten(visual_fn(self.task_dict[task][split][doc_id]))

    def _dialog(self, context: str, visuals: list[Any]) -> Dialog:
        return [{"role": "user", "content": self._contents(context, visuals)}]

    @staticmethod
    def _contents(context: str, visuals: list[Any]) -> list[dict[str, Any]]:
        """Media first (where Meta's prompts put <|image|>), then the text; lmms-eval's
        "<image>" markers in the text are dropped."""
        items: list[dict[str, Any]] = []
        for v in visuals:
            if isinstance(v, Image.Image):
                items.append({"type": "image", "image": v.convert("RGB")})
            elif isinstance(v, (str, os.PathLike)) and str(v).lower().endswith(VIDEO_SUFFIXES):
                items.append({"type": "video", "path": str(v)})
            elif isinstance(v, (str, os.PathLike)) and str(v).lower().endswith(IMAGE_SUFFIXES):
                items.append({"type": "image", "image": _load_image(v)})
            else:
                raise ValueError(f"llama_vision: unsupported visual {type(v).__name__} {str(v)[:80]!r} (PIL images, image and video files only)")
        return items + [{"type": "text", "text": (context or "").replace("<image>", "").strip()}]

    @staticmethod
    def flatten(visuals: Any) -> list:
        """A task's doc_to_visual result (None, one item, a list, a list of lists) -> a list."""
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            return [visuals]
        return [x for sub in visuals for x in (sub if isinstance(sub, (list, tuple)) else [sub]) if x is not None]


class _Rounds:
    """One multi-round request's state."""

    def __init__(self, doc, context: str, gen_kwargs: dict, doc_to_text: Callable, first_visuals: Callable[[], list]):
        self.doc, self.context, self.gen_kwargs, self.doc_to_text = doc, context, gen_kwargs, doc_to_text
        self.visuals = first_visuals
        self.outputs: list[str] = []
        self.info = None
        self.rounds = 0
        self.done = False

    def advance(self, reply: str) -> None:
        self.outputs.append(reply)
        self.rounds += 1
        step = self.doc_to_text(self.doc, previous_output=list(self.outputs), round_idx=self.rounds, previous_round_info=self.info)
        if not (isinstance(step, tuple) and len(step) == 5):
            raise ValueError(f"llama_vision: a multi-round doc_to_text must return (visuals, context, terminal, outputs, info), got {type(step).__name__}")
        visuals, context, terminal, outputs, self.info = step
        if outputs is not None:
            self.outputs = list(outputs)
        if terminal:
            self.done = True
            return
        self.context = context if context is not None else ""
        rounds_visuals = LlamaVisionLMM.flatten(visuals)
        self.visuals = lambda: rounds_visuals


def _pass_through(pair: tuple[float, bool]):
    """A loglikelihood pair that reaches the task as it is: lmms-eval 0.7.x passes every
    model output through ``unwrap_generation_output``, which turns anything but a str, a
    list of str or a ``GenerationResult`` into ``str(output)`` -- a ``(float, bool)`` pair
    included, which its multiple_choice scoring then cannot unpack. A GenerationResult's
    ``text`` is handed on untouched."""
    if GenerationResult is None:  # an lmms-eval without the wrapper takes the pair itself
        return pair
    return GenerationResult(text=pair)  # type: ignore[arg-type]


def _batches(items: list, size: int, key: Callable[[Any], Any]) -> list[list]:
    """Consecutive items with equal key(item), at most `size` per batch, in order."""
    out: list[list] = []
    last = object()
    for it in items:
        k = key(it)
        if out and k == last and len(out[-1]) < size:
            out[-1].append(it)
        else:
            out.append([it])
        last = k
    return out


def _has_video(dialog: Dialog) -> bool:
    return any(not isinstance(m["content"], str) and any(p["type"] == "video" for p in m["content"]) for m in dialog)


def _load_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    with Image.open(value) as im:
        return im.convert("RGB")


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no", "none", ""):
        return False
    raise ValueError(f"llama_vision: {name} must be true or false, got {value!r}")


def _positive_int(value: Any, name: str) -> int:
    try:
        n = int(value)
        ok = n >= 1 and float(value) == n
    except (TypeError, ValueError):
        ok = False
    if not ok:
        hint = " (batch_size=auto is not supported: give a number)" if name == "batch_size" else ""
        raise ValueError(f"llama_vision: {name} must be a positive integer, got {value!r}{hint}")
    return n


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point: ``--model llama_vision`` is this class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="llama_vision", simple_class_path="llama_vision.eval.lmms_eval_model.LlamaVisionLMM")
