"""Each exact speed-up gives the loss and features of the plain computation (within 1e-5)."""
import random
from contextlib import nullcontext

import open_clip
import torch

from open_clip_starft.method.captions import CaptionBuilder
from open_clip_starft.method.descriptors import load_descriptors
from open_clip_starft.method.loss import StarLoss
from open_clip_starft.host.batch import Batch
from open_clip_starft.host.teacher import Teacher, TeacherImageCache, TeacherTextCache, make_teacher
from open_clip_starft.host.text_prefix import encode_text_prefix, has_prefix_encoding, install_prefix_encoding, trim_tokens
from open_clip_starft.tools.tiny_model import build_tiny_model
from open_clip_starft.host.step import starft_losses

TOKENIZER = open_clip.get_tokenizer("ViT-B-32", context_length=32)


def batch(seed=0, n=8):
    rng = random.Random(seed)
    builder = CaptionBuilder(["goldfish", "great white shark", "tree frog", "axolotl"], descriptors=load_descriptors("all"))
    labels = [rng.randrange(4) for _ in range(n)]
    pairs = [builder(c, rng) for c in labels]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    return Batch(images, TOKENIZER([p[0] for p in pairs]), TOKENIZER([p[1] for p in pairs]), torch.tensor(labels))


def test_prefix_encoding_equals_upstream_full_length_features():
    model, _ = build_tiny_model(seed=1)
    _, texts, spurious, *_ = batch()
    tokens = torch.cat([texts, spurious])
    full = open_clip.CLIP.encode_text(model, tokens, normalize=True)
    short, = trim_tokens(tokens)
    assert short.shape[1] < tokens.shape[1] and (tokens[:, short.shape[1]:] == 0).all()
    prefix = encode_text_prefix(model, short, normalize=True)
    assert torch.allclose(prefix, full, atol=1e-5)
    assert torch.equal(encode_text_prefix(model, tokens), open_clip.CLIP.encode_text(model, tokens))


def test_installed_prefix_encoding_is_detected_through_wrappers():
    model, _ = build_tiny_model()
    assert not has_prefix_encoding(model)
    assert install_prefix_encoding(model) and has_prefix_encoding(model)


def test_star_step_loss_and_gradients_with_and_without_trimming():
    data = batch(seed=2)
    results = []
    for trim in (False, True):
        model, _ = build_tiny_model(seed=3)
        teacher = Teacher(model)
        with torch.no_grad():  # let the student differ from the teacher so the Star term is not 0
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        if trim:
            install_prefix_encoding(model)
        losses, _, star_term = starft_losses(model, teacher, StarLoss(), data, 0.5, nullcontext, trim=trim)
        assert torch.allclose(star_term * 0.5, losses["star_loss"])  # the unweighted term, logged beside λ·L_star
        sum(losses.values()).backward()
        results.append((losses, model.token_embedding.weight.grad.clone(), model.visual.conv1.weight.grad.clone()))
    (plain, plain_tok, plain_conv), (fast, fast_tok, fast_conv) = results
    assert plain["star_loss"] > 1e-4
    for key in plain:
        assert abs(plain[key] - fast[key]) < 1e-5, key
    assert torch.allclose(plain_tok, fast_tok, atol=1e-5) and torch.allclose(plain_conv, fast_conv, atol=1e-5)


def test_teacher_text_cache_gives_the_same_loss_cold_and_warm():
    data = batch(seed=4)
    spurious = data.spurious
    model, _ = build_tiny_model(seed=5)
    teacher, cached = Teacher(model), Teacher(model, text_cache_mb=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain, _, _ = starft_losses(model, teacher, StarLoss(), data, 0.5, nullcontext)
    cache = cached.text_cache
    keys = cached.cache_keys(spurious)
    assert len(set(keys)) == len({tuple(r.tolist()) for r in spurious})  # one key per distinct caption
    cold, _, _ = starft_losses(model, cached, StarLoss(), data._replace(keys=keys), 0.5, nullcontext)
    assert cache.misses == len(keys) and cache.hits == 0
    warm, _, _ = starft_losses(model, cached, StarLoss(), data, 0.5, nullcontext)  # keys computed by the teacher
    assert cache.hits == len(keys)
    assert plain["star_loss"] > 1e-4
    for key in plain:
        assert abs(plain[key] - cold[key]) < 1e-5 and abs(plain[key] - warm[key]) < 1e-5, key
    # keys ignore padding: the same caption padded to another length has the same key
    assert cache.keys(spurious[:, :20]) == keys


def test_teacher_text_cache_respects_its_memory_cap():
    spurious = batch(seed=6, n=16).spurious
    model, _ = build_tiny_model(seed=7)
    teacher = make_teacher(model)
    row_bytes = 32 * 4  # embed_dim 32, float32
    cache = TeacherTextCache(max_mb=3 * row_bytes / 2 ** 20)
    features = cache(teacher, spurious, cache.keys(spurious))
    assert len(cache.features) == 3 and cache.bytes == 3 * row_bytes
    with torch.no_grad():
        want = teacher.encode_text(spurious, normalize=True)
    assert torch.allclose(features, want, atol=1e-6)  # captions beyond the cap are computed, not dropped


def test_teacher_image_cache_computes_each_image_once():
    model, _ = build_tiny_model(seed=8)
    teacher = make_teacher(model)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    ids = ["a", "b", "c", "a", "d", "b"]
    images[3], images[5] = images[0], images[1]  # one id, one image
    calls = []
    original = teacher.encode_image
    teacher.encode_image = lambda x, normalize=False: calls.append(len(x)) or original(x, normalize=normalize)
    cache = TeacherImageCache()
    got = cache(teacher, images, ids)
    again = cache(teacher, images.flip(0), ids)  # other pixels, same ids: the cached features come back
    assert calls == [6] and len(cache.features) == 4  # one forward; repeats in a batch are computed with it
    with torch.no_grad():
        want = original(images, normalize=True)
    assert torch.allclose(got, want, atol=2e-3)  # stored as float16
    assert torch.equal(again, got)
