"""fewstep.clear on tiny random-weight diffusers transformers (FLUX, SD3, PixArt): the converted
model against the same model run with dense attention under CLEAR's mask, and the CLEAR recipe."""
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from fewstep import clear  # noqa: E402
from fewstep.reference.local_window_attention import local_window_mask  # noqa: E402

DT = torch.float64  # end to end: converted and dense differ by summation order only (~1e-15), so 1e-10 is tight


# ---------------------------------------------------------------------------------------------
# tiny models and their inputs


def _flux(seed=0, layers=2):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=layers, num_single_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6)).to(DT)


def _flux_inputs(grid, n_text, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h, w, 3, dtype=DT)
    ids[..., 1] = torch.arange(h, dtype=DT)[:, None]
    ids[..., 2] = torch.arange(w, dtype=DT)[None, :]
    return dict(hidden_states=torch.randn(batch, h * w, 4, generator=g, dtype=DT),
                encoder_hidden_states=torch.randn(batch, n_text, 8, generator=g, dtype=DT),
                pooled_projections=torch.randn(batch, 8, generator=g, dtype=DT),
                timestep=torch.rand(batch, generator=g, dtype=DT), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(n_text, 3, dtype=DT))


def _sd3(seed=0, layers=3):
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=8, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,)).to(DT)


def _sd3_inputs(grid, n_text, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 2 * grid[0], 2 * grid[1], generator=g, dtype=DT),
                encoder_hidden_states=torch.randn(batch, n_text, 8, generator=g, dtype=DT),
                pooled_projections=torch.randn(batch, 8, generator=g, dtype=DT),
                timestep=torch.rand(batch, generator=g, dtype=DT) * 1000)


def _pixart(seed=0):
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, norm_num_groups=4,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=8).to(DT)


def _pixart_inputs(grid, n_text, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 2 * grid[0], 2 * grid[1], generator=g, dtype=DT),
                encoder_hidden_states=torch.randn(batch, n_text, 8, generator=g, dtype=DT),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _dit(seed=0):
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10).to(DT)


def _dit_inputs(grid, batch=2, seed=1):  # DiT unpatchifies to its configured square sample size
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 2 * grid[0], 2 * grid[1], generator=g, dtype=DT),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                class_labels=torch.randint(0, 10, (batch,), generator=g))


def _run(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra, return_dict=False)[0]


def _masked_sdpa(monkeypatch, grid, n_text, radius=None, window=None, text_last=False):
    """Dense SDPA under CLEAR's mask for self/joint attention over the grid's tokens (cross-attention
    left alone): the expected result, independent of fewstep's processors."""
    sdpa = F.scaled_dot_product_attention
    n_image = grid[0] * grid[1]

    def masked(q, k, v, attn_mask=None, **kwargs):
        n = q.shape[-2]
        if k.shape[-2] == n and n in (n_image, n_image + n_text):
            texts = n - n_image
            mask = local_window_mask(grid, texts, radius=radius, window=window)
            if text_last and texts:  # SD3's order: [image | text]
                order = torch.cat([torch.arange(texts, n), torch.arange(texts)])
                mask = mask[order][:, order]
            attn_mask = mask
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", masked)


# ---------------------------------------------------------------------------------------------
# conversion


@pytest.mark.parametrize("pattern", [dict(radius=2.5), dict(window=(1, 2))])
@pytest.mark.parametrize("grid,n_text,batch", [((5, 7), 3, 2), ((4, 4), 5, 1)])
def test_flux_matches_dense_attention_under_clear_mask(pattern, grid, n_text, batch):
    model = _flux()
    inputs = _flux_inputs(grid, n_text, batch)
    mask = local_window_mask(grid, n_text, **pattern)  # FLUX's order is [text | image], as CLEAR's
    expected = _run(model, inputs, joint_attention_kwargs={"attention_mask": mask})
    dense = _run(model, inputs)
    assert clear.convert(model, **pattern) is model
    out = _run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - dense).abs().max() > 1e-3  # the mask matters at these sizes
    clear.restore(model)
    torch.testing.assert_close(_run(model, inputs), dense, rtol=0, atol=0)


