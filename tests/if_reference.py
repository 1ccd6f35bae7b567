"""Tiny DeepFloyd-IF parts built from the real configs scaled down (no hub), and a torch-backed noise source so the
runtime's stochastic DDPM steps can draw exactly the noise diffusers' pipelines draw.

Nothing here imports keystep: these are references the IF cascade is checked against.
"""

import string

import numpy as np
import torch

# IF-I-XL's UNet scaled down: Resnet(Down|Up)sample blocks at the top level, SimpleCrossAttn (added K/V) below,
# T5 states through encoder_hid_proj and pooled by attention into the time embedding (addition_embed_type "text"),
# scale-shift resnets, GELU, learned variance (3 -> 6 channels). 64 px -> 16 px here.
TINY_IF_STAGE_1 = dict(
    sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32, 32),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    cross_attention_dim=32, encoder_hid_dim=32, encoder_hid_dim_type="text_proj", attention_head_dim=8,
    addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8,
)
# IF-II-L scaled down: the upscaled stage-I image concatenated with the noisy sample (6 channels in), the noise level
# as a "timestep" class embedding, GELU time embedding activation, mid-block scale 1.414. 256 px -> 32 px here.
TINY_IF_STAGE_2 = dict(
    sample_size=32, in_channels=6, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    cross_attention_dim=32, encoder_hid_dim=32, encoder_hid_dim_type="text_proj", attention_head_dim=8,
    addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8, class_embed_type="timestep",
    mid_block_scale_factor=1.414, time_embedding_act_fn="gelu", time_embedding_dim=64,
)
# The IF schedulers: cosine betas, dynamic thresholding, learned-range variance; stage II noises its input image
# with a plain DDPM schedule.
IF_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
                    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True,
                    prediction_type="epsilon", variance_type="learned_range")
IF_NOISING_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                            beta_end=0.02)


def tiny_t5():
    """T5 v1.1's encoder (gated GELU, relative attention buckets) scaled down from t5-v1_1-xxl."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(10)
    return T5EncoderModel(T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        tie_word_embeddings=False, is_encoder_decoder=False)).eval()


def tiny_t5_tokenizer():
    """A transformers T5Tokenizer (Unigram) over a small hand-written vocabulary with SentencePiece-style pieces."""
    from transformers import T5Tokenizer

    words = "a an the of photo cat dog astronaut riding horse on in painting oil red blue green big small".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,!?'-&"]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_lowercase]
    pieces += [("\u2581" + w, -1.0 - 0.1 * i) for i, w in enumerate(words)]
    pieces += [(w, -3.0) for w in ("ing", "er", "ed", "s", "ion")]
    return T5Tokenizer(vocab=pieces, extra_ids=8)


def tiny_if_unet(config, seed):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def tiny_if_pipelines():
    """(IFPipeline, IFSuperResolutionPipeline) sharing one T5 and tokenizer, no safety checker or watermarker."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    t5, tokenizer = tiny_t5(), tiny_t5_tokenizer()
    common = dict(text_encoder=t5, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, watermarker=None,
                  requires_safety_checker=False)
    stage_1 = IFPipeline(unet=tiny_if_unet(TINY_IF_STAGE_1, 11), scheduler=DDPMScheduler(**IF_SCHEDULER), **common)
    stage_2 = IFSuperResolutionPipeline(unet=tiny_if_unet(TINY_IF_STAGE_2, 12), scheduler=DDPMScheduler(**IF_SCHEDULER),
                                        image_noising_scheduler=DDPMScheduler(**IF_NOISING_SCHEDULER), **common)
    for pipe in (stage_1, stage_2):
        pipe.set_progress_bar_config(disable=True)
    return stage_1, stage_2


class TorchNormal:
    """numpy-Generator-like noise from a torch generator: ``standard_normal(shape)`` returns what diffusers'
    ``randn_tensor(shape, generator=g)`` returns on the CPU, in call order."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def standard_normal(self, shape, dtype=np.float32):
        return torch.randn(tuple(shape), generator=self.generator).numpy().astype(dtype)
