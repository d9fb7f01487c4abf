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
        "dev": ["pytest", "hypothesis", "transformers==5.23.0", "open_clip_torch"],
    },
)
