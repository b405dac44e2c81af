"""CLEAR on diffusers transformers: local-window attention processors, one-call conversion, and the
fine-tuning recipe (student with local attention against the dense teacher).

``convert(transformer, radius=16)`` replaces the processor of every self- and joint attention of a
FLUX (double- and single-stream blocks), SD3 (joint blocks and SD3.5's image-only ``attn2``),
PixArt or DiT transformer by one that runs :class:`fewstep.attention.LocalWindowAttention`:
image tokens attend the image tokens within ``radius`` on the token grid and every text token;
text tokens attend everything. Cross-attention (PixArt) stays dense. The token grid is read from
each call's input (latent height and width / patch size; FLUX: ``img_ids``) unless fixed with
``grid=``. ``restore(transformer)`` puts the original processors back.

diffusers is optional for fewstep: nothing here imports it until a FLUX processor applies RoPE.
Semantics and the recipe's choices against CLEAR's released code: docs/clear.md.
"""
from __future__ import annotations

import copy
import weakref
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.attention.local_window import LocalWindowAttention, check_grid, check_pattern
from fewstep.denoiser import Denoiser, FlowSchedule
from fewstep.distill.base import DistillationMethod

DEFAULT_RADIUS = 16  # CLEAR's released FLUX checkpoints use r = 8, 16 and 32
_STATE = "_fewstep_clear"  # the attribute of a converted transformer holding the conversion


# ----------------------------------------------------------------------------------------------
# The token grid of the current call


class _TokenGrid:
    """The (H, W) token grid the processors of one transformer use: fixed at conversion, or set
    by :class:`_GridFromInput` before each forward."""

    def __init__(self, fixed: Optional[tuple[int, int]]):
        self.fixed = fixed
        self.current = fixed

    def get(self) -> tuple[int, int]:
        if self.current is None:
            raise ValueError("grid: expected the token grid of this call, got None (the attention ran outside "
                             "the converted transformer's forward; pass grid= to fewstep.clear.convert)")
        return self.current


class _GridFromInput:
    """Forward pre-hook of a converted transformer: the token grid from the call's input.

    FLUX: rows and columns of ``img_ids`` (one device-to-host copy per new ids tensor; pipelines
    reuse one for all steps). SD3, PixArt, DiT: the latent's height and width / ``patch_size``.
    A callable object rather than a closure so that ``copy.deepcopy`` of the model copies it with
    the processors' grid (a copied weak reference to an ids tensor still names the same tensor).
    """

    def __init__(self, grid: _TokenGrid, family: str, patch_size: Optional[int]):
        self.grid = grid
        self.family = family
        self.patch_size = patch_size
        self._ids_ref = None
        self._ids_version = None
        self._ids_grid = None

    def __call__(self, module, args, kwargs):
        if self.grid.fixed is not None:
            return None
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        if self.family == "flux":
            self.grid.current = self._flux_grid(hidden_states, kwargs.get("img_ids"))
        elif self.family == "patch" and isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4:
            h, w = hidden_states.shape[-2:]
            self.grid.current = (h // self.patch_size, w // self.patch_size)
        else:
            raise ValueError(f"grid: expected grid= in fewstep.clear.convert for {type(module).__name__} "
                             "(its token grid cannot be read from the input), got None")
        return None

    def _flux_grid(self, hidden_states, img_ids) -> tuple[int, int]:
        if not isinstance(img_ids, torch.Tensor):
            raise ValueError("img_ids: expected the image tokens' position ids [S, 3] (keyword argument), got "
                             f"{type(img_ids).__name__}")
        version = None if img_ids.is_inference() else img_ids._version  # inference tensors have no counter
        if self._ids_ref is not None and self._ids_ref() is img_ids and version == self._ids_version:
            return self._ids_grid
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        rows, cols = (torch.stack([ids[:, 1].max(), ids[:, 2].max()]).round().long() + 1).tolist()
        n_image = hidden_states.shape[1]
        if rows * cols != n_image:
            raise ValueError(f"img_ids: expected the ids of an H x W grid of the {n_image} image tokens, got "
                             f"rows 0..{rows - 1} and columns 0..{cols - 1} ({rows * cols} positions)")
        self._ids_ref, self._ids_version, self._ids_grid = weakref.ref(img_ids), version, (rows, cols)
        return rows, cols


# ----------------------------------------------------------------------------------------------
# Processors


class _LocalProcessor(nn.Module):
    """Base of the processors: the attention module (with the pooled K/V weights, if any) and the
    shared token grid. Modules, so that pooled weights are the model's parameters; subclasses
    define ``__call__`` (not ``forward``) because diffusers filters the keyword arguments it
    passes by the processor's ``__call__`` signature."""

    def __init__(self, attention: LocalWindowAttention, grid: _TokenGrid):
        super().__init__()
        self.attention = attention
        self.grid = grid

    def attend(self, query, key, value, n_text: int) -> torch.Tensor:
        """``[B, heads, N, D]`` q, k, v in ``[text | image]`` order -> ``[B, N, heads*D]``."""
        grid = self.grid.get()
        n_image = query.shape[2] - n_text
        if n_image != grid[0] * grid[1]:
            raise ValueError(f"hidden_states: expected {grid[0] * grid[1]} image tokens (a {grid[0]} x {grid[1]} "
                             f"token grid), got {n_image}")
        out = self.attention(query, key, value, grid=grid, n_text=n_text)
        return out.transpose(1, 2).flatten(2, 3)


def _split_heads(attn, t: torch.Tensor) -> torch.Tensor:
    """[B, N, heads*D] -> [B, heads, N, D]."""
    return t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)


