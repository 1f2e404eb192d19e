"""Plain reference implementations written independently of daamlib's streaming code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class StoreEverything:
    """An attention processor that keeps, for every call, the full queries and softmax maps of all rows."""

    def __init__(self, name, original, calls):
        self.name, self.original, self.calls = name, original, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        with torch.no_grad():
            q = attn.to_q(hidden_states)  # [B, hw, inner]
            k = attn.to_k(encoder_hidden_states)  # [B, n, inner]
            heads = attn.heads
            d = q.shape[-1] // heads
            bias = 0 if attention_mask is None else attention_mask.float()  # PixArt: [B, 1, n], 0 or -10000
            probs = []
            for h in range(heads):
                qh, kh = q[..., h * d:(h + 1) * d], k[..., h * d:(h + 1) * d]
                probs.append(torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d) + bias, dim=-1))
            self.calls.append({"layer": self.name, "q": q.float().cpu(), "probs": torch.stack(probs, 1).float().cpu(),
                               "to_k": attn.to_k, "heads": heads})
        return out


class StoreJoint:
    """SD3's joint attention recomputed plainly: the full softmax over [image keys, text keys] for every
    image query, per head; keeps its text columns as ``probs`` [B, heads, hw, n] and their unscaled logits before
    the softmax, summed over heads, as ``logits`` [B, hw, n]."""

    def __init__(self, name, original, calls):
        self.name, self.original, self.calls = name, original, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        with torch.no_grad():
            heads, hw = attn.heads, hidden_states.shape[1]
            q, k, kt = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.add_k_proj(encoder_hidden_states)
            d = q.shape[-1] // heads
            probs, logits = [], 0
            for h in range(heads):
                qh, kh, kth = (x[..., h * d:(h + 1) * d] for x in (q, k, kt))
                if attn.norm_q is not None:
                    qh, kh, kth = attn.norm_q(qh), attn.norm_k(kh), attn.norm_added_k(kth)
                full = torch.softmax(qh @ torch.cat([kh, kth], dim=1).transpose(1, 2) / math.sqrt(d), dim=-1)
                probs.append(full[:, :, hw:])  # [B, hw, n]
                logits = logits + qh @ kth.transpose(1, 2)
            self.calls.append({"layer": self.name, "probs": torch.stack(probs, 1).float().cpu(),
                               "logits": logits.float().cpu()})
        return out


def rotate(x, cos, sin):
    """Flux's rotary embedding written out: x [B, S, heads, d]; each pair (x[2i], x[2i+1]) of a position turns as a
    complex number by that position's angle (cos, sin [S, d] hold it at 2i and 2i+1)."""
    even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
    cos_even, cos_odd = cos[None, :, None, 0::2].float(), cos[None, :, None, 1::2].float()
    sin_even, sin_odd = sin[None, :, None, 0::2].float(), sin[None, :, None, 1::2].float()
    return torch.stack([even * cos_even - odd * sin_even, odd * cos_odd + even * sin_odd], dim=-1).flatten(-2)


class StoreFlux:
    """Flux's attention recomputed plainly over the whole joint sequence [text, image]: double-stream blocks project
    the text stream with add_q/add_k and norm_added_q/k and the image stream with to_q/to_k and norm_q/k, single-stream
    blocks project the joined input with to_q/to_k; rotary embeddings over all positions; the full softmax per head
    with scale 1/sqrt(d). Keeps the image rows x text columns as ``probs`` [B, heads, hw, n], and their unscaled
    logits summed over heads as ``logits`` [B, hw, n]."""

    def __init__(self, name, original, calls, text_length):
        self.name, self.original, self.calls, self.text_length = name, original, calls, text_length

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args, **kwargs)
        with torch.no_grad():
            heads = attn.heads

            def split(x):  # [B, S, heads * d] -> [B, S, heads, d]
                return x.reshape(x.shape[0], x.shape[1], heads, -1)

            if encoder_hidden_states is None:  # single-stream: [text, image] joined by the block
                n = self.text_length
                q, k = attn.norm_q(split(attn.to_q(hidden_states))), attn.norm_k(split(attn.to_k(hidden_states)))
            else:
                n = encoder_hidden_states.shape[1]
                q = torch.cat([attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states))),
                               attn.norm_q(split(attn.to_q(hidden_states)))], dim=1)
                k = torch.cat([attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states))),
                               attn.norm_k(split(attn.to_k(hidden_states)))], dim=1)
            cos, sin = image_rotary_emb
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # [B, S, heads, d]
            d = q.shape[-1]
            probs, logits = [], 0
            for h in range(heads):
                products = q[:, :, h] @ k[:, :, h].transpose(1, 2)  # [B, S, S]
                probs.append(torch.softmax(products / math.sqrt(d), dim=-1)[:, n:, :n])  # image queries x text keys
                logits = logits + products[:, n:, :n]
            self.calls.append({"layer": self.name, "probs": torch.stack(probs, 1).float().cpu(),
                               "logits": logits.float().cpu()})
        return out


