"""Tiny Stable-Diffusion parts built from configs (no hub) and an independent FasterDiffusion reference loop.

Nothing here imports keystep: these are the references keystep's UNet stages and sampler are checked against.
"""

import torch

TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, sample_size=16,
    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def tiny_unet(seed=0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(  # four blocks: the 8x latent -> image factor of SD; one resnet per decoder block
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=0, norm_num_groups=8, sample_size=128, scaling_factor=0.18215,
    ).eval()


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    return CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()


def tiny_tokenizer_vocab() -> dict[str, int]:
    """A byte-level CLIP BPE vocabulary without merges (every byte is a token): valid, tiny, no hub needed."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


# SDXL base scaled down: 3 levels (DownBlock2D, then two CrossAttn levels), 1 layer per down block (2 up: the up
# path is deeper, as SDXL's 2/3), transformer depth growing per level (SDXL: 1/2/10 -> 1/1/2), linear projections,
# heads per level, text_time added embedding (pooled projection 32 + 6 time ids x 8), two text encoders of
# different widths (24 + 40 = 64).
TINY_SDXL_UNET = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4), use_linear_projection=True, cross_attention_dim=64, sample_size=16,
    norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)
SDXL_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                      timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)


def tiny_sdxl_text_encoders():
    """(CLIPTextModel, CLIPTextModelWithProjection), 3 layers each so the penultimate layer is not the last."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=1000,
                  max_position_embeddings=77, bos_token_id=512, eos_token_id=513)
    torch.manual_seed(4)
    first = CLIPTextModel(CLIPTextConfig(hidden_size=24, pad_token_id=513, **common)).eval()
    torch.manual_seed(5)
    second = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=40, projection_dim=32, pad_token_id=0,
                                                        **common)).eval()
    return first, second