def test_flux_radius_covering_the_grid_is_the_unconverted_model():
    grid = (3, 5)
    model = _flux()
    inputs = _flux_inputs(grid, 4)
    dense = _run(model, inputs)
    clear.convert(model, radius=(2 ** 2 + 4 ** 2) ** 0.5 + 0.01)
    torch.testing.assert_close(_run(model, inputs), dense, rtol=1e-10, atol=1e-10)


def test_flux_pooled_kv_matches_dense_attention_with_pooled_tokens(monkeypatch):
    grid, n_text, f = (4, 6), 3, 2
    model = _flux()
    inputs = _flux_inputs(grid, n_text)
    n_image = grid[0] * grid[1]
    mask = local_window_mask(grid, n_text, radius=2, n_extra=n_image // f ** 2)
    flux = diffusers.models.transformers.transformer_flux

    def pooled_dense(q, k, v, attn_mask=None, **kwargs):  # [B, N, heads, D]; CLEAR's init is the block mean
        def pool(t):
            img = t[:, n_text:].unflatten(1, grid).permute(0, 3, 4, 1, 2).flatten(0, 1)  # [B*heads, D, H, W]
            pooled = F.avg_pool2d(img, f).flatten(2)  # [B*heads, D, E]
            return pooled.unflatten(0, (t.shape[0], t.shape[2])).permute(0, 3, 1, 2)

        k, v = torch.cat([k, pool(k)], dim=1), torch.cat([v, pool(v)], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    with monkeypatch.context() as m:
        m.setattr(flux, "dispatch_attention_fn", pooled_dense)
        expected = _run(model, inputs)
    clear.convert(model, radius=2, pooled_kv_factor=f)
    weights = [n for n, _ in model.named_parameters() if n.endswith("spatial_weight")]
    assert len(weights) == 4 and all(".attn.processor.attention.pooled_kv." in n for n in weights)
    torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grid,n_text,batch", [((5, 7), 3, 2), ((3, 3), 6, 1)])
def test_sd3_matches_dense_attention_under_clear_mask(monkeypatch, grid, n_text, batch):
    model = _sd3()  # block 0 has SD3.5's image-only attn2; the last block is context_pre_only
    inputs = _sd3_inputs(grid, n_text, batch)
    dense = _run(model, inputs)
    with monkeypatch.context() as m:
        _masked_sdpa(m, grid, n_text, radius=2.2, text_last=True)
        expected = _run(model, inputs)
    kinds = {type(p).__name__ for p in clear.convert(model, radius=2.2).attn_processors.values()}
    assert kinds == {"JointLocalAttnProcessor"}
    out = _run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - dense).abs().max() > 1e-3


def test_pixart_self_attention_is_local_and_cross_attention_dense(monkeypatch):
    grid, n_text = (5, 3), 4
    model = _pixart()
    inputs = _pixart_inputs(grid, n_text)
    with monkeypatch.context() as m:
        _masked_sdpa(m, grid, 0, window=(1, 1))
        expected = _run(model, inputs)
    clear.convert(model, window=(1, 1))
    kinds = {name: type(p).__name__ for name, p in model.attn_processors.items()}
    assert {k for k, v in kinds.items() if v == "SelfLocalAttnProcessor"} == {
        f"transformer_blocks.{i}.attn1.processor" for i in range(2)}
    assert all(v == "AttnProcessor2_0" for k, v in kinds.items() if ".attn2." in k)
    torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-10, atol=1e-10)


