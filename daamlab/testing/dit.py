"""Random-weight diffusion-transformer (DiT) pipelines, built offline: PixArt-α, SD3 and Flux.

* ``build_t5_tokenizer``: a T5-style tokenizer (SentencePiece Unigram, ``▁`` marks a word start, ``</s>``
  appended) trained on the spot on a built-in corpus of captions;
* ``tiny_random_pixart_pipeline`` / ``tiny_random_sd3_pipeline`` / ``tiny_random_flux_pipeline``: transformers
  of 17k–80k parameters that generate 32-px images on a CPU in about a second;
* ``sharpen_attention``: random weights give near-uniform attention; scaling queries and keys makes it peaked;
* ``published_transformer_on_meta``: the published transformers (PixArt-α 512, SD3-medium, Flux-dev) on the
  meta device: their modules and shapes, no weights, nothing downloaded.

Sizes are multiples of 4 px (VAE factor 2 × patch 2). Call tiny PixArt pipelines with
``use_resolution_binning=False``: the pipeline bins sizes only for ``sample_size`` 32, 64 or 128 (256, 512,
1024 px) and raises otherwise."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from .unet import TEXT_DIM, clip_tokenizer, tiny_text_encoder

T5_MAX_LENGTH = 32  # positions of the tiny pipelines' T5 prompts (PixArt-α uses 120, SD3 256, Flux-dev 512)
T5_VOCAB_SIZE = 400  # an upper bound: the trainer keeps fewer pieces on a corpus this small
T5_DIM, T5_HEADS, T5_LAYERS = 2 * TEXT_DIM, 4, 2  # SD3 pads CLIP-L ⊕ CLIP-G (2 × TEXT_DIM) to the T5 width
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
_SCORE_DECIMALS = 6  # piece scores are rounded to this many decimals (see _canonical_pieces)
LATENT_CHANNELS = 4
HEADS, HEAD_DIM = 2, 8  # the tiny transformers' attention (Flux: heads of FLUX_HEAD_DIM)
INNER_DIM = HEADS * HEAD_DIM  # PixArt and SD3 project the text to this width too
TINY_LATENT = 16  # latent side of the tiny transformers' default size (32 px with the factor-2 VAE)
POS_EMBED_MAX = 32  # SD3's position grid in patches: latents up to 64 (128 px) a side
FLUX_ROPE_AXES = (4, 6, 6)  # rotary dims for (text, row, column); they sum to the head dim (Flux-dev: 16, 56, 56)
FLUX_HEAD_DIM = sum(FLUX_ROPE_AXES)
SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)  # those of the published VAEs
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)
SHARPEN = 6.0  # a query/key factor that takes tiny models' attention entropy from ~1 to <= 0.5 of log(keys)
FLUX_SCHEDULE = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)

# -- the T5 tokenizer -------------------------------------------------------------------------------
_THINGS = ("car", "person", "rider", "tree", "road", "sidewalk", "building", "bicycle", "dog", "cat", "banana",
           "bus", "truck", "house", "street", "bird", "horse", "child", "woman", "train", "bench", "window",
           "traffic light", "motorcycle", "umbrella", "terrain", "wall", "fence", "pole", "sign")
_COLOURS = ("red", "blue", "green", "white", "black", "yellow", "small", "big", "old", "parked")
_PLACES = ("on the road", "on the sidewalk", "in the street", "next to a building", "under the sky", "near a tree",
           "on the left", "on the right", "in front of the house", "behind the fence", "of the city", "at night",
           "in the rain", "with an umbrella", "above the traffic-light pole", "inside the car park")
_EXTRA = ("the quick brown fox jumps over the lazy dog", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
          "a zebra and a kayak", "there is nothing on the road", "one person rides a bicycle without a helmet",
          "the skyline of the city and the skyscrapers", "the right-hand lane and the left-hand lane",
          "into the building", "a treelined street", "then the dog runs off the sidewalk", "roadside trees",
          "cats and dogs", "0 1 2 3 4 5 6 7 8 9 10 (a) [b] {c} d: e; f? g! h/i \"j\" k_l m=n o+p #q @r & %s * <t>")


def _plural(word: str) -> str:
    irregular = {"person": "people", "child": "children", "woman": "women", "bus": "buses", "bench": "benches",
                 "traffic light": "traffic lights"}
    return irregular.get(word, word + "s")


def caption_corpus() -> list[str]:
    """Plain English captions of urban scenes, made deterministically from word lists (about 500 lines).

    HF's Unigram trainer seeds its pieces with substrings shared by at least two *distinct* words, so
    each common word also appears inflected (plural, possessive, before punctuation): it then becomes one
    piece, while rare words (``zebra``) stay split into several. As in T5, ``a`` is ``▁`` + ``a``."""
    lines = []
    for i, thing in enumerate(_THINGS):
        for j, place in enumerate(_PLACES):
            colour = _COLOURS[(i + j) % len(_COLOURS)]
            other = _THINGS[(i * 7 + j * 3 + 1) % len(_THINGS)]
            article = "an" if colour[0] in "aeiou" else "a"
            lines.append(f"{article} {colour} {thing} {place}")
            lines.append(f"two {_plural(thing)} and a {other} {place}")
        lines.append(f"The {thing}'s shadow falls on the road, and a {_THINGS[-i - 1]} waits.")
        lines.append(f"A {thing} and, behind it, {_plural(_THINGS[i - 3])}!")
    return lines + list(_EXTRA)


T5_PIECES_FILE = Path(__file__).with_name("t5_pieces.json")  # the frozen vocabulary: [[piece, score], ...]


def _canonical_pieces(backend) -> list[tuple[str, float]]:
    """The trained pieces with scores rounded and ties ordered by name: the trainer's multithreaded EM
    leaves float noise (~1e-11) and orders equal-score pieces (rare characters) at random, run to run."""
    pieces = json.loads(backend.to_str())["model"]["vocab"]
    specials, rest = pieces[: len(T5_SPECIALS)], pieces[len(T5_SPECIALS):]
    rounded = sorted(((piece, round(score, _SCORE_DECIMALS)) for piece, score in rest), key=lambda p: (-p[1], p[0]))
    return [tuple(p) for p in specials] + rounded


def _t5_backend(pieces: list[tuple[str, float]] | None = None):
    """A ``tokenizers.Tokenizer`` with T5's normaliser, pre-tokenizer, decoder and ``</s>`` appended, over
    ``pieces`` (Unigram; None: an untrained model, for training)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    backend = Tokenizer(Unigram() if pieces is None else
                        Unigram([tuple(p) for p in pieces], unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    # T5's SentencePiece normaliser (nmt_nfkc, extra whitespace removed), case kept.
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " "),
                                               normalizers.Strip()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    if pieces is not None:
        eos = backend.token_to_id("</s>")
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                               special_tokens=[("</s>", eos)])
    return backend


