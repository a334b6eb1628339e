"""The StarFT train step on its own: what stops a run, what is saved first, what is logged, and that
every process stops at the same step (2 CPU processes on gloo)."""
import argparse
import math
import os
import random

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from open_clip_starft.data.training import LabelStats
from open_clip_starft.tools.tiny_model import build_tiny_model
from open_clip_starft.errors import StarftError
from open_clip_starft.host.batch import Batch
from open_clip_starft.host.loop import optimizer_step
from open_clip_starft.host.step import StarftStep
from open_clip_starft.host.params import build_parser, starft_settings
from open_clip_starft.host.state import Resumed, RunState
from open_clip_starft.method.captions import CaptionBuilder
from open_clip_starft.method.descriptors import load_descriptors
from open_clip_starft.method.loss import StarLoss

CLASSES = ["circle", "square", "triangle", "cross"]
STEPS = 4  # batches per epoch


class FakeTrainData:
    """What the step reads of ``data["train"]``: ``dataloader.num_batches`` and ``label_stats``."""

    def __init__(self):
        self.dataloader = argparse.Namespace(num_batches=STEPS)
        self.label_stats = LabelStats()
        self.started_from = None

    def start_from(self, epoch, batches_done):
        self.started_from = (epoch, batches_done)


def step_args(tmp_path, rank=0, world_size=1, **flags):
    args = build_parser().parse_args([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])
    os.makedirs(tmp_path / "checkpoints", exist_ok=True)
    vars(args).update(
        device="cpu", precision="fp32", train_data="shards/x-{0..3}.tar", epochs=1, batch_size=8,
        logs=str(tmp_path), checkpoint_path=str(tmp_path / "checkpoints"), save_logs=rank == 0, name="unit",
        distributed=world_size > 1, rank=rank, world_size=world_size, horovod=False, grad_clip_norm=None,
        accum_freq=1, siglip=False)
    return args


def make_batch(seed, n=8):
    rng = random.Random(seed)
    builder = CaptionBuilder(CLASSES, descriptors=load_descriptors("background"))
    labels = [rng.randrange(len(CLASSES)) for _ in range(n)]
    pairs = [builder(c, rng) for c in labels]
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return images, tokenizer([p[0] for p in pairs]), tokenizer([p[1] for p in pairs]), torch.tensor(labels)


class Run:
    """A StarftStep with its model, optimizer and data, driven as the epoch loop drives it."""

    def __init__(self, args, loss=None, resumed=None, model=None):
        self.args = args
        self.model = model if model is not None else build_tiny_model(seed=0)[0]
        self.state = RunState(settings=starft_settings(args), num_classes=len(CLASSES), resumed=resumed)
        self.state.start(args)
        self.step = StarftStep(args, self.model, self.state)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.loss = loss or StarLoss()
        self.data = {"train": FakeTrainData()}

    def start(self):
        return self.step.start_epoch(0, self.data, self.args)

    def train(self, i, batch=None):
        self.optimizer.zero_grad()
        losses, logit_scale, log = self.step(self.model, batch or make_batch(i), self.loss, self.args,
                                             step=i, epoch=0, num_batches_per_epoch=STEPS)
        sum(losses.values()).backward()
        optimizer_step(self.model, self.optimizer, None, self.args)
        self.step.after_step(self.model, self.optimizer, None, 0, i + 1, self.args)
        return losses, log

    def skip_labels(self, skipped, seen=100):
        stats = self.data["train"].label_stats
        stats.seen.value, stats.no_label.value = seen, skipped

    def bad_class_id(self):
        """A class id beyond the class names: the label check stops the run at the next step."""
        stats = self.data["train"].label_stats
        stats.out_of_range.value, stats.bad_id.value = 1, 7

    def saved(self):
        return sorted(os.listdir(self.args.checkpoint_path))


def test_the_step_logs_lambda_the_step_and_the_unweighted_star_term(tmp_path):
    run = Run(step_args(tmp_path))
    assert run.start() == 0
    for i in range(2):
        losses, log = run.train(i)
        assert log["step"] == i and log["star_lambda"] == 0.5 * (1 - i / STEPS)
        assert log["star_term"] == pytest.approx(losses["star_loss"].item() / log["star_lambda"], rel=1e-5)
    assert log["star_term"] > 0
    flyp = Run(step_args(tmp_path, starft_lambda=0))
    flyp.start()
    assert flyp.step.teacher is None and "star_term" not in flyp.train(0)[1]  # FLYP: no teacher, no Star term


