"""One evaluator everywhere: the same model and set give the same numbers through every caller
(``eval``, ``wise`` at α 1, ``sweep`` and the demo's scorer, Waterbirds-lite's, and ``--starft-val``
during training: tests/test_train_validation.py compares that one with ``eval``)."""
import json

import pytest

from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.eval.cli import main as eval_main
from open_clip_starft.eval.wise import main as wise_main
from studies.waterbirds_lite.benchmark import Evaluator as WaterbirdsEvaluator
from open_clip_starft.tools.sweep import WeightsScorer
from open_clip_starft.tools.tiny_model import write_tiny_model

KEYS = ("top1", "worst_group", "avg_group")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    shards = brace_pattern(write_shards(str(root / "set"), 48, seed=13, biased=False, image_size=32,
                                        samples_per_shard=24))
    classes = root / "set" / "classnames.txt"  # beside the shards, where Waterbirds-lite reads its class names
    classes.write_text("\n".join(CLASSNAMES) + "\n")
    model = write_tiny_model(str(root / "model"), seed=5)
    return {"root": root, "set": shards, "classes": str(classes), "model": model}


def test_every_caller_gives_the_numbers_of_eval(ws, tmp_path):
    common = ["--workers", "0", "--device", "cpu", "--no-plots", "--no-progress"]
    assert eval_main(["--model", ws["model"], "--set", f"s={ws['set']}", "--classnames", ws["classes"],
                      "--out", str(tmp_path / "eval.jsonl"), *common]) == 0
    (want,) = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]

    weights = ws["model"].removeprefix("local-dir:") + "/open_clip_model.safetensors"
    assert wise_main(["--model", ws["model"], "--fine-tuned", weights, "--alphas", "0,1", "--set", f"s={ws['set']}",
                      "--classnames", ws["classes"], "--out", str(tmp_path / "wise"), *common]) == 0
    wise = [json.loads(line) for line in (tmp_path / "wise" / "results.jsonl").read_text().splitlines()]
    for record in wise:  # α 0 and α 1 are both this model (zero-shot = fine-tuned here)
        assert {k: record[k] for k in KEYS} == {k: want[k] for k in KEYS}
        assert record["ece"] == pytest.approx(want["ece"], abs=1e-6)

    scorer = WeightsScorer(ws["model"], None, {"val": ws["set"]}, ws["classes"])  # sweep's and the demo's
    got = scorer(scorer.zero_shot, ("val",))
    assert (got["val_avg"], got["val_worst_group"]) == (want["top1"], want["worst_group"])

    study = WaterbirdsEvaluator(ws["model"], {"sets": {"wb-val": {"pattern": ws["set"]}}}, roles=("wb-val",))
    got = study.evaluate(study.zero_shot_state)["wb-val"]
    assert {k: got[k] for k in KEYS} == {k: want[k] for k in KEYS}
    assert {str(g): acc for g, acc in got["groups"].items()} == want["groups"]