def train_t5_pieces() -> list[tuple[str, float]]:
    """Train the Unigram vocabulary on :func:`caption_corpus` (~50 ms). The trainer is not deterministic run to
    run (Rust hash-map order: two pieces with close scores, e.g. '1' and 'v', swap in about half of the runs),
    so the tokenizer is built from the frozen copy in ``t5_pieces.json``; regenerate it with
    ``python -c "from daamlab.testing.dit import write_t5_pieces; write_t5_pieces()"``."""
    from tokenizers import trainers

    backend = _t5_backend()
    trainer = trainers.UnigramTrainer(vocab_size=T5_VOCAB_SIZE, special_tokens=list(T5_SPECIALS), unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator(caption_corpus(), trainer=trainer)
    return _canonical_pieces(backend)


def write_t5_pieces(path: Path = T5_PIECES_FILE) -> Path:
    path.write_text(json.dumps([list(p) for p in train_t5_pieces()], ensure_ascii=False, indent=0) + "\n")
    return path


@lru_cache(maxsize=1)
def _trained_t5_backend():
    """The ``tokenizers.Tokenizer`` behind ``build_t5_tokenizer``, over the frozen vocabulary."""
    return _t5_backend(json.loads(T5_PIECES_FILE.read_text(encoding="utf-8")))


def build_t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A T5-style tokenizer: ``<pad>`` 0, ``</s>`` 1 (appended to every text), ``<unk>`` 2, pieces such as
    ``▁car`` (``▁`` marks a word start), no sentinel ``<extra_id_*>`` tokens; ``model_max_length`` positions."""
    return T5TokenizerFast(tokenizer_object=copy.deepcopy(_trained_t5_backend()), extra_ids=0,
                           model_max_length=max_length)


# -- tiny components --------------------------------------------------------------------------------
def tiny_t5_encoder(tokenizer: T5TokenizerFast, d_model: int = T5_DIM) -> T5EncoderModel:
    """A T5 v1.1-shaped encoder (gated GELU, relative positions): output (batch, tokens, d_model)."""
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // T5_HEADS, d_ff=2 * d_model,
                      num_layers=T5_LAYERS, num_heads=T5_HEADS, relative_attention_num_buckets=8,
                      relative_attention_max_distance=T5_MAX_LENGTH, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def tiny_clip_with_projection(hidden_size: int = TEXT_DIM) -> CLIPTextModelWithProjection:
    """SD3's CLIP encoders: hidden states (batch, 77, hidden_size), pooled projection (batch, hidden_size)."""
    tokenizer = clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_vae(latent_channels: int = LATENT_CHANNELS, flow: dict | None = None) -> AutoencoderKL:
    """Factor-2 VAE as in ``daamlab.testing.unet``; ``flow`` (SD3, Flux): the published scaling and shift factors and,
    as in those VAEs, no quant convolutions."""
    extra = {**flow, "use_quant_conv": False, "use_post_quant_conv": False} if flow else {}
    return AutoencoderKL(
        block_out_channels=(16, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        **extra,
    )


def _finish(pipe, sharpen: float):
    """Sharpen (unless 1), silence the progress bar, move to the CPU."""
    if sharpen != 1.0:
        sharpen_attention(pipe.transformer, sharpen)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_random_pixart_pipeline(seed: int = 0, sample_size: int = TINY_LATENT, sharpen: float = 1.0,
                                max_length: int = T5_MAX_LENGTH) -> PixArtAlphaPipeline:
    """PixArt-α-shaped: 2 blocks of self-attention (``attn1``, image tokens) then cross-attention (``attn2``,
    T5 tokens, padding masked), 2 heads × 8, patch 2, learned sigma (8 output channels for 4 latent ones).

    ``use_additional_conditions`` is False, as in the 256 and 512 models (only the 1024 ones condition on
    resolution and aspect ratio; the pipeline adds them only for ``sample_size`` 128). The scheduler is DDIM:
    at ``num_inference_steps=1`` the pipeline takes the scheduler's x0 prediction, which DPM-Solver does not
    return. Call it with ``use_resolution_binning=False`` and a ``max_sequence_length`` (default 120)."""
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(max_length)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS, num_layers=2, cross_attention_dim=INNER_DIM, sample_size=sample_size,
        patch_size=2, caption_channels=T5_DIM, use_additional_conditions=False,
    )
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=tiny_t5_encoder(tokenizer), vae=tiny_vae(),
                               transformer=transformer, scheduler=DDIMScheduler(clip_sample=False))
    return _finish(pipe, sharpen)


