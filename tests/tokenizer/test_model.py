import copy

import pytest
import torch
from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel

from tokenizer import VQTokenizer

TINY = dict(attn_resolutions=(8,), embed_dim=8)  # over conftest's TINY_TOKENIZER


@pytest.fixture
def tiny(tiny_tokenizer):
    def make(quantizer="cvq", **options):
        return tiny_tokenizer(
            **TINY, quantizer=quantizer, quantizer_options=options or {"num_codes": 16}
        ).eval()

    return make


@pytest.mark.parametrize(
    "kind, options",
    [
        ("vq", {"num_codes": 16}),
        ("cvq", {"num_codes": 16}),
        ("looc", {"num_codes": 16, "code_dim": 4}),
    ],
)
def test_round_trip_through_save_and_load(tmp_path, kind, options, tiny):
    model = tiny(kind, **options)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    model.train()
    model(x)  # moves the codebook and the running usage away from their initial values
    model.eval()
    before = model(x)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"scaling_factor": 1.0' in config  # always explicit, never diffusers' 0.18215
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    after = loaded(x)
    assert torch.equal(before.sample, after.sample)
    assert torch.equal(before.quantized.indices, after.quantized.indices)
    for name, buffer in model.vector_quantizer.named_buffers():
        assert torch.equal(buffer, dict(loaded.vector_quantizer.named_buffers())[name])


def test_encode_quantize_decode_compose_like_vqmodel(tiny):
    model = tiny()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        h = model.encode(x).latents
        assert h.shape == (2, 8, 8, 8)
        q = model.quantize(h)
        full = model(x).sample
        assert torch.equal(model.decode(h).sample, full)
        assert torch.equal(model.decode(q.z_q, force_not_quantize=True).sample, full)
        assert torch.equal(model.decode_indices(q.indices), full)
        assert not torch.equal(model.decode(h, force_not_quantize=True).sample, full)


def test_tuple_outputs_and_commit_loss_as_vqmodel_returns_them(tiny):
    model = tiny()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(x)
        sample, commit_loss = model(x, return_dict=False)
        (latents,) = model.encode(x, return_dict=False)
        decoded = model.decode(latents)
    assert torch.equal(sample, out.sample) and torch.equal(commit_loss, out.quantized.loss)
    assert torch.equal(decoded.commit_loss, out.quantized.loss)
    assert model.decode(latents, force_not_quantize=True).commit_loss is None


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    plain = tiny().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    grads = []
    for model in (plain, checkpointed):
        sample, commit_loss = model(x, return_dict=False)
        ((sample - x).abs().mean() + commit_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradients_reach_encoder_and_codebook(tiny):
    model = tiny().train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    ((out.sample - x).abs().mean() + out.quantized.loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.vector_quantizer.codebook.grad.abs().sum() > 0
    assert model.last_layer is model.decoder.conv_out.weight


def test_works_as_the_vqvae_of_diffusers_ldm_pipeline(tiny):
    model = tiny()
    model.register_to_config(scaling_factor=0.5)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=8,
        out_channels=8,
        block_out_channels=(16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = LDMPipeline(vqvae=model, unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 16, 16, 3)
    # the pipeline divides by scaling_factor, then decodes (re-quantizing) with our model
    torch.manual_seed(0)
    latents = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            latents = scheduler.step(unet(latents, t).sample, t, latents).prev_sample
        expected = model.decode(latents / 0.5).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - expected).max() < 1e-5


def test_looc_channels_must_divide_embed_dim(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"C=8.*d\*=3"):
        tiny_tokenizer(**TINY, quantizer="looc", quantizer_options={"num_codes": 8, "code_dim": 3})


def test_attention_is_single_head_softmax_attention():
    from tokenizer.model import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(8, 4).eval()
    x = torch.randn(2, 8, 3, 5)
    q, k, v = block.qkv(block.norm(x)).flatten(2).chunk(3, dim=1)  # B×C×HW each
    weights = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # B×HW×HW
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(2, 8, 3, 5))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