def record_everything(pipe, run, text_length=None):
    """Run ``run()`` with StoreEverything on every cross-attention layer (StoreJoint on SD3's joint attention,
    StoreFlux on Flux's, which needs the ``text_length`` of its single-stream blocks); return the calls."""
    from diffusers import FluxTransformer2DModel

    unet = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    flux = isinstance(unet, FluxTransformer2DModel)
    originals = unet.attn_processors
    calls = []
    processors = {}
    for key, proc in originals.items():
        name = key[: -len(".processor")]
        if flux:  # every attention of a Flux transformer is over [text, image]
            processors[key] = StoreFlux(name, proc, calls, text_length)
        elif name.endswith("attn2") and unet.get_submodule(name).is_cross_attention:  # SD3.5's attn2 is self-attention
            processors[key] = StoreEverything(name, proc, calls)
        elif getattr(unet.get_submodule(name), "add_k_proj", None) is not None:  # SD3 joint attention
            processors[key] = StoreJoint(name, proc, calls)
        else:
            processors[key] = proc
    unet.set_attn_processor(processors)
    try:
        output = run()
    finally:
        unet.set_attn_processor(dict(originals))
    return calls, output


def grid(hw, latent):
    """(h, w) of a layer with hw positions in a latent of size latent."""
    h, w = latent
    while h * w > hw:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def up(map2d, size, mode):
    return F.interpolate(map2d[None, None].float(), size=size, mode=mode, align_corners=False)[0, 0]


def naive_daam(calls, row, token, latent, mode="bilinear", keep=lambda call, step: True):
    """sum over calls (steps x layers) and heads of up(A[:, token]), upsampling every map."""
    total = torch.zeros(latent)
    steps = _steps(calls)
    for call, step in zip(calls, steps):
        if not keep(call, step):
            continue
        probs = call["probs"][row]  # [heads, hw, n]
        h, w = grid(probs.shape[1], latent)
        for head in range(probs.shape[0]):
            total += up(probs[head, :, token].reshape(h, w), latent, mode)
    return total


def naive_text_share(calls, layer, row, keep=lambda call, step: True):
    """[hw]: what each image query gives to all text keys, summed over the layer's kept calls and heads."""
    return sum(call["probs"][row].sum(-1).sum(0) for call, step in zip(calls, _steps(calls))
               if call["layer"] == layer and keep(call, step))


def naive_linear(calls, row, x, latent, mode="bilinear"):
    """sum over calls and heads of up(Q_h . (W_k x)_h), no softmax."""
    total = torch.zeros(latent)
    for call in calls:
        q = call["q"][row]  # [hw, inner]
        key = call["to_k"](x[None])[0]  # [inner]
        heads = call["heads"]
        d = q.shape[-1] // heads
        h, w = grid(q.shape[0], latent)
        for head in range(heads):
            scores = q[:, head * d:(head + 1) * d] @ key[head * d:(head + 1) * d]
            total += up(scores.reshape(h, w), latent, mode)
    return total


def daam02_hooked_layers(unet):
    """Names of the attn2 modules the daam 0.2.0 locator hooks: it walks the up and down blocks whose
    class is a CrossAttn block, never the mid block (``locate_middle_block`` is off unless heads are
    saved or loaded)."""
    names = set()
    for prefix, blocks in (("up_blocks", unet.up_blocks), ("down_blocks", unet.down_blocks)):
        for i, block in enumerate(blocks):
            if "CrossAttn" not in type(block).__name__:
                continue
            for j, transformer in enumerate(block.attentions):
                for k, _ in enumerate(transformer.transformer_blocks):
                    names.add(f"{prefix}.{i}.attentions.{j}.transformer_blocks.{k}.attn2")
    return names


