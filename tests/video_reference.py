"""A tiny text-to-video model (ModelScope's UNet3D config, scaled down) and an independent FasterDiffusion loop.

Nothing here imports keystep: these are the references keystep's UNet3D stages and video sampler are checked
against. The encoder/decoder below call diffusers' own 3-D blocks whole (keystep's stages loop over their layers).
"""

import copy

import torch

# damo-vilab/text-to-video-ms-1.7b's unet/config.json is (320, 640, 1280, 1280), 2 layers per block, 64 "heads"
# (attention_head_dim, diffusers' naming), cross-attention 1024, 32 norm groups, CrossAttn x3 + plain down blocks.
# Scaled down: two levels with the same block pattern (cross-attention down blocks, a plain last one; mirrored up)
# — every export of a 3-D UNet costs tens of seconds per level, and the pattern is what the stages must get right.
TINY_UNET3D = dict(
    block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
    norm_num_groups=8, sample_size=8,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
)


def tiny_unet3d(seed=0, **overrides):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(**{**TINY_UNET3D, **overrides}).eval()
    with torch.no_grad():  # the temporal convs' last layer starts at zero (an identity block): make them matter
        for module in unet.modules():
            if type(module).__name__ == "TemporalConvLayer":
                module.conv4[-1].weight.normal_(0, 0.05)
                module.conv4[-1].bias.normal_(0, 0.05)
    return unet


def save_text_to_video_pipeline(path, unet, vae, text_encoder, tokenizer):
    """A TextToVideoSDPipeline directory as save_pretrained writes it (ModelScope's DDIM scheduler config)."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=scheduler)
    pipe.save_pretrained(path)
    return path


# --- FasterDiffusion for video UNets, from the paper's definition with diffusers' own blocks ----------------------


def _embedding(unet, t, text, frames):
    emb = unet.time_embedding(unet.time_proj(t).to(torch.float32))
    return emb.repeat_interleave(frames, dim=0), text.repeat_interleave(frames, dim=0)


def video_encode(unet, sample, t, text):
    """(B, C, F, H, W) at the key step -> (skips incl. transformer_in's output, mid), as (B*F, ...) rows."""
    b, _, frames, h, w = sample.shape
    emb, text = _embedding(unet, t, text, frames)
    x = unet.conv_in(sample.permute(0, 2, 1, 3, 4).reshape(b * frames, -1, h, w))
    x = unet.transformer_in(x, num_frames=frames, return_dict=False)[0]
    skips = (x,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=text, num_frames=frames)
        else:
            x, res = block(hidden_states=x, temb=emb, num_frames=frames)
        skips += res
    return skips, unet.mid_block(x, emb, encoder_hidden_states=text, num_frames=frames)


def video_decode(unet, skips, mid, t, text, frames):
    """Up blocks + output head with the current step's own timestep -> (B, C, F, H, W)."""
    emb, text = _embedding(unet, t, text, frames)
    x = mid
    for i, block in enumerate(unet.up_blocks):
        res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
        size = skips[-1].shape[2:] if skips else None
        if getattr(block, "has_cross_attention", False):
            x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text,
                      upsample_size=size, num_frames=frames)
        else:
            x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size, num_frames=frames)
    x = unet.conv_out(unet.conv_act(unet.conv_norm_out(x)))
    return x.reshape(-1, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def video_encoder_propagation_sample(pipe, scheduler, prompt, latents, steps, guidance, key_steps,
                                     injection=(0.003, 0.5)):
    """A plain sequential loop: encoder at key steps, decoder every step, CFG [uncond, cond], z <- z + alpha*z_T
    before each scheduler step with t < tau*T. ``latents`` (B, C, F, H, W) as TextToVideoSDPipeline takes them."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    unet = pipe.unet
    frames = latents.shape[2]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, None)
        text = torch.cat([uncond, cond])
        z_T = latents * scheduler.init_noise_sigma
        z = z_T
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(torch.cat([z, z]), t)
            rows_t = t.expand(len(x)).float()
            if i in key_steps:
                cache = video_encode(unet, x, rows_t, text)
            noise = video_decode(unet, *cache, rows_t, text, frames)
            u, c = noise.chunk(2)
            eps = u + guidance * (c - u)
            if injection is not None and t < injection[1] * scheduler.config.num_train_timesteps:
                z = z + injection[0] * z_T
            z = scheduler.step(eps, t, z).prev_sample
    return z