def test_the_step_takes_tuples_and_batches():
    images, texts, spurious, labels = make_batch(0)
    assert Batch.of((images, texts, spurious, labels)).labels is labels
    batch = Batch(images, texts, spurious, labels)
    assert Batch.of(batch) is batch and Batch.of(tuple(batch)) == batch
    assert Batch.of((*batch[:4], images, ["a"] * 8)).sample_ids == ["a"] * 8


def test_a_data_error_after_a_step_saves_a_checkpoint_first(tmp_path):
    run = Run(step_args(tmp_path))
    run.start()
    run.train(0)
    run.bad_class_id()
    with pytest.raises(StarftError) as error:
        run.train(1)
    path = os.path.join(run.args.checkpoint_path, "epoch_0_step_1.pt")
    assert "outside the 4 class names" in str(error.value) and f"saved {path} first" in str(error.value)
    assert "--resume latest" in str(error.value)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["starft"]["batches_done"] == 1 and ckpt["starft"]["starft_lambda"] == 0.5
    assert set(ckpt["starft"]) == set(starft_settings(run.args)) | {"history", "batches_done"}  # no run state
    assert ckpt["starft"]["history"] == [{"epoch": 0, "batches_done": 0, "step": 0, "batch_size": 8, "world_size": 1,
                                          "accum_freq": 1, "epochs": 1, "settings": run.state.history[0]["settings"]}]
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_a_data_error_before_any_step_saves_nothing(tmp_path):
    run = Run(step_args(tmp_path))
    run.start()
    run.bad_class_id()
    with pytest.raises(StarftError, match="outside the 4 class names") as error:
        run.train(0)
    assert "saved" not in str(error.value) and run.saved() == []


def test_an_end_of_epoch_error_saves_first_but_never_non_finite_weights(tmp_path):
    run = Run(step_args(tmp_path))
    run.start()
    for i in range(STEPS):
        run.train(i)
    run.skip_labels(1, seen=32)  # 1 of 32 (3 %) over the 1 % threshold: judged at the end of the epoch
    with pytest.raises(StarftError, match=f"saved .*epoch_0_step_{STEPS}.pt first"):
        run.step.end_epoch(0, STEPS, run.args)
    os.remove(os.path.join(run.args.checkpoint_path, f"epoch_0_step_{STEPS}.pt"))
    with torch.no_grad():
        run.model.visual.conv1.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(StarftError, match="nothing saved: the weights are not finite"):
        run.step.end_epoch(0, STEPS, run.args)
    assert run.saved() == []


def test_a_non_finite_loss_stops_before_backward_naming_the_step_and_the_terms(tmp_path):
    run = Run(step_args(tmp_path))
    run.start()
    run.train(0)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with torch.no_grad():
        run.model.logit_scale.fill_(math.inf)  # the contrastive logits overflow
    with pytest.raises(StarftError) as error:
        run.train(1)
    message = str(error.value)
    assert message.startswith("non-finite loss at step 1 (epoch 0, batch 1): contrastive_loss=nan")
    assert "star_loss=" in message and "star_term=" in message and "λ=0.375" in message and "\n" not in message
    assert run.saved() == []  # never saved
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "logit_scale")  # no step was taken


def test_resuming_mid_epoch_continues_the_data_and_bare_weights_become_the_teacher(tmp_path):
    run = Run(step_args(tmp_path), resumed=Resumed("x.pt", epoch=0, batches_done=3))
    assert run.start() == 3 and run.data["train"].started_from == (0, 3)
    other, _ = build_tiny_model(seed=1)
    torch.save({f"module.{k}": v for k, v in other.state_dict().items()}, tmp_path / "bare.pt")
    run = Run(step_args(tmp_path), resumed=Resumed(str(tmp_path / "bare.pt"), bare=True))
    assert run.start() == 0 and run.data["train"].started_from is None
    assert torch.equal(run.step.teacher.model.visual.conv1.weight, other.visual.conv1.weight)


