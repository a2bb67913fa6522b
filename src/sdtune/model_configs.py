"""Architecture configs for the miniature test models (tiny:*) and full-size random-init models (random:*).

Full-size numbers are those of the published SD 1.5, SD 2.x (768-v) and SDXL base architectures, so
benchmarks on random weights cost what training the real models costs.
"""

from __future__ import annotations

SCHEDULER_BASE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,  # avoids diffusers' FutureWarning and matches the released configs
    "clip_sample": False,
    "set_alpha_to_one": False,
}

# Text-encoder configs (transformers CLIPTextConfig kwargs) -------------------------------------------------
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, vocab_size=49408)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=512, vocab_size=49408)
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, vocab_size=49408)

# VAE configs (diffusers AutoencoderKL kwargs) ----------------------------------------------------------------
_TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                 norm_num_groups=32, sample_size=32)
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
               norm_num_groups=32, sample_size=512)

# UNet configs (diffusers UNet2DConditionModel kwargs) --------------------------------------------------------
_TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
_SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=8, cross_attention_dim=768)
_SD2_UNET = dict(_SD15_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True)
_SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def _sdxl_tiny_unet() -> dict:
    # SDXL's added conditioning: 6 micro-conditioning numbers embedded at addition_time_embed_dim each,
    # concatenated with the second text encoder's pooled projection.
    return dict(_TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32)


ARCHITECTURES: dict[str, dict] = {
    "tiny:sd1": dict(family="sd1", prediction_type="epsilon", scheduler="PNDMScheduler",
                     unet=dict(_TINY_UNET, cross_attention_dim=32), vae=_TINY_VAE, text=[_TINY_TEXT]),
    "tiny:sd2": dict(family="sd2", prediction_type="v_prediction", scheduler="DDIMScheduler",
                     unet=dict(_TINY_UNET, cross_attention_dim=32, use_linear_projection=True,
                               attention_head_dim=(2, 4)),
                     vae=_TINY_VAE, text=[dict(_TINY_TEXT, hidden_act="gelu")]),
    "tiny:sdxl": dict(family="sdxl", prediction_type="epsilon", scheduler="EulerDiscreteScheduler",
                      unet=_sdxl_tiny_unet(), vae=_TINY_VAE,
                      text=[_TINY_TEXT, dict(_TINY_TEXT, hidden_act="gelu")]),
    "random:sd15": dict(family="sd1", prediction_type="epsilon", scheduler="PNDMScheduler",
                        unet=_SD15_UNET, vae=_SD_VAE, text=[_CLIP_L]),
    "random:sd2": dict(family="sd2", prediction_type="v_prediction", scheduler="DDIMScheduler",
                       unet=_SD2_UNET, vae=dict(_SD_VAE, sample_size=768), text=[_OPENCLIP_H]),
    "random:sdxl": dict(family="sdxl", prediction_type="epsilon", scheduler="EulerDiscreteScheduler",
                        unet=_SDXL_UNET, vae=dict(_SD_VAE, sample_size=1024, force_upcast=True),
                        text=[_CLIP_L, _OPENCLIP_BIGG]),
}

# Words the miniature tokenizer keeps whole; anything else falls back to byte-level pieces.
TINY_WORDS = ["a", "photo", "of", "the", "sks", "dog", "cat", "toy", "on", "in", "with", "red", "blue",
              "green", "background", "circle", "square", "style", "painting", "picture"]
