"""The runtime must import and run a bundle with torch/diffusers/transformers/onnx unimportable: a DiT, an SDXL
bundle (both CLIP tokenizers in pure Python) and a DeepFloyd-IF cascade (T5 through the tokenizers library)."""

import subprocess
import sys
import textwrap

import pytest

CASES = {  # fixture, keystep.load(...)(**arguments), keystep generate's arguments
    "dit": ("tiny_bundle", dict(class_labels=[2], num_inference_steps=3), ["--class", "1", "--steps", "4"]),
    "sdxl": ("sdxl_bundle_dir", dict(prompt="a cat", prompt_2="a dog", num_inference_steps=2, height=64, width=64),
             ["--prompt", "a cat", "--prompt-2", "a dog", "--steps", "2", "--height", "64", "--width", "64"]),
    "if-cascade": ("if_bundle_dir", dict(prompt="a cat", num_inference_steps=2), ["--prompt", "a cat", "--steps", "2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_runs_a_bundle_without_torch(case, request, tmp_path):
    fixture, arguments, args = CASES[case]
    bundle = request.getfixturevalue(fixture)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers", "onnx"):
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        import keystep.runtime
        # the GPU backends and the engine plan import without torch or onnx (TensorRT itself is imported lazily)
        import keystep.runtime.engine_plan, keystep.runtime.backends.tensorrt, keystep.runtime.backends.cuda
        import keystep.runtime.backends.onnxruntime_gpu
        import keystep.runtime.video_sampler, keystep.runtime.video_output  # text-to-video serving needs no torch
        # what runs inside a Triton server: the API, the orchestrator, the stage models, the BLS backend
        import keystep.runtime.pipeline, keystep.runtime.triton.orchestrator, keystep.runtime.triton.stage
        import keystep.runtime.triton.bls
        import keystep
        out = keystep.load({str(bundle)!r})(**{arguments!r}, output_type="latent")
        assert out.latents.ndim == 4 and np.isfinite(out.latents).all()
        from keystep.tools.cli import main
        rc = main(["generate", {str(bundle)!r}, *{args!r}, "--save-latents", {str(tmp_path / "z.npy")!r}])
        assert rc == 0, rc
        assert not any(m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx") for m in sys.modules)
        print("OK")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    assert (tmp_path / "z.npy").is_file()