def _image_qkv(attn, hidden_states: torch.Tensor):
    """The image tokens' q, k, v ([B, heads, N, D]) with the attention's q/k norms applied."""
    query, key, value = (_split_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _check_no_mask(attention_mask) -> None:
    if attention_mask is not None:
        raise ValueError("attention_mask: expected None (local-window attention takes no extra mask), got "
                         f"{type(attention_mask).__name__}")


class FluxLocalAttnProcessor(_LocalProcessor):
    """FLUX's ``FluxAttention``: double-stream blocks (text in ``encoder_hidden_states``) and
    single-stream blocks (text tokens first in ``hidden_states``); RoPE before attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        _check_no_mask(attention_mask)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  [B, N, heads, D]
        query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
        if encoder_hidden_states is not None:
            if getattr(attn, "fused_projections", False):
                text_q, text_k, text_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_q = attn.add_q_proj(encoder_hidden_states)
                text_k = attn.add_k_proj(encoder_hidden_states)
                text_v = attn.add_v_proj(encoder_hidden_states)
            query = torch.cat([attn.norm_added_q(heads(text_q)), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(text_k)), key], dim=1)
            value = torch.cat([heads(text_v), value], dim=1)
            n_text = encoder_hidden_states.shape[1]
        else:
            grid = self.grid.get()
            n_text = hidden_states.shape[1] - grid[0] * grid[1]
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), n_text)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class JointLocalAttnProcessor(_LocalProcessor):
    """SD3's joint attention (``JointAttnProcessor2_0``). SD3 concatenates the context tokens
    after the image tokens; this processor puts them first, so that the op sees
    ``[text | image]`` (attention is the same under a consistent permutation of tokens). Without
    ``encoder_hidden_states`` (SD3.5's ``attn2``) it is image-only local attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args,
                 **kwargs):
        _check_no_mask(attention_mask)
        query, key, value = _image_qkv(attn, hidden_states)
        n_text = 0
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (_split_heads(attn, proj(encoder_hidden_states))
                                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query = torch.cat([text_q, query], dim=2)
            key = torch.cat([text_k, key], dim=2)
            value = torch.cat([text_v, value], dim=2)
            n_text = encoder_hidden_states.shape[1]
        out = self.attend(query, key, value, n_text)
        text_out, image_out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if encoder_hidden_states is None:
            return image_out
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class SelfLocalAttnProcessor(_LocalProcessor):
    """Image-only self-attention (``AttnProcessor2_0``; PixArt's and DiT's ``attn1``): n_text = 0."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        _check_no_mask(attention_mask)
        if encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states: expected None (local attention replaces self-attention; "
                             "cross-attention stays dense), got a tensor")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape
        if hidden_states.dim() == 4:  # [B, C, H, W] -> [B, H*W, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = _image_qkv(attn, hidden_states)
        out = attn.to_out[1](attn.to_out[0](self.attend(query, key, value, 0)))
        if len(image_shape) == 4:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


_FLUX_PROCESSORS = ("FluxAttnProcessor",)  # FluxAttention's processor since diffusers 0.35
_JOINT_PROCESSORS = ("JointAttnProcessor2_0",)
_SELF_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def _processor_class(name: str, module: nn.Module) -> Optional[type]:
    """The local processor for one attention module; None to keep it dense (cross-attention)."""
    processor = type(module.processor).__name__
    if processor in _FLUX_PROCESSORS:
        return FluxLocalAttnProcessor
    if processor in _JOINT_PROCESSORS:
        return JointLocalAttnProcessor
    if getattr(module, "is_cross_attention", False):
        return None
    if processor in _SELF_PROCESSORS:
        return SelfLocalAttnProcessor
    raise TypeError(f"transformer: expected attention with diffusers' FLUX, joint (SD3) or self-attention "
                    f"processor, got {processor} at {name!r}")


def _attention_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in transformer.named_modules()
            if hasattr(m, "set_processor") and hasattr(m, "processor")}


# ----------------------------------------------------------------------------------------------
# Conversion


class _Conversion:
    """What :func:`restore` needs: the original processors and the grid hook."""

    def __init__(self, originals: dict[str, object], hook: _GridFromInput):
        self.originals = originals
        self.hook = hook


def convert(transformer: nn.Module, radius: Optional[float] = None, window: Optional[tuple[int, int]] = None,
            grid: Optional[tuple[int, int]] = None, pooled_kv_factor: Optional[int] = None) -> nn.Module:
    """Replace every self- and joint attention of a diffusers FLUX, SD3, PixArt or DiT transformer
    by local-window attention; returns the (same) transformer.

    ``radius`` (strict circle, default 16 when ``window`` is not given) or ``window=(ry, rx)``;
    ``grid=(H, W)`` fixes the token grid (default: read from each call's input);
    ``pooled_kv_factor=f`` adds CLEAR's learnable f x f pooled image keys and values to every
    attention (parameters ``...processor.attention.pooled_kv.spatial_weight``).
    """
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"transformer: expected a diffusers transformer (nn.Module), got {type(transformer).__name__}")
    if hasattr(transformer, _STATE):
        raise ValueError("transformer: expected a model with its original attention, got one already converted "
                         "(call fewstep.clear.restore first)")
    if radius is None and window is None:
        radius = DEFAULT_RADIUS
    check_pattern(radius, window)
    fixed = None if grid is None else check_grid(grid)
    patch_size = getattr(getattr(transformer, "config", None), "patch_size", None)
    family = ("flux" if type(transformer).__name__ == "FluxTransformer2DModel"
              else "patch" if isinstance(patch_size, int) else "unknown")
    if family == "unknown" and fixed is None:
        raise ValueError(f"grid: expected (H, W) for {type(transformer).__name__} (no patch_size in its config), "
                         "got None")
    token_grid = _TokenGrid(fixed)
    plan = {name: (m, cls) for name, m in _attention_modules(transformer).items()
            if (cls := _processor_class(name, m)) is not None}
    if not plan:
        raise ValueError(f"transformer: expected diffusers attention modules, found none in "
                         f"{type(transformer).__name__}")
    originals = {}
    for name, (module, cls) in plan.items():
        weight = next(module.parameters())
        attention = LocalWindowAttention(radius=radius, window=window, pooled_kv_factor=pooled_kv_factor,
                                         device=weight.device, dtype=weight.dtype)
        originals[name] = module.processor
        module.set_processor(cls(attention, token_grid))
    hook = _GridFromInput(token_grid, family, patch_size)
    transformer.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(transformer, _STATE, _Conversion(originals, hook))
    return transformer


def restore(transformer: nn.Module) -> nn.Module:
    """Undo :func:`convert`: the original (dense) processors, no grid hook; returns the transformer."""
    state = getattr(transformer, _STATE, None)
    if state is None:
        raise ValueError("transformer: expected a model converted by fewstep.clear.convert, got one that is not")
    modules = _attention_modules(transformer)
    for name, processor in state.originals.items():
        modules[name].set_processor(processor)
    for key, hook in list(transformer._forward_pre_hooks.items()):
        if hook is state.hook:
            del transformer._forward_pre_hooks[key]
            transformer._forward_pre_hooks_with_kwargs.pop(key, None)
    delattr(transformer, _STATE)
    return transformer


def converted_attention(transformer: nn.Module) -> dict[str, nn.Module]:
    """The attention modules that :func:`convert` gave local processors, by name."""
    state = getattr(transformer, _STATE, None)
    if state is None:
        raise ValueError("transformer: expected a model converted by fewstep.clear.convert, got one that is not")
    modules = _attention_modules(transformer)
    return {name: modules[name] for name in state.originals}


# ----------------------------------------------------------------------------------------------
# The recipe


class _FlowModel(nn.Module):
    """A diffusers transformer as ``model(x_t, t, **cond)`` with t = 1000·sigma (FLUX's forward
    takes sigma and multiplies by 1000 itself, so it gets t / 1000)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.timestep_scale = 1e-3 if type(transformer).__name__ == "FluxTransformer2DModel" else 1.0

    def forward(self, x_t, t, **cond):
        t = t.to(x_t.device).expand(x_t.shape[0])
        return self.transformer(hidden_states=x_t, timestep=t * self.timestep_scale, return_dict=False, **cond)[0]


class _CaptureOutputs:
    """Forward hook on attention modules: appends each (image) output while ``enabled``."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.enabled = False

    def __call__(self, module, args, output):
        if self.enabled:
            self.outputs.append(output[0] if isinstance(output, tuple) else output)


_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out", "to_qkv")
_CONTEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_added_qkv")


class ClearDistillation(DistillationMethod):
    """CLEAR's fine-tuning: a copy of ``teacher`` with local-window attention learns, in its
    attention projections only, to match the dense teacher.

    loss = flow matching on data + ``lambda_distill``·MSE(student output, teacher output)
    + ``lambda_attn``·mean over layers of MSE(student attention output, teacher attention output).

    ``teacher``: a diffusers FLUX / SD3 / PixArt / DiT transformer predicting the flow velocity
    (eps - x0), called as ``teacher(hidden_states=x_t, timestep=t, **batch["cond"])`` with
    t = 1000·sigma (sigma for FLUX). It stays frozen and dense; the student is a converted deep
    copy (twice the weights in memory, as in CLEAR). Trainable: to_q/k/v/out of every converted
    attention, the context projections add_q/k/v_proj and to_add_out of joint blocks (unless
    ``train_context_projections=False``, CLEAR's released set) and the pooled K/V weights.
    ``attention_layers``: names of the converted attention modules whose outputs are matched
    (default all), or ``"clear"``: the FLUX single-stream attentions whose index among all
    attentions is a multiple of 4, as CLEAR's released ``distill.py`` picks them.
    Noise levels: sigma = shift·u / (1 + (shift - 1)·u), u uniform or logit-normal.
    """

    phases = ("student",)

    def __init__(self, teacher: nn.Module, *, radius: Optional[float] = None,
                 window: Optional[tuple[int, int]] = None, grid: Optional[tuple[int, int]] = None,
                 pooled_kv_factor: Optional[int] = None, lambda_distill: float = 0.5, lambda_attn: float = 0.5,
                 attention_layers: Union[None, str, Sequence[str]] = None, train_context_projections: bool = True,
                 shift: float = 1.0, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        super().__init__()
        for name, value in (("lambda_distill", lambda_distill), ("lambda_attn", lambda_attn)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"shift: expected a number > 0, got {shift!r}")
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling: expected 'uniform' or 'logit_normal', got {timestep_sampling!r}")
        student = convert(copy.deepcopy(teacher), radius=radius, window=window, grid=grid,
                          pooled_kv_factor=pooled_kv_factor)
        teacher.requires_grad_(False).eval()
        student.requires_grad_(False)
        local = converted_attention(student)
        trained = _ATTENTION_PROJECTIONS + (_CONTEXT_PROJECTIONS if train_context_projections else ())
        for module in local.values():
            for child in trained:
                if isinstance(getattr(module, child, None), nn.Module):
                    getattr(module, child).requires_grad_(True)
            module.processor.requires_grad_(True)  # the pooled K/V weights, when there are some
        if attention_layers == "clear":  # the single-stream FLUX attentions CLEAR's distill.py matches
            layers = [name for index, name in enumerate(local)
                      if name.startswith("single_transformer_blocks.") and index % 4 == 0]
        elif attention_layers is None or not isinstance(attention_layers, str):
            layers = list(local) if attention_layers is None else list(attention_layers)
        else:
            raise ValueError(f"attention_layers: expected None, 'clear' or a list of names, got {attention_layers!r}")
        unknown = [name for name in layers if name not in local]
        if unknown or not layers:
            raise ValueError(f"attention_layers: expected names of converted attention modules (e.g. "
                             f"{list(local)[:2]}), got {unknown or layers}")
        teacher_modules = _attention_modules(teacher)
        self.student_outputs, self.teacher_outputs = _CaptureOutputs(), _CaptureOutputs()
        for name in layers:
            local[name].register_forward_hook(self.student_outputs)
            teacher_modules[name].register_forward_hook(self.teacher_outputs)
        self.student = Denoiser(_FlowModel(student), prediction="flow", schedule=FlowSchedule())
        self.teacher = Denoiser(_FlowModel(teacher), prediction="flow", schedule=FlowSchedule())
        self.lambda_distill = float(lambda_distill)
        self.lambda_attn = float(lambda_attn)
        self.shift = float(shift)
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def parameters_of(self, phase: str) -> list[nn.Parameter]:
        self.check_phase(phase)
        return [p for p in self.student.parameters() if p.requires_grad]

    def sample_timesteps(self, batch: int, device) -> torch.Tensor:
        """t = 1000·sigma per sample, on ``device`` (no host sync)."""
        if self.timestep_sampling == "uniform":
            u = torch.rand(batch, device=device)
        else:
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, device=device))
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        return sigma * self.student.schedule.num_train_timesteps

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_phase(phase)
        x0 = batch["x0"]
        cond = batch.get("cond") or {}
        noise = batch.get("noise")
        noise = torch.randn_like(x0) if noise is None else noise
        t = self.sample_timesteps(x0.shape[0], x0.device)
        x_t = self.student.add_noise(x0, noise, t)
        with torch.no_grad():
            teacher_flow = self._run(self.teacher, self.teacher_outputs, x_t, t, cond)
        student_flow = self._run(self.student, self.student_outputs, x_t, t, cond)
        teacher_attn, self.teacher_outputs.outputs = self.teacher_outputs.outputs, []
        student_attn, self.student_outputs.outputs = self.student_outputs.outputs, []
        compute = student_flow.dtype
        loss_fm = F.mse_loss(student_flow, (noise - x0).to(compute))
        loss_distill = F.mse_loss(student_flow, teacher_flow)
        loss_attn = sum(F.mse_loss(s.to(compute), r.to(compute)) for s, r in zip(student_attn, teacher_attn))
        loss_attn = loss_attn / len(student_attn)
        loss = loss_fm + self.lambda_distill * loss_distill + self.lambda_attn * loss_attn
        logs = {"loss": loss, "loss_fm": loss_fm, "loss_distill": loss_distill, "loss_attn": loss_attn}
        return loss, {k: v.detach() for k, v in logs.items()}

    @staticmethod
    def _run(denoiser: Denoiser, capture: _CaptureOutputs, x_t, t, cond) -> torch.Tensor:
        capture.outputs = []
        capture.enabled = True
        try:
            return denoiser(x_t, t, **cond).flow
        finally:
            capture.enabled = False

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int = 28, **cond) -> torch.Tensor:
        """Samples of the local-attention student by flow-matching Euler in ``steps`` steps."""
        from fewstep.samplers import FlowMatchEulerSampler, sample
        model = self.student.model
        return sample(lambda x, t: model(x, t, **cond), noise, FlowMatchEulerSampler(shift=self.shift),
                      num_steps=steps)


__all__ = ["ClearDistillation", "FluxLocalAttnProcessor", "JointLocalAttnProcessor", "SelfLocalAttnProcessor",
           "convert", "converted_attention", "restore"]
