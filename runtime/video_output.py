"""Write sampled frames as an animated file: GIF through Pillow (a runtime dependency), MP4 (H.264, yuv420p)
through imageio-ffmpeg (the optional ``video`` extra: ``pip install 'keystep[video]'``; its wheels ship an ffmpeg
binary). Torch-free, so a serving process can use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .sampler import SamplingError

VIDEO_SUFFIXES = (".gif", ".mp4")
DEFAULT_FPS = 8


def check_video_path(path: str | Path) -> Path:
    """The output path, refused (before any sampling) when its suffix is not a format keystep writes or the MP4
    writer is missing."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise SamplingError(f"cannot write video {path}: use a .gif or .mp4 file name")
    if suffix == ".mp4":
        _imageio_ffmpeg()
    return path


def _imageio_ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise SamplingError("writing .mp4 needs imageio-ffmpeg (pip install 'keystep[video]'); "
                            "or write a .gif") from None
    return imageio_ffmpeg


def write_video(frames: np.ndarray, path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    """``frames``: uint8 (F, H, W, 3) or (F, H, W, 1). GIF frames last ``round(1000 / fps)`` ms and loop forever;
    MP4 is H.264 at quality 8 (imageio-ffmpeg's scale), sizes padded to even by ffmpeg's macro-block rule."""
    path = check_video_path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[-1] not in (1, 3):
        raise SamplingError(f"video frames must be uint8 (frames, H, W, 1|3), got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise SamplingError(f"fps must be positive, got {fps}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part{path.suffix}")  # never leave a half-written file under the real name
    try:
        if path.suffix.lower() == ".gif":
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                           duration=round(1000 / fps), optimize=False)
        else:
            writer = _imageio_ffmpeg().write_frames(str(tmp), (frames.shape[2], frames.shape[1]), fps=fps,
                                                    codec="libx264", pix_fmt_out="yuv420p", quality=8,
                                                    macro_block_size=2)
            writer.send(None)
            for f in frames:
                writer.send(np.ascontiguousarray(f))
            writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_videos(videos: np.ndarray, out: str | Path, fps: float = DEFAULT_FPS) -> list[Path]:
    """One file per video: ``out`` itself for one, ``NAME-i.SUFFIX`` for several."""
    out = Path(out)
    paths = [out] if len(videos) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(videos))]
    return [write_video(v, p, fps) for v, p in zip(videos, paths)]