def tiny_random_sd3_pipeline(seed: int = 0, sharpen: float = 1.0,
                             max_length: int = T5_MAX_LENGTH) -> StableDiffusion3Pipeline:
    """SD3-shaped: 2 joint (MM-DiT) blocks, 2 heads × 8, patch 2; text = 77 CLIP positions (CLIP-L ⊕ CLIP-G,
    2 × 32 channels, zero-padded to T5's 64) followed by ``max_sequence_length`` T5 positions (default 256),
    none masked."""
    torch.manual_seed(seed)
    tokenizer_3 = build_t5_tokenizer(max_length)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_LATENT, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=T5_DIM,
        caption_projection_dim=INNER_DIM, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=POS_EMBED_MAX,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(flow=SD3_VAE_FACTORS), text_encoder=tiny_clip_with_projection(), tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip_with_projection(), tokenizer_2=clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(tokenizer_3), tokenizer_3=tokenizer_3,
    )
    return _finish(pipe, sharpen)


def tiny_random_flux_pipeline(seed: int = 0, sharpen: float = 1.0, max_length: int = T5_MAX_LENGTH,
                              guidance_embeds: bool = True) -> FluxPipeline:
    """Flux-dev-shaped: 1 double-stream and 1 single-stream block, 2 heads × 16, guidance embedding (schnell-shaped
    with ``guidance_embeds=False``); the transformer sees 2×2-packed latents (16 = 4 × 4 channels); text = T5
    positions only (CLIP gives the pooled vector), ``max_sequence_length`` of them (default 512), none masked."""
    torch.manual_seed(seed)
    tokenizer_2 = build_t5_tokenizer(max_length)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=FLUX_HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=T5_DIM,
        pooled_projection_dim=TEXT_DIM, guidance_embeds=guidance_embeds, axes_dims_rope=FLUX_ROPE_AXES,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE), vae=tiny_vae(flow=FLUX_VAE_FACTORS),
        text_encoder=tiny_text_encoder(TEXT_DIM).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2, transformer=transformer,
    )
    return _finish(pipe, sharpen)


