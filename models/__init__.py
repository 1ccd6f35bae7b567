"""The small trained models keystep ships (no model hub is reachable), addressable by name wherever a model path is
accepted: ``keystep build digits-dit --out B``. ``keystep models`` lists them.

Each entry says where its weights are (next to this file), what it is, and the scheduler and default plan tuned for
it (see docs/models.md for how they were trained and how the key steps were chosen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

DDPM_LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 0}


@dataclass(frozen=True)
class ShippedModel:
    name: str
    file: str
    description: str
    scheduler: dict = field(default_factory=lambda: {"_class_name": "DDIMScheduler", **DDPM_LINEAR})
    default_plan: dict = field(default_factory=dict)  # build options: steps, key_steps, guidance, width, ...

    @property
    def path(self) -> Path:
        """The weights: a file, or a diffusers-style directory (model_index.json + parts)."""
        return HERE / self.file

    @property
    def is_directory(self) -> bool:
        return not Path(self.file).suffix

    @property
    def available(self) -> bool:
        return (self.path / "model_index.json").is_file() if self.is_directory else self.path.is_file()

    @property
    def size_bytes(self) -> int:
        if self.is_directory:
            return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return self.path.stat().st_size


SHIPPED = {
    m.name: m
    for m in [
        ShippedModel(
            "digits-dit", "digits-dit.safetensors",
            "class-conditional pixel-space DiT (16x16x1, patch 4, hidden 128, 6 blocks, 4 heads) trained on sklearn digits",
            default_plan={"steps": 50, "key_steps": "uniform:6", "guidance": 2.0},
        ),
        ShippedModel(
            "digits-dydit-0.5", "digits-dydit-0.5.safetensors",
            "DyDiT fine-tune of digits-dit at lambda = 0.5: timestep-wise head/MLP widths, distilled from digits-dit "
            "(official DyDiT checkpoint layout; its token routers keep every token)",
            default_plan={"steps": 50, "key_steps": "uniform:6", "guidance": 2.0},
        ),
        ShippedModel(
            "digits-dydit-0.7", "digits-dydit-0.7.safetensors",
            "DyDiT fine-tune of digits-dit at lambda = 0.7: timestep-wise head/MLP widths, distilled from digits-dit "
            "(official DyDiT checkpoint layout; its token routers keep every token)",
            default_plan={"steps": 50, "key_steps": "uniform:6", "guidance": 2.0},
        ),
        ShippedModel(
            "digits-sd", "digits-sd",
            "Stable-Diffusion-shaped text-to-image model: CLIP text encoder + BPE tokenizer trained on digit prompts, "
            "cross-attention UNet in pixel space (16x16x1, no VAE)",
            default_plan={"steps": 50, "key_steps": "uniform:2", "guidance": 2.0},
        ),
    ]
}
CLASSIFIER = HERE / "digits-classifier.onnx"


def shipped(name: str) -> ShippedModel | None:
    return SHIPPED.get(name)


def resolve_model_path(model: str) -> str:
    """A shipped model's name -> the path of its weights; anything else unchanged."""
    entry = shipped(model)
    return str(entry.path) if entry else model
