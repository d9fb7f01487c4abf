"""torchrun worker: one training run from a config + overrides (argv[1] = JSON list)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_vision.config import load_config  # noqa: E402
from llama_vision.training.train_config import TrainConfig  # noqa: E402
from llama_vision.training.trainer import train  # noqa: E402

if __name__ == "__main__":
    config, overrides = sys.argv[1], json.loads(sys.argv[2])
    train(load_config(TrainConfig, config, overrides))