def test_dit_self_attention_is_local(monkeypatch):
    grid = (4, 4)
    model = _dit()
    inputs = _dit_inputs(grid)
    dense = _run(model, inputs)
    with monkeypatch.context() as m:
        _masked_sdpa(m, grid, 0, radius=1.9)
        expected = _run(model, inputs)
    clear.convert(model, radius=1.9)
    out = _run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - dense).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_converted_model_compiles_fullgraph(family):
    grid, n_text = (3, 4), 3
    if family == "sd3":  # grid read from the latent's shape
        model, inputs = clear.convert(_sd3(layers=1), radius=2), _sd3_inputs(grid, n_text, batch=1)
    else:  # FLUX reads the grid from img_ids on the host: fixed here
        model, inputs = clear.convert(_flux(layers=1), radius=2, grid=grid), _flux_inputs(grid, n_text, batch=1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(_run(compiled, inputs), _run(model, inputs), rtol=1e-12, atol=1e-12)


def test_conversion_errors_are_named():
    with pytest.raises(TypeError, match="transformer: expected a diffusers transformer"):
        clear.convert(object())
    with pytest.raises(ValueError, match=r"grid: expected \(H, W\) for Sequential"):
        clear.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="transformer: expected diffusers attention modules, found none"):
        clear.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), grid=(2, 2))

    class CustomProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            return hidden_states

    model = _pixart()
    model.transformer_blocks[1].attn1.set_processor(CustomProcessor())
    with pytest.raises(TypeError, match="got CustomProcessor at 'transformer_blocks.1.attn1'"):
        clear.convert(model)

    flux = _flux()
    flux.single_transformer_blocks[0].attn.set_processor(CustomProcessor())  # e.g. an IP-Adapter's
    with pytest.raises(TypeError, match="got CustomProcessor at 'single_transformer_blocks.0.attn'"):
        clear.convert(flux)

    attn = clear.convert(_flux(), radius=2).transformer_blocks[0].attn  # used before any model forward
    with pytest.raises(ValueError, match="grid: expected the token grid of this call, got None"):
        attn(hidden_states=torch.randn(1, 4, 32, dtype=DT), encoder_hidden_states=torch.randn(1, 2, 32, dtype=DT))


def test_flux_grid_read_once_per_ids_tensor(monkeypatch):
    grid, n_text = (3, 5), 2
    model = clear.convert(_flux(), radius=2)
    inputs = _flux_inputs(grid, n_text)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    first = _run(model, inputs)
    torch.testing.assert_close(_run(model, inputs), first, rtol=0, atol=0)
    assert len(reads) == 1
    inputs["img_ids"] = inputs["img_ids"].clone()
    _run(model, inputs)
    assert len(reads) == 2


# ---------------------------------------------------------------------------------------------
# the recipe


def _recipe_batch(grid, n_text, batch=2, seed=3):
    inputs = _flux_inputs(grid, n_text, batch, seed)
    x0 = inputs.pop("hidden_states")
    inputs.pop("timestep")
    g = torch.Generator().manual_seed(seed + 1)
    return {"x0": x0, "noise": torch.randn(x0.shape, generator=g, dtype=DT), "cond": inputs}


def test_recipe_trains_only_attention_projections():
    grid, n_text = (4, 4), 3
    method = clear.ClearDistillation(_flux(), radius=2, pooled_kv_factor=2)
    student = method.student.model.transformer
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert {id(p) for p in method.parameters_of("student")} == {
        id(p) for n, p in student.named_parameters() if n in trainable}
    suffixes = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    expected = {n for n, _ in student.named_parameters()
                if n.rsplit(".", 1)[0].endswith(suffixes) or n.endswith("pooled_kv.spatial_weight")}
    # double-stream: 8 linears (weight, bias); single-stream: to_q/k/v (no to_out there); 4 pools
    assert trainable == expected and len(trainable) == 2 * 8 * 2 + 2 * 3 * 2 + 4
    loss, logs = method.loss("student", _recipe_batch(grid, n_text), 0)
    loss.backward()
    grads = {n for n, p in method.named_parameters() if p.grad is not None}
    assert {f"student.model.transformer.{n}" for n in trainable} == grads
    assert all(p.grad.abs().sum() > 0 for p in method.parameters_of("student"))
    assert set(logs) == {"loss", "loss_fm", "loss_distill", "loss_attn"}
    assert all(not v.requires_grad for v in logs.values())


def test_recipe_on_sd3():
    grid, n_text = (3, 5), 4
    method = clear.ClearDistillation(_sd3(), radius=2, timestep_sampling="logit_normal", shift=3.0)
    inputs = _sd3_inputs(grid, n_text)
    x0 = inputs.pop("hidden_states")
    inputs.pop("timestep")
    loss, logs = method.loss("student", {"x0": x0, "cond": inputs}, 0)
    loss.backward()
    assert torch.isfinite(loss) and logs["loss_attn"] > 0 and logs["loss_distill"] > 0
    student = method.student.model.transformer
    for name in clear.converted_attention(student):  # 3 joint attentions and SD3.5's attn2
        assert student.get_submodule(name).to_q.weight.grad.abs().sum() > 0, name
    assert len(clear.converted_attention(student)) == 4


