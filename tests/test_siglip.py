"""StarFT on SigLIP models: upstream's SigLipLoss as the contrastive term, both forms of the Star term
against float64 references written here, FLYP-SigLIP = upstream's --siglip step, and runs of the tiny SigLIP."""
import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from open_clip_train.train import train_one_epoch

from open_clip_starft.errors import ConfigError
from open_clip_starft.host.loop import train_one_epoch_with_step
from open_clip_starft.host.params import refuse_unsupported
from open_clip_starft.method.loss import StarLoss, star_loss
from open_clip_starft.tools.tiny_model import build_tiny_model
from reference import star_loss_reference
from test_step import CLASSES, Run, make_batch, step_args


def sigmoid_star_reference(x, s, tx, ts, row_labels, col_labels, scale, bias, mask=True):
    """Pair by pair in float64: p = 1/(1+exp(-(scale·x·s + bias))) for teacher and student, the Bernoulli KL
    p̃ log(p̃/p) + (1-p̃) log((1-p̃)/(1-p)) over the pairs of different classes (all without ``mask``),
    summed and divided by the number of rows."""
    x, s, tx, ts = (t.double() for t in (x, s, tx, ts))
    total = (x * 0).sum() + (s * 0).sum()
    for i in range(x.shape[0]):
        for j in range(s.shape[0]):
            if mask and int(row_labels[i]) == int(col_labels[j]):
                continue
            p_t = 1 / (1 + torch.exp(-(scale * torch.dot(tx[i], ts[j]) + bias)))
            p_s = 1 / (1 + torch.exp(-(scale * torch.dot(x[i], s[j]) + bias)))
            total = total + p_t * torch.log(p_t / p_s) + (1 - p_t) * torch.log((1 - p_t) / (1 - p_s))
    return total / x.shape[0]


def features(rows, cols, seed, dim=16):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    return make(rows), make(cols), make(rows), make(cols)


CASES = [(8, 8, [0, 1, 2, 0, 1, 2, 3, 3], None),
         (4, 12, [0, 1, 1, 2], [0, 1, 1, 2, 3, 3, 0, 4, 2, 5, 1, 6]),
         (5, 5, [7, 7, 7, 7, 7], None)]  # every pair masked: 0


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("rows,cols,row_labels,col_labels", CASES)
def test_both_forms_match_float64_references_in_value_and_gradient(rows, cols, row_labels, col_labels, mask):
    x, s, tx, ts = features(rows, cols, seed=rows * 7 + cols)
    rl = torch.tensor(row_labels)
    cl = torch.tensor(col_labels) if col_labels is not None else rl
    scale, bias = 10.0, -10.0
    for form, reference in (("softmax", lambda *a: star_loss_reference(*a, scale, mask=mask)),
                            ("sigmoid", lambda *a: sigmoid_star_reference(*a, scale, bias, mask=mask))):
        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        got = star_loss(xs, ss, tx, ts, rl, cl, logit_scale=scale, mask_same_class=mask, form=form, logit_bias=bias)
        got.backward()
        xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
        want = reference(xr, sr, tx, ts, rl, cl)
        want.backward()
        assert got.dtype == torch.float64 and abs(got - want) <= 1e-12 * max(1.0, abs(want)), form
        assert torch.allclose(xs.grad, xr.grad, atol=1e-12) and torch.allclose(ss.grad, sr.grad, atol=1e-12), form
        if len(set(row_labels)) == 1 and mask:
            assert got == 0 and not xs.grad.any()
        else:
            assert want > 1e-3, form  # the term is really exercised
    # the mask matters for both forms (a test that drops it fails above)
    if len(set(row_labels)) > 1:
        for form in ("softmax", "sigmoid"):
            on, off = (star_loss(x, s, tx, ts, rl, cl, logit_scale=scale, mask_same_class=m, form=form, logit_bias=bias)
                       for m in (True, False))
            assert abs(on - off) > 1e-3 * abs(on), form