def naive_daam02(calls, row, token, latent, unet):
    """daam 0.2.0: only the hooked layers (no mid block); factor = int(sqrt(latent_hw // hw)), factor-8
    layers skipped; per (layer, head) time sum, bicubic up, clamp >= 0, mean over (layer, head)."""
    hooked = daam02_hooked_layers(unet)
    latent_hw = latent[0] * latent[1]
    sums = {}
    for call in calls:
        if call["layer"] not in hooked:
            continue
        probs = call["probs"][row]
        if int(math.sqrt(latent_hw // probs.shape[1])) == 8:
            continue
        h, w = grid(probs.shape[1], latent)
        for head in range(probs.shape[0]):
            key = (call["layer"], head)
            sums[key] = sums.get(key, 0) + probs[head, :, token].reshape(h, w)
    maps = [up(m, latent, "bicubic").clamp(min=0) for m in sums.values()]
    return torch.stack(maps).mean(0)


def _steps(calls):
    """Step index of every call: a step ends when the first layer comes round again."""
    first = calls[0]["layer"]
    steps, step = [], -1
    for call in calls:
        if call["layer"] == first:
            step += 1
        steps.append(step)
    return steps


class ConceptJoint:
    """ConceptAttention written out for SD3, whose text sequence was given the k concept vectors after the prompt: the
    joint attention over [image, prompt, concepts] per head, with a mask: image and prompt queries see [image, prompt]
    keys, concept queries see [image, concept] keys. The block then carries the concepts through its own context
    weights. Keeps, per call, the attention outputs before the output projections (heads concatenated) of the image
    (``o_x`` [B, hw, inner]) and of the concepts (``o_c`` [B, k, inner]), the image queries (``q_x`` [B, hw, heads, d])
    and the concept keys (``k_c`` [B, k, heads, d])."""

    def __init__(self, name, calls, num_concepts):
        self.name, self.calls, self.num_concepts = name, calls, num_concepts

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        heads, hw, k = attn.heads, hidden_states.shape[1], self.num_concepts

        def project(linear, norm, x):  # [B, S, C] -> [B, S, heads, d]
            out = linear(x).reshape(x.shape[0], x.shape[1], heads, -1)
            return out if norm is None else norm(out)

        q = torch.cat([project(attn.to_q, attn.norm_q, hidden_states),
                       project(attn.add_q_proj, attn.norm_added_q, encoder_hidden_states)], dim=1)
        key = torch.cat([project(attn.to_k, attn.norm_k, hidden_states),
                         project(attn.add_k_proj, attn.norm_added_k, encoder_hidden_states)], dim=1)
        v = torch.cat([project(attn.to_v, None, hidden_states), project(attn.add_v_proj, None, encoder_hidden_states)], dim=1)
        positions = torch.arange(q.shape[1])
        concept, image = positions >= q.shape[1] - k, positions < hw
        allowed = (concept[:, None] == concept[None, :]) | (concept[:, None] & image[None, :])  # [queries, keys]
        logits = torch.einsum("bqhd,bkhd->bhqk", q, key) / math.sqrt(q.shape[-1])
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2)  # [B, S, inner]
        self.calls.append({"layer": self.name, "o_x": out[:, :hw].float(), "o_c": out[:, -k:].float(),
                           "q_x": q[:, :hw].float(), "k_c": key[:, -k:].float()})
        text = out[:, hw:] if attn.context_pre_only else attn.to_add_out(out[:, hw:])
        return attn.to_out[1](attn.to_out[0](out[:, :hw])), text


def run_with_concepts(transformer, call_inputs, vectors):
    """Call ``transformer`` on each recorded call's inputs, the concept vectors [k, d_encoder] appended to its text
    sequence, with ConceptJoint on every block; returns (the calls' records, the transformer outputs)."""
    originals = transformer.attn_processors
    calls = []
    transformer.set_attn_processor({key: ConceptJoint(key[: -len(".processor")], calls, len(vectors)) for key in originals})
    try:
        outputs = []
        for inputs in call_inputs:
            text = inputs["encoder_hidden_states"]
            appended = torch.cat([text, vectors[None].expand(text.shape[0], -1, -1).to(text)], dim=1)
            outputs.append(transformer(**{**inputs, "encoder_hidden_states": appended, "return_dict": False})[0])
    finally:
        transformer.set_attn_processor(dict(originals))
    return calls, outputs


def naive_concept_maps(calls, row, latent, variant="output"):
    """[k, H, W]: per call (blocks x steps), the softmax over the k concepts of o_x . o_c ("output") or, per head, of
    q_x . k_c / sqrt(d) summed over heads ("cross"); every map upsampled, all summed."""
    total = 0
    for call in calls:
        if variant == "output":
            probs = torch.softmax(call["o_x"][row] @ call["o_c"][row].T, dim=-1)  # [hw, k]
        else:
            q, key = call["q_x"][row], call["k_c"][row]  # [hw, heads, d], [k, heads, d]
            probs = torch.softmax(torch.einsum("phd,khd->hpk", q, key) / math.sqrt(q.shape[-1]), dim=-1).sum(0)
        h, w = grid(probs.shape[0], latent)
        total = total + torch.stack([up(probs[:, c].reshape(h, w), latent, "bilinear") for c in range(probs.shape[1])])
    return total


class ConceptFlux:
    """ConceptAttention written out for Flux, whose text sequence was given the k concept vectors after the prompt (and
    k zero text ids): the attention over [prompt, concepts, image] per head, rotary embeddings over all positions, with
    the mask of ConceptJoint, in double-stream blocks (text through add_*, image through to_*) and single-stream blocks
    (the joined sequence through to_*). Keeps what ConceptJoint keeps, for the double-stream blocks."""

    def __init__(self, name, calls, num_concepts, text_length):
        self.name, self.calls, self.num_concepts, self.text_length = name, calls, num_concepts, text_length

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        heads, k, n = attn.heads, self.num_concepts, self.text_length  # n: prompt and concept positions

        def project(linear, norm, x):  # [B, S, C] -> [B, S, heads, d]
            out = linear(x).reshape(x.shape[0], x.shape[1], heads, -1)
            return out if norm is None else norm(out)

        double = encoder_hidden_states is not None
        if double:
            q = torch.cat([project(attn.add_q_proj, attn.norm_added_q, encoder_hidden_states),
                           project(attn.to_q, attn.norm_q, hidden_states)], dim=1)
            key = torch.cat([project(attn.add_k_proj, attn.norm_added_k, encoder_hidden_states),
                             project(attn.to_k, attn.norm_k, hidden_states)], dim=1)
            v = torch.cat([project(attn.add_v_proj, None, encoder_hidden_states), project(attn.to_v, None, hidden_states)], 1)
        else:
            q, key = project(attn.to_q, attn.norm_q, hidden_states), project(attn.to_k, attn.norm_k, hidden_states)
            v = project(attn.to_v, None, hidden_states)
        cos, sin = image_rotary_emb
        q, key = rotate(q, cos, sin).to(v.dtype), rotate(key, cos, sin).to(v.dtype)
        positions = torch.arange(q.shape[1])
        concept, image = (positions >= n - k) & (positions < n), positions >= n
        allowed = (concept[:, None] == concept[None, :]) | (concept[:, None] & image[None, :])  # [queries, keys]
        logits = torch.einsum("bqhd,bkhd->bhqk", q, key) / math.sqrt(q.shape[-1])
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2)  # [B, S, inner]
        if not double:
            return out
        self.calls.append({"layer": self.name, "o_x": out[:, n:].float(), "o_c": out[:, n - k:n].float(),
                           "q_x": q[:, n:].float(), "k_c": key[:, n - k:n].float()})
        return attn.to_out[1](attn.to_out[0](out[:, n:])), attn.to_add_out(out[:, :n])


def run_flux_with_concepts(transformer, call_inputs, vectors):
    """``run_with_concepts`` for Flux: the concepts also get zero text ids."""
    originals = transformer.attn_processors
    calls, outputs, k = [], [], len(vectors)
    try:
        for inputs in call_inputs:
            text, text_ids = inputs["encoder_hidden_states"], inputs["txt_ids"]
            n = text.shape[1] + k
            transformer.set_attn_processor({key: ConceptFlux(key[: -len(".processor")], calls, k, n) for key in originals})
            appended = torch.cat([text, vectors[None].expand(text.shape[0], -1, -1).to(text)], dim=1)
            ids = torch.cat([text_ids, text_ids.new_zeros(k, text_ids.shape[-1])])
            outputs.append(transformer(**{**inputs, "encoder_hidden_states": appended, "txt_ids": ids,
                                          "return_dict": False})[0])
    finally:
        transformer.set_attn_processor(dict(originals))
    return calls, outputs