def test_recipe_without_context_projections_is_clears_released_set():
    method = clear.ClearDistillation(_flux(), radius=2, train_context_projections=False)
    names = {n for n, p in method.student.named_parameters() if p.requires_grad}
    assert names and not any(".add_" in n or "to_add_out" in n for n in names)


def test_recipe_losses_vanish_when_the_window_covers_everything():
    grid, n_text = (3, 4), 2
    method = clear.ClearDistillation(_flux(), radius=10)
    _, logs = method.loss("student", _recipe_batch(grid, n_text), 0)
    assert logs["loss_distill"] < 1e-20 and logs["loss_attn"] < 1e-20 and logs["loss_fm"] > 0.1


def test_recipe_attention_loss_is_the_mean_over_chosen_layers():
    grid, n_text = (3, 4), 2
    batch = _recipe_batch(grid, n_text)
    layers = ["single_transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    method = clear.ClearDistillation(_flux(), radius=1.5, attention_layers=layers)
    outputs = {}
    for side, model in (("student", method.student.model.transformer), ("teacher", method.teacher.model.transformer)):
        for name in layers:
            model.get_submodule(name).register_forward_hook(
                lambda m, a, out, key=(side, name): outputs.__setitem__(key, out[0] if isinstance(out, tuple) else out))
    torch.manual_seed(0)
    _, logs = method.loss("student", batch, 0)
    expected = sum(F.mse_loss(outputs["student", n], outputs["teacher", n]) for n in layers) / 2
    torch.testing.assert_close(logs["loss_attn"], expected.detach())
    with pytest.raises(ValueError, match=r"attention_layers: expected names of converted attention modules .*"
                                         r"got \['norm_out'\]"):
        clear.ClearDistillation(_flux(), radius=2, attention_layers=["norm_out"])
    with pytest.raises(ValueError, match="attention_layers: expected None, 'clear' or a list of names, got 'all'"):
        clear.ClearDistillation(_flux(), radius=2, attention_layers="all")


def test_recipe_clear_layer_choice():
    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(  # 2 double-stream + 7 single-stream attentions, indices 0..8
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=7, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))
    method = clear.ClearDistillation(flux, radius=2, attention_layers="clear")
    hooked = [name for name, m in method.student.model.transformer.named_modules()
              if any(h is method.student_outputs for h in m._forward_hooks.values())]
    assert hooked == ["single_transformer_blocks.2.attn", "single_transformer_blocks.6.attn"]


def test_recipe_loss_decreases():
    grid, n_text = (4, 4), 3
    method = clear.ClearDistillation(_flux(layers=1), radius=1.5, pooled_kv_factor=2)
    optimizer = torch.optim.Adam(method.parameters_of("student"), lr=1e-2)
    batch = _recipe_batch(grid, n_text)
    losses = []
    for step in range(4):
        torch.manual_seed(0)  # the same noise levels each step: only the parameters change
        loss, logs = method.loss("student", batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_step("student", step)
        losses.append(float(logs["loss"]))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses


def test_recipe_sample_and_bad_arguments():
    grid, n_text = (3, 3), 2
    method = clear.ClearDistillation(_flux(), radius=2)
    cond = _recipe_batch(grid, n_text, batch=1)["cond"]
    noise = torch.randn(1, 9, 4, dtype=DT)
    out = method.sample(noise, steps=2, **cond)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="phase: expected one of"):
        method.loss("critic", {}, 0)
    with pytest.raises(ValueError, match="lambda_attn: expected a number >= 0, got -1"):
        clear.ClearDistillation(_flux(), lambda_attn=-1)
    with pytest.raises(ValueError, match="timestep_sampling: expected 'uniform' or 'logit_normal', got 'beta'"):
        clear.ClearDistillation(_flux(), timestep_sampling="beta")