def tiny_sdxl_pipeline(seed=6):
    """A StableDiffusionXLPipeline of tiny random parts (the second tokenizer pads with "!" like OpenCLIP bigG)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    unet = tiny_unet(seed, **TINY_SDXL_UNET)
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)
    first, second = tiny_sdxl_text_encoders()
    vocab = tiny_tokenizer_vocab()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=first, text_encoder_2=second,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="!"),
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
        add_watermarker=False)


def tiny_controlnet(unet):
    from diffusers import ControlNetModel

    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16)).eval()
    with torch.no_grad():  # ControlNet's zero convs start at 0: randomise them, or the residuals are all zero
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out]:
            for p in module.parameters():
                p.normal_(0, 0.1)
    return controlnet




# --- FasterDiffusion for UNets, written from the paper's definition with diffusers' own blocks ----------------------


def time_embedding(unet, t, added=None, class_labels=None, text=None):
    """emb as UNet2DConditionModel.forward defines it: time MLP(sinusoid(t)) [+ class MLP(sinusoid(class_labels)),
    class_embed_type "timestep"] [+ attention-pooled raw text, addition_embed_type "text"] [+ SDXL's added
    embedding of (pooled text, sinusoid(time ids))], then time_embed_act."""
    emb = unet.time_embedding(unet.time_proj(t).to(torch.float32))
    if class_labels is not None:
        emb = emb + unet.class_embedding(unet.time_proj(class_labels).to(torch.float32))
    if unet.config.addition_embed_type == "text":
        emb = emb + unet.add_embedding(text)
    if added is not None:
        time_embeds = unet.add_time_proj(added["time_ids"].flatten()).reshape(len(t), -1)
        emb = emb + unet.add_embedding(torch.cat([added["text_embeds"], time_embeds], dim=-1))
    return emb if unet.time_embed_act is None else unet.time_embed_act(emb)


def cross_attention_states(unet, text):
    """encoder_hid_proj (IF: T5 width -> cross-attention width) when the UNet has one."""
    return text if unet.encoder_hid_proj is None else unet.encoder_hid_proj(text)


def fd_encode(unet, sample, t, text, down_res=None, mid_res=None, added=None, class_labels=None):
    """conv_in + down blocks + mid block at the key step -> (skip features incl. conv_in output, mid feature)."""
    emb = time_embedding(unet, t, added, class_labels, text)
    text = cross_attention_states(unet, text)
    h = unet.conv_in(sample)
    skips = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    if down_res is not None:  # ControlNet residuals, as diffusers' UNet adds them
        skips = tuple(s + r for s, r in zip(skips, down_res))
    h = unet.mid_block(h, emb, encoder_hidden_states=text)
    return skips, (h if mid_res is None else h + mid_res)


def fd_decode(unet, skips, mid, t, text, added=None, class_labels=None):
    """Up blocks + output head with the current step's own timestep (and the rows' added conditioning)."""
    emb = time_embedding(unet, t, added, class_labels, text)
    text = cross_attention_states(unet, text)
    h = mid
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def encoder_propagation_loop(unet, scheduler, text, latents, steps, guidance, key_steps, injection=(0.003, 0.5),
                             added=None, controlnet=None, control_image=None, control_scale=1.0, image=None,
                             class_labels=None, generator=None):
    """A plain sequential loop: encoder (and ControlNet) at key steps, decoder every step, CFG rows [uncond, cond]
    (``text``, ``added``, ``class_labels`` already in that layout), z <- z + alpha*z_T before each scheduler step
    with t < tau*T. ``latents`` as the diffusers pipelines take them. IF: ``image`` (the upscaled image, one row per
    sample) is concatenated to the sample's channels, a UNet with twice the sample's output channels has learned
    variance (guidance on epsilon, the conditional half's variance kept), ``generator`` feeds DDPM's noise."""
    import copy

    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    channels = latents.shape[1]
    with torch.no_grad():
        z_T = latents * scheduler.init_noise_sigma
        z = z_T
        control = None if control_image is None else torch.cat([control_image, control_image])
        for i, t in enumerate(scheduler.timesteps):
            x = z if image is None else torch.cat([z, image], dim=1)
            x = scheduler.scale_model_input(torch.cat([x, x]), t)
            rows_t = t.expand(len(x)).float()
            if i in key_steps:
                down = mid = None
                if controlnet is not None:
                    down, mid = controlnet(x, rows_t, encoder_hidden_states=text, controlnet_cond=control,
                                           conditioning_scale=control_scale, added_cond_kwargs=added,
                                           return_dict=False)
                cache = fd_encode(unet, x, rows_t, text, down, mid, added, class_labels)
            noise = fd_decode(unet, *cache, rows_t, text, added, class_labels)
            u, c = noise.chunk(2)
            eps = u[:, :channels] + guidance * (c[:, :channels] - u[:, :channels])
            if noise.shape[1] > channels:
                eps = torch.cat([eps, c[:, channels:]], dim=1)
            if injection is not None and t < injection[1] * scheduler.config.num_train_timesteps:
                z = z + injection[0] * z_T
            z = scheduler.step(eps, t, z, generator=generator).prev_sample if generator is not None else \
                scheduler.step(eps, t, z).prev_sample
    return z


def sd_encoder_propagation_sample(pipe, scheduler, prompt, negative_prompt, latents, steps, guidance, key_steps,
                                  injection=(0.003, 0.5), controlnet=None, control_image=None, control_scale=1.0):
    """The loop for a StableDiffusionPipeline (its own encode_prompt)."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt)
    return encoder_propagation_loop(pipe.unet, scheduler, torch.cat([uncond, cond]), latents, steps, guidance,
                                    key_steps, injection, None, controlnet, control_image, control_scale)


def sdxl_conditioning(pipe, prompt, height, width, negative_prompt=None):
    """(text, added) in CFG layout [negative, prompt] from StableDiffusionXLPipeline's own encode_prompt and
    _get_add_time_ids (default sizes: original = target = (height, width), crop (0, 0))."""
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative_prompt)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), torch.float32,
                                      pipe.text_encoder_2.config.projection_dim)
    rows = len(cond)
    added = {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": time_ids.repeat(2 * rows, 1)}
    return torch.cat([uncond, cond]), added