def _rank_stops_with_the_other(rank, tmp_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        args = step_args(tmp_path, rank=rank, world_size=2)
        run = Run(args, loss=StarLoss(gather_with_grad=True, rank=rank, world_size=2))
        run.start()
        run.train(0, make_batch(rank))
        if rank == 1:  # only rank 1's data is bad
            run.bad_class_id()
        try:
            run.train(1, make_batch(10 + rank))
            outcome = "trained on"
        except StarftError as e:
            outcome = str(e)
        (tmp_path / f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_every_process_stops_at_the_same_step_when_one_finds_a_data_error(tmp_path):
    mp.spawn(_rank_stops_with_the_other, args=(tmp_path, 29641), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes[1].startswith("1 sample(s) in") and "saved" in outcomes[1]
    assert outcomes[0].startswith("another process stopped the run") and "saved" in outcomes[0]
    assert os.listdir(tmp_path / "checkpoints") == ["epoch_0_step_1.pt"]  # written once, by rank 0


def _resnet_clip(context_length=16):
    """A tiny CLIP whose image tower (OpenCLIP's ModifiedResNet) has BatchNorm layers."""
    torch.manual_seed(0)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": (1, 1, 1, 1), "width": 16},
                                text_cfg={"context_length": context_length, "vocab_size": 49408, "width": 32, "heads": 2,
                                          "layers": 1}, output_dict=True)


def test_a_batch_statistics_teacher_starts_equal_to_a_train_mode_student_and_keeps_its_statistics():
    from open_clip_starft.host.teacher import Teacher
    from open_clip_starft.method.loss import star_loss
    tokenizer = open_clip.get_tokenizer("RN50", context_length=16)
    captions = ["a photo of a dog on the beach.", "a photo of a cat in the snow.", "a photo of a dog in a forest.",
                "a photo of a cat on grass."]
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(4, 3, 32, 32, generator=g), tokenizer(captions), tokenizer(captions),
                  torch.tensor([0, 1, 0, 1]))
    terms = {}
    for mode in ("running", "batch"):
        student = _resnet_clip().train()
        teacher = Teacher(student, batchnorm=mode)
        buffers = {k: v.clone() for k, v in teacher.model.state_dict().items() if "running" in k}
        t = teacher.features(batch)
        x = student.encode_image(batch.images, normalize=True)
        s = student.encode_text(batch.spurious, normalize=True)
        terms[mode] = float(star_loss(x, s, t.image, t.spurious, batch.labels, logit_scale=float(t.scale)))
        assert all(torch.equal(teacher.model.state_dict()[k], v) for k, v in buffers.items())  # never updated
        if mode == "batch":
            assert torch.allclose(x, t.image, atol=1e-6)
    # running statistics (eval mode) against the student's batch statistics: the Star term is not 0 at step 0
    assert terms["batch"] < 1e-6 < 1e-3 < terms["running"]
    with pytest.raises(ValueError, match="choose running or batch"):
        Teacher(_resnet_clip(), batchnorm="frozen")
    assert "--starft-teacher-batchnorm" in build_parser().format_help()


def test_frozen_batchnorm_statistics_stay_the_zero_shot_models_through_training_steps(tmp_path):
    """--starft-freeze-bn-stats: after the loop's model.train(), every BatchNorm layer still normalises
    with, and keeps, the zero-shot running statistics, while its scale and shift train; the Star term
    is 0 at step 0 against the default (running-statistics) teacher. Without the flag the statistics move."""
    from open_clip_starft.errors import ConfigError
    from open_clip_starft.host.preflight import check_frozen_batchnorm as check
    moved = {}
    for frozen in (True, False):
        args = step_args(tmp_path / str(frozen), starft_lambda=1, starft_schedule="constant")
        args.starft_freeze_bn_stats = frozen
        run = Run(args, model=_resnet_clip(context_length=32).train())
        bn = [m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        stats = {k: v.clone() for k, v in run.model.state_dict().items() if "running" in k}
        scales = [m.weight.detach().clone() for m in bn]
        run.start()
        run.model.train()  # what the epoch loop does before the first step
        logs = [run.train(i)[1] for i in range(3)]
        after = run.model.state_dict()
        moved[frozen] = any(not torch.equal(after[k], v) for k, v in stats.items())
        if frozen:
            assert len(bn) > 5 and not any(m.training for m in bn)
            assert logs[0]["star_term"] < 1e-6 < logs[2]["star_term"]
            assert any(not torch.equal(m.weight, w) for m, w in zip(bn, scales))  # affine weights train
        else:
            assert logs[0]["star_term"] > 1e-3  # train-mode student, eval-mode teacher
    assert moved == {True: False, False: True}
    flags = build_parser().parse_args(["--starft-freeze-bn-stats", "--starft-teacher-batchnorm", "batch"])
    with pytest.raises(ConfigError, match="drop --starft-teacher-batchnorm batch"):
        check(flags)
