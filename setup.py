from setuptools import find_packages, setup

setup(
    name="llama_vision",
    version="0.1.0",
    description="Llama-3-style vision-language models: ViT-H/14 encoder, video aggregator and "
    "gated cross-attention adapters on a frozen Llama 3 decoder, tensor-parallel with fairscale.",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_vision", "llama_vision.*", "model_parallel", "model_parallel.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "fairscale>=0.4.13",
        "tiktoken>=0.7",
        "sentencepiece",
        "decord",
        "pillow",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
        "tensorboard",
        "matplotlib",
        "av",
    ],
    extras_require={
        "gpu": ["xformers", "flash-attn"],
        # The evaluation harness's parquet reader (the published benchmark snapshots).
        "eval": ["pyarrow"],
        # The OpenAI-compatible server (tools/serve.py).
        "serve": ["fastapi>=0.100", "uvicorn>=0.23"],
        # Data curation on Ray (tools/curate.py; OCR stages also need Debian's tesseract-ocr).
        "curate": ["ray[data]>=2.40", "faiss-cpu", "imagehash", "opencv-python-headless", "pyarrow", "open_clip_torch"],
        # lmms-eval itself is installed with --no-deps (its pins: av<16, wandb, opencv, ...);
        # these are what its metric, task, evaluator and CLI modules import (its evaluator
        # imports filelock._api, which filelock 4 removed).
        "dev": ["pytest", "hypothesis", "transformers==5.23.0", "open_clip_torch", "pyarrow", "datasets",
                "loguru", "sacrebleu", "evaluate", "accelerate", "tenacity", "pytz", "filelock<4", "pytablewriter",
                "fastapi>=0.100", "uvicorn>=0.23", "openai>=1.0", "playwright>=1.40", "peft==0.21.2",
                "ray[data]==2.60.0", "faiss-cpu==1.15.1", "imagehash==4.3.2", "opencv-python-headless==5.0.0.93"],
    },
    package_data={"llama_vision.serving": ["static/*.html"]},
    # `python -m lmms_eval --model llama_vision` runs llama_vision.eval.lmms_eval_model.
    entry_points={"lmms_eval.models": ["llama_vision = llama_vision.eval.lmms_eval_model:lmms_eval_manifest"]},
)