# -- sharper attention ------------------------------------------------------------------------------
def _scale(module: torch.nn.Module | None, factor: float) -> bool:
    """Multiply a projection's weight and bias (or a norm's gain) by ``factor``; False when there is none."""
    if module is None or getattr(module, "weight", None) is None:
        return False
    module.weight.mul_(factor)
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(factor)
    return True


_QUERY_KEY_MODULES = (("to_q", "norm_q"), ("to_k", "norm_k"), ("add_q_proj", "norm_added_q"),
                      ("add_k_proj", "norm_added_k"))  # (projection, the norm applied after it, if any)


@torch.no_grad()
def sharpen_attention(model: torch.nn.Module, factor: float) -> int:
    """Multiply every attention's queries and keys by ``factor`` (logits by ``factor**2``), in place; returns
    the number of attention modules changed.

    Random tiny models attend almost uniformly (entropy close to log n), so maps are numerical noise; a
    factor of 4–8 makes each query favour a few keys. Where queries and keys are normalised (Flux's
    RMSNorm ``norm_q``/``norm_k``, SD3.5's ``qk_norm``), scaling ``to_q``/``to_k`` would be undone: the
    norms' gains are scaled instead. Joint attention scales the text side too (``add_q_proj``/``add_k_proj``
    or ``norm_added_q``/``norm_added_k``)."""
    changed = 0
    for module in model.modules():
        if not (hasattr(module, "to_q") and hasattr(module, "to_k")):
            continue
        for projection, norm in _QUERY_KEY_MODULES:
            if getattr(module, norm, None) is None:
                _scale(getattr(module, projection, None), factor)
            elif not _scale(getattr(module, norm), factor):
                raise ValueError(f"{type(module).__name__}.{norm} normalises without a gain: it cannot be sharpened")
        changed += 1
    return changed


# -- the published architectures, on the meta device -----------------------------------------------
PIXART_ALPHA_512_TRANSFORMER = dict(  # PixArt-alpha/PixArt-XL-2-512x512 (DiT-XL/2 + cross-attention)
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    cross_attention_dim=1152, attention_bias=True, sample_size=64, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    caption_channels=4096, use_additional_conditions=False,
)
SD3_MEDIUM_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3-medium-diffusers
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
FLUX_DEV_TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
PUBLISHED_TRANSFORMERS = {
    "PixArt-alpha/PixArt-XL-2-512x512": (PixArtTransformer2DModel, PIXART_ALPHA_512_TRANSFORMER),
    "stabilityai/stable-diffusion-3-medium-diffusers": (SD3Transformer2DModel, SD3_MEDIUM_TRANSFORMER),
    "black-forest-labs/FLUX.1-dev": (FluxTransformer2DModel, FLUX_DEV_TRANSFORMER),
}


def published_transformer_on_meta(name: str) -> torch.nn.Module:
    """The transformer of a published pipeline (a key of ``PUBLISHED_TRANSFORMERS``) with every parameter and
    buffer on the meta device: shapes and module names without memory or weights."""
    if name not in PUBLISHED_TRANSFORMERS:
        raise KeyError(f"unknown transformer {name!r}; known: {sorted(PUBLISHED_TRANSFORMERS)}")
    cls, config = PUBLISHED_TRANSFORMERS[name]
    with torch.device("meta"):
        return cls(**config).eval()
