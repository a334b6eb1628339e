"""The benchmarks keep working: one short run of each writes the records the README quotes."""
import json

from open_clip_starft.bench.cli import main
from open_clip_starft.cli import main as cli_main
from open_clip_starft.demo.data import brace_pattern, write_shards

STEP_KEYS = {"model", "device", "batch_size", "precision", "flyp_step_s", "starft_step_s", "naive_step_s",
             "starft_over_flyp", "starft_over_naive", "flop_floor_ratio", "peak_mem_mb"}


def test_bench_step_tiny(tmp_path, capsys):
    out = tmp_path / "step.json"
    # through the console command's dispatcher, as README gives it
    assert cli_main(["bench", "step", "--model", "tiny", "--batch-size", "4", "--steps", "1", "--out", str(out)]) == 0
    record, = json.loads(out.read_text())
    assert STEP_KEYS <= set(record)
    # FLOPs are exact counts: StarFT adds the teacher's image forward and the spurious-caption text work
    assert record["naive_flops"] > record["starft_flops"] > record["flyp_flops"] + record["teacher_image_forward_flops"]
    assert record["flop_floor_ratio"] == (record["flyp_flops"] + record["teacher_image_forward_flops"]) / record["flyp_flops"]
    assert "StarFT/FLYP" in capsys.readouterr().out


def test_bench_data_compares_with_upstream(tmp_path):
    shards = brace_pattern(write_shards(str(tmp_path / "shards"), 256, seed=0, image_size=32, samples_per_shard=64))
    out = tmp_path / "data.json"
    assert main(["data", "--shards", shards, "--workers", "1", "--batch-size", "32", "--image-size", "32",
                 "--epochs", "1", "--out", str(out)]) == 0
    record, = json.loads(out.read_text())
    assert record["starft_samples_per_s"] > 0 and record["upstream_samples_per_s"] > 0