def test_the_softmax_form_ignores_the_bias_and_the_sigmoid_form_needs_it():
    x, s, tx, ts = features(6, 6, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = star_loss(x, s, tx, ts, labels, logit_scale=10.0)
    assert abs(star_loss(x, s, tx, ts, labels, logit_scale=10.0, logit_bias=-10.0) - plain) < 1e-12  # cancels
    assert abs(star_loss(x, s, tx, ts, labels, logit_scale=10.0, form="sigmoid", logit_bias=-10.0)
               - star_loss(x, s, tx, ts, labels, logit_scale=10.0, form="sigmoid", logit_bias=0.0)) > 1e-4
    with pytest.raises(ValueError, match="logit_bias"):
        star_loss(x, s, tx, ts, labels, form="sigmoid")


def test_star_loss_on_siglip_returns_upstreams_contrastive_term_and_the_unweighted_star_term():
    img, txt, _, _ = features(6, 6, seed=5)
    x, s, tx, ts = features(6, 6, seed=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    for form in ("softmax", "sigmoid"):
        out = StarLoss(SigLipLoss(), star_form=form)(
            img, txt, scale, bias, spurious_features=s, teacher_image_features=tx, teacher_spurious_features=ts,
            class_ids=labels, teacher_logit_scale=scale, teacher_logit_bias=bias, output_dict=True)
        assert torch.equal(out["contrastive_loss"], SigLipLoss()(img, txt, scale, bias))
        assert torch.equal(out["star_loss"], star_loss(img, s, tx, ts, labels, logit_scale=scale, form=form,
                                                       logit_bias=bias))


def siglip_args(tmp_path, **flags):
    args = step_args(tmp_path, **flags)
    args.siglip = True
    return args


@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
def test_both_forms_are_zero_at_step_zero_and_train_the_tiny_siglip(tmp_path, form):
    """The student is the teacher at step 0: both forms are 0; then they grow and training is finite."""
    model, _ = build_tiny_model(seed=0, siglip=True)
    run = Run(siglip_args(tmp_path, starft_star_form=form), loss=StarLoss(SigLipLoss(), star_form=form), model=model)
    run.start()
    terms = []
    for i in range(3):
        losses, log = run.train(i)
        terms.append(log["star_term"])
        assert all(math.isfinite(v.item()) for v in losses.values())
    assert abs(terms[0]) < 1e-6 and terms[-1] > 1e-6, terms
    assert run.model.logit_bias.item() != -10.0  # the bias trains, as upstream trains it


def test_the_sigmoid_form_needs_siglip_and_coca_is_refused_saying_why():
    base = dict(accum_freq=1, distill_model=None, siglip=False, model="ViT-B-16-SigLIP", pretrained=None,
                train_data="x.tar", dataset_type="webdataset", starft_star_form="sigmoid")
    with pytest.raises(ConfigError, match="sigmoid.*--siglip"):
        refuse_unsupported(argparse.Namespace(**base))
    refuse_unsupported(argparse.Namespace(**{**base, "siglip": True}))
    refuse_unsupported(argparse.Namespace(**{**base, "accum_freq": 4, "starft_star_form": "softmax"}))
    with pytest.raises(ConfigError, match="CoCa's captioning loss has no StarFT counterpart"):
        refuse_unsupported(argparse.Namespace(**{**base, "model": "coca_ViT-B-32", "siglip": True}))


class OneBatchData:
    """``data["train"]`` for both loops: the dataloader yields the given batches."""

    def __init__(self, batches):
        self.batches = batches
        self.dataloader = self
        self.num_batches = len(batches)
        self.num_samples = sum(len(b[0]) for b in batches)
        from open_clip_starft.data.training import LabelStats
        self.label_stats = LabelStats()

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch):
        pass


def test_flyp_siglip_is_upstreams_siglip_step(tmp_path):
    """λ = 0 on a SigLIP model: our loop and step take the step open_clip_train's own loop takes with
    --siglip (SigLipLoss, the logit bias trained, the scale clamped) on the same batch."""
    images, texts, spurious, labels = make_batch(0)
    args = siglip_args(tmp_path, starft_lambda=0)
    vars(args).update(distill=False, skip_scheduler=True, log_every_n_steps=100, wandb=False, local_rank=0)
    weights = {}
    for name in ("upstream", "ours"):
        model, _ = build_tiny_model(seed=0, siglip=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if name == "upstream":
            train_one_epoch(model, {"train": OneBatchData([(images, texts)])}, SigLipLoss(), 0, optimizer, None,
                            None, None, args)
        else:
            run = Run(args, loss=StarLoss(SigLipLoss()), model=model)
            train_one_epoch_with_step(model, {"train": OneBatchData([(images, texts, spurious, labels)])}, run.loss,
                                      0, optimizer, None, None, run.step, args)
        weights[name] = model.state_dict()
    changed = 0
    for key, value in weights["upstream"].items():
        assert torch.equal(value, weights["ours"][key]), key
        changed += not torch.equal(value, build_tiny_model(seed=0, siglip=True)[0].state_dict()[key])
    assert changed > 10 and "logit_bias" in weights["ours"]


@pytest.fixture(scope="module")
def siglip_ws(small_data, tmp_path_factory):
    """``small_data``'s shards (64 samples, 2 shards) with the tiny SigLIP as the model."""
    from runs import workspace
    from open_clip_starft.tools.tiny_model import write_tiny_model
    root = tmp_path_factory.mktemp("siglip")
    return {**workspace(small_data, root), "model": write_tiny_model(str(root / "model"), siglip=True)}


def test_siglip_trains_with_the_sigmoid_form_and_accumulation_and_exports_a_folder_open_clip_loads(siglip_ws, tmp_path):
    import open_clip
    from runs import checkpoints, log_of, metric, run, train_args
    from open_clip_starft.tools.export import main as export_main
    ws = siglip_ws
    result = run(train_args(ws, "sigmoid", "--siglip", "--starft-lambda", "0.5", "--starft-star-form", "sigmoid",
                            "--accum-freq", "2", epochs=1, batch_size=16))
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "sigmoid")
    assert metric(log, "Step") == [0, 1]  # 64 samples = 4 micro-batches of 16 = 2 steps of 2
    star = metric(log, "Star term")
    assert len(star) == 2 and abs(star[0]) < 1e-6 and star[1] > 0  # 0 while the student is the teacher
    assert all(math.isfinite(v) for v in metric(log, "Contrastive_loss"))
    ckpt = os.path.join(ws["root"], "logs", "sigmoid", "checkpoints", "epoch_1.pt")
    assert checkpoints(ws, "sigmoid") == ["epoch_1.pt"]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state["logit_bias"].item() != -10.0  # trained
    out = tmp_path / "export"
    assert export_main(["--checkpoint", ckpt, "--model", ws["model"], "--out", str(out)]) == 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")  # plain OpenCLIP loads it
    assert type(model).__name__ == "CustomTextCLIP" and torch.equal(model.logit_bias, state["logit_bias"])
    card = (out / "README.md").read_text()
    assert "SigLipLoss" in card and "sigmoid" in card  # the loss and --starft-star-form


@pytest.mark.e2e
def test_siglip_trains_in_two_processes(siglip_ws):
    import sys
    from runs import log_of, metric, run, train_args
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
                "-m", "--", "open_clip_starft.main")
    result = run(train_args(siglip_ws, "ddp", "--siglip", "--starft-lambda", "0.5", "--loss-dist-impl", "gather",
                            epochs=1, batch_size=16), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(siglip_ws, "ddp")
    star = metric(log, "Star term")
    assert metric(log, "Step") == [0, 1] and abs(star[0]) < 1e-6 and star[1] > 0


def test_siglip_eval_keeps_top1_and_takes_ece_of_the_models_sigmoid_probabilities():
    from open_clip_starft.eval.metrics import SampleScores, ece_of_confidence, metrics_of_scores
    g = torch.Generator().manual_seed(0)
    logits, labels = 10 * torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    softmax, sigmoid = SampleScores.from_logits(logits, labels), SampleScores.from_logits(logits, labels, logit_bias=-3.0)
    assert torch.equal(softmax.predictions, sigmoid.predictions) and torch.equal(softmax.top5_hits, sigmoid.top5_hits)
    # independently: each image's predicted class's own sigmoid probability
    want = 1 / (1 + torch.exp(-(logits.double().max(dim=1).values - 3.0)))
    assert torch.allclose(sigmoid.confidence, want, rtol=1e-12)
    correct = logits.argmax(dim=1) == labels
    assert metrics_of_scores(sigmoid)["ece"] == ece_of_confidence(want, correct)
    assert metrics_of_scores(sigmoid)["ece"] != metrics_of_scores(softmax)["ece"]
    assert metrics_of_scores(sigmoid)["top1"] == metrics_of_scores(softmax)["top1"]


def test_the_evaluator_scores_a_siglip_model_with_its_bias():
    from open_clip_starft.eval.evaluator import Evaluator
    model, _ = build_tiny_model(seed=0, siglip=True)
    assert Evaluator(model, None, None).logit_bias() == -10.0
    assert Evaluator(build_tiny_model(seed=0)[0], None, None).logit_bias() is None
