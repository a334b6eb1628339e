"""``open-clip-starft export``: a training checkpoint as a model folder people can share.

    open-clip-starft export --checkpoint logs/starft/checkpoints/epoch_10.pt --out starft-vitb16
    open-clip-starft export --checkpoint CKPT --model local-dir:DIR --out FOLDER --results results.jsonl

FOLDER gets the layout OpenCLIP's own Hugging Face Hub upload writes (``open_clip_config.json``,
``open_clip_model.safetensors``, the tokenizer files when the text tower uses a Hugging Face
tokenizer) and a model card (``README.md``) with the training settings: every ``--starft-*``
value of the checkpoint's ``"starft"`` entry, and the data, epochs and optimisation settings the
run's ``params.txt`` (beside ``checkpoints/``) records; with ``--results`` (``open-clip-starft eval``'s
JSON lines), its robustness table (top-1, worst group, per set). Plain OpenCLIP loads it:
``open_clip.create_model_and_transforms("local-dir:FOLDER")``; ``huggingface-cli upload ORG/NAME
FOLDER`` shares it unchanged (nothing here reaches the network). The folder is checked before the
command ends: OpenCLIP loads it back and every weight equals the checkpoint's.

FOLDER is new or empty; a non-empty one is replaced only with ``--overwrite`` (written beside it and
swapped in whole), never when it is or holds the source model, the checkpoint or the results. The card
names the base model and the data by name (``--base-model``, ``--card-data-name``; default: their
folders' names), never by a path of this machine, and its front matter carries ``base_model``,
``datasets`` and the Hub's ``model-index`` of the ``--results``. The checkpoint is read weights-only:
one holding other objects is refused unless ``--trust-checkpoint`` (for your own files only).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import yaml

from open_clip_starft.data import files
from open_clip_starft.errors import ConfigError, StarftError, one_line_errors
from open_clip_starft.eval.cli import trust_flag
from open_clip_starft.host.params import build_parser as training_parser
from open_clip_starft.eval.report import layout, markdown_table, read_jsonl

# open_clip, torch and ``eval.models`` are imported by the functions that read, write and check weights, so
# the parser and the one-line refusals of bad flags answer at once.

# params.txt entries the card shows under "Training", in this order (label, key)
TRAINING_KEYS = (
    ("Base weights (--pretrained)", "pretrained"), ("Training data", "train_data"), ("Dataset type", "dataset_type"),
    ("Samples per epoch", "train_num_samples"), ("Batch size per process", "batch_size"), ("Processes", "world_size"),
    ("Learning rate", "lr"), ("Weight decay", "wd"), ("Warm-up steps", "warmup"), ("LR schedule", "lr_scheduler"),
    ("Training precision", "precision"), ("Seed", "seed"), ("Augmentation", "aug_cfg"),
)
PAPER = "StarFT: Robust Fine-tuning of Zero-shot Models via Spuriousity Alignment (Kim et al., IJCAI 2025)"


def run_params(checkpoint: str) -> tuple[dict, str | None]:
    """``(params, path)`` of the run a checkpoint belongs to (``RUN/params.txt`` for
    ``RUN/checkpoints/epoch_N.pt``); ``({}, None)`` when there is none; an empty one is a one-line error."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "params.txt")
    from open_clip_starft.eval.models import read_params
    return (read_params(path), path) if os.path.isfile(path) else ({}, None)


def model_changes(params: dict) -> tuple[dict, dict]:
    """``(model_cfg updates, preprocess_cfg)`` that the run's ``--force-*`` and ``--image-*`` flags
    made to the model it trained (OpenCLIP's ``create_model_and_transforms`` applies them the same way)."""
    updates, preprocess = {}, {}
    if params.get("force_quick_gelu") is True:
        updates["quick_gelu"] = True
    if params.get("force_custom_text") is True:
        updates["custom_text"] = True
    size = params.get("force_image_size")
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    if size not in (None, "None"):
        updates["vision_cfg"] = {"image_size": size}
    if params.get("force_context_length") not in (None, "None"):
        updates["text_cfg"] = {"context_length": params["force_context_length"]}
    for flag, key in (("image_mean", "mean"), ("image_std", "std"), ("image_interpolation", "interpolation"),
                      ("image_resize_mode", "resize_mode")):
        if params.get(flag) not in (None, "None"):
            preprocess[key] = params[flag]
    return updates, preprocess


def _history_text(entry: dict) -> str:
    """One settings-history entry as ``--flag value, …`` (paths by their base names)."""
    settings = {f"--{k.replace('_', '-')}": _public(v) for k, v in entry.get("settings", {}).items()}
    settings.update({f"--{k.replace('_', '-')}": entry[k] for k in ("batch_size", "epochs") if k in entry})
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def starft_flags() -> set[str]:
    """The ``starft_*`` names that are command-line flags of ``open_clip_starft.main``."""
    return {k for k in vars(training_parser().parse_args([])) if k.startswith("starft_")}


def results_of(records: list[dict], checkpoint: str, path: str) -> tuple[list[dict], str]:
    """The eval records of ``checkpoint`` in ``records`` and their checkpoint label: those whose
    ``settings.pretrained`` is this file; else the only checkpoint the file holds."""
    labels = list(dict.fromkeys(r["checkpoint"] for r in records))
    mine = [r for r in records if _same_file(r.get("settings", {}).get("pretrained"), checkpoint)]
    if mine:
        return mine, mine[0]["checkpoint"]
    if len(labels) == 1:
        return records, labels[0]
    raise StarftError(f"--results {path!r} holds checkpoints {', '.join(labels)} and none was evaluated from {checkpoint!r}: "
                      f"pass the results of this checkpoint (open-clip-starft eval --pretrained {checkpoint} ...)")


def _same_file(a, b) -> bool:
    try:
        return bool(a) and os.path.samefile(a, b)
    except OSError:
        return False


def robustness_section(records: list[dict], checkpoint: str, path: str) -> str:
    """Markdown: this checkpoint's per-set table (top-1, top-5, worst group, average group, ECE, n),
    and the file's checkpoints side by side when it holds more than this one."""
    mine, label = results_of(records, checkpoint, path)
    mine = [r for r in mine if r["checkpoint"] == label]
    id_set, _, group_sets = layout(records)
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Zero-shot classification with `open-clip-starft eval` (checkpoint `{label}`; accuracies in %; "
             "precision: the autocast precision each row was computed at):", "",
             "| set | top-1 | top-5 | worst group | average group | ECE | images | precision |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in mine:
        kind = " (ID)" if r["dataset"] == id_set else ""
        grouped = r["dataset"] in group_sets
        ece = "–" if r.get("ece") is None else f"{r['ece']:.3f}"
        lines.append(f"| {r['dataset']}{kind} | {pct(r['top1'])} | {pct(r.get('top5'))} | "
                     f"{pct(r['worst_group']) if grouped else '–'} | {pct(r['avg_group']) if grouped else '–'} | "
                     f"{ece} | {r['n']} | {r.get('settings', {}).get('precision', 'not recorded')} |")
    if len({r["checkpoint"] for r in records}) > 1:
        lines += ["", f"All checkpoints of `{os.path.basename(path)}` (WG: worst group; Avg: top-1 of a group set):", "",
                  markdown_table(records).rstrip("\n")]
    return "\n".join(lines)


def public_name(value: str) -> str:
    """A name for a path that says nothing of this machine: a file's or folder's base name (a shard
    pattern's or ``.tar``'s folder; ``local-dir:DIR``'s folder); other text unchanged."""
    path = value.removeprefix("local-dir:").split("::")[0].rstrip("/")
    if os.sep not in path:
        return "home" if path == "~" else value
    base = os.path.basename(path)
    if any(c in base for c in "{*?[") or base.endswith(".tar"):
        base = os.path.basename(os.path.dirname(path))
    return base or value


# an absolute or home-relative path anywhere in a text (``val=/data/val-{0..3}.tar``, ``local-dir:/m``), not a URL's
_LOCAL_PATH = re.compile(r"(?<![\w.~:/-])(?:local-dir:)?(?:~|/)[^\s,;'\"()\[\]]*")


def _public(value):
    """``value`` with every absolute (or ``~``) path in it replaced by its ``public_name``, wherever it stands in
    a text (``NAME=/path`` items, comma lists), in strings, lists and dicts."""
    if isinstance(value, str):
        return _LOCAL_PATH.sub(lambda m: public_name(m[0]) if len(m[0]) > 1 else m[0], value)
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    return value


_METRICS = (("top1", "accuracy", "top-1 accuracy"), ("top5", "top_5_accuracy", "top-5 accuracy"),
            ("worst_group", "worst_group_accuracy", "worst-group accuracy"),
            ("avg_group", "average_group_accuracy", "average-group accuracy"),
            ("ece", "expected_calibration_error", "expected calibration error"))


def model_index(records: list[dict], checkpoint: str, path: str, name: str) -> list[dict]:
    """The Hub's ``model-index`` of this checkpoint's eval records: one zero-shot classification result
    per set, with its accuracies in % (worst and average group for sets with groups) and its ECE."""
    mine, label = results_of(records, checkpoint, path)
    results = []
    for r in (r for r in mine if r["checkpoint"] == label):
        metrics = [{"type": kind, "name": what, "value": round(100 * r[key], 2) if key != "ece" else round(r[key], 4)}
                   for key, kind, what in _METRICS if r.get(key) is not None]
        results.append({"task": {"type": "zero-shot-image-classification"},
                        "dataset": {"name": r["dataset"], "type": r["dataset"]}, "metrics": metrics})
    return [{"name": name, "results": results}]


def _tower(cfg: dict, kind: str) -> str:
    """One tower of a ``model_cfg`` in words (``ViT: 12 layers, width 768, patch 16, 224 px``)."""
    if kind == "image":
        if cfg.get("timm_model_name"):
            return f"timm {cfg['timm_model_name']}"
        layers = cfg.get("layers")
        if isinstance(layers, (list, tuple)):
            return f"ModifiedResNet ({'-'.join(map(str, layers))} blocks, width {cfg.get('width')}, {cfg.get('image_size')} px)"
        return (f"ViT ({layers} layers, width {cfg.get('width')}, patch {cfg.get('patch_size')}, "
                f"{cfg.get('image_size')} px)")
    if cfg.get("hf_model_name"):
        return f"Hugging Face {public_name(str(cfg['hf_model_name']))}"
    return f"transformer ({cfg.get('layers')} layers, width {cfg.get('width')}, {cfg.get('context_length', 77)} tokens)"


def architecture(model_cfg: dict) -> str:
    """The architecture of a ``model_cfg``, named from the config itself (never a folder's name): the OpenCLIP
    model name whose registered config it equals, else its towers in words."""
    import open_clip
    for name in open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return f"{name} (OpenCLIP config)"
    return (f"custom CLIP: image tower {_tower(model_cfg.get('vision_cfg') or {}, 'image')}; text tower "
            f"{_tower(model_cfg.get('text_cfg') or {}, 'text')}; embedding {model_cfg.get('embed_dim')}")


def check_public(text: str, what: str, paths: list[str]) -> None:
    """Refuse to write ``text`` (a file meant for sharing) if it still holds one of ``paths`` (this machine's
    folders: home, the working folder, the checkpoint's) or the host name; a one-line StarftError."""
    import socket
    host = socket.gethostname()
    found = [p for p in paths if p and len(p) > 1 and p in text]
    if host and len(host) > 3 and re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", text):
        found.append(f"host name {host}")
    if found:
        raise StarftError(f"{what} would show {found[0]}, a name of this machine: report this (the card must name "
                          "only base names)")


def _front_matter(readme: str, extra: dict) -> str:
    """``readme`` (``generate_readme``'s text) with ``extra`` added to its YAML front matter."""
    end = readme.index("---\n", 4)
    return readme[:end] + yaml.safe_dump(extra, sort_keys=False, allow_unicode=True) + readme[end:]


def model_card(*, name: str, model: str, checkpoint: str, meta: dict, params: dict, params_path: str | None,
               results: str | None, license_id: str, base_model: str | None = None, data_name: str | None = None,
               model_cfg: dict | None = None) -> str:
    """The README.md of the folder (OpenCLIP's ``generate_readme`` layout; Hub front matter with
    ``base_model``, ``datasets`` and, with ``results``, a ``model-index``). Paths are shown by their
    base names only (``public_name``): the card names no folder of this machine."""
    starft = dict(meta.get("starft") or {})
    flags = starft_flags()
    batches_done = starft.pop("batches_done", None)
    history = starft.pop("history", None) or []
    settings = {f"--{k.replace('_', '-')}": _public(v) for k, v in starft.items() if k in flags}
    recorded = {k: _public(v) for k, v in starft.items() if k not in flags}
    epoch, epochs = meta.get("epoch"), params.get("epochs")
    trained = f"{epoch}" + (f" of {epochs}" if epochs is not None else "") if epoch is not None else "not recorded"
    if batches_done is not None:
        trained += f" (a mid-epoch checkpoint: {batches_done} batches of epoch {epoch + 1} also done)"
    base_model = base_model or public_name(model)
    data_name = data_name or (public_name(str(params["train_data"])) if params.get("train_data") else None)
    details = {"Architecture": architecture(model_cfg) if model_cfg else public_name(model), "Base model": base_model,
               "Method": PAPER,
               "Loss": "not recorded (no params.txt)" if "siglip" not in params else (
                   ("SigLIP's sigmoid loss (OpenCLIP's SigLipLoss, --siglip)" if params["siglip"] is True
                    else "CLIP's contrastive loss (OpenCLIP's ClipLoss)") + " + λ · the Star term"),
               "Checkpoint": f"{os.path.basename(checkpoint)} (run {meta.get('name', '?')})", "Epochs trained": trained}
    details.update({label: _public(params[key]) for label, key in TRAINING_KEYS if params.get(key) not in (None, "None", "", {}, [])})
    if data_name:
        details["Training data"] = data_name
    if not params_path:
        details["Run settings"] = "no params.txt beside the checkpoint's folder: data and optimisation settings not recorded"
    details["StarFT settings"] = {f"`{k}`": v for k, v in settings.items()} or "none recorded (not a StarFT checkpoint?)"
    if recorded:
        details["Recorded by the run"] = {f"`{k}`": v for k, v in recorded.items()}
    if len(history) > 1:  # resumed with other settings (--starft-allow-changed-settings)
        details["Settings history"] = {f"from step {h.get('step')} (epoch {h.get('epoch')})": _history_text(h)
                                       for h in history}
    card = {
        "tags": ["clip", "open_clip", "starft", "zero-shot-image-classification"],
        "license": license_id,
        "description": (f"A CLIP model fine-tuned with StarFT through OpenCLIP's training code (`open_clip_starft`): "
                        "contrastive fine-tuning on class-name captions plus the Star regulariser, which keeps the "
                        "model's view of spurious captions aligned with the frozen zero-shot model. Fine-tuned from "
                        f"`{base_model}`" + (f" on `{data_name}`" if data_name else "") + "; exported from "
                        f"`{os.path.basename(checkpoint)}` with `open-clip-starft export`."),
        "details": details,
        "usage": ("```python\nimport open_clip\n\n"
                  f"model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{name}\")  "
                  "# or \"hf-hub:ORG/NAME\" once uploaded\n"
                  f"tokenizer = open_clip.get_tokenizer(\"local-dir:{name}\")\n```\n"),
    }
    extra = {"base_model": base_model, **({"datasets": [data_name]} if data_name else {})}
    if results:
        records = read_jsonl(results)
        card["comparison"] = robustness_section(records, checkpoint, results)
        extra["model-index"] = model_index(records, checkpoint, results, name)
    from open_clip.push_to_hf_hub import generate_readme
    return _front_matter(generate_readme(card, name), extra)


def check_out(out: str, overwrite: bool, keep: dict[str, str]) -> None:
    """``--out`` may be written: never a folder that is or holds one of ``keep`` (what -> path: the
    source model, the checkpoint, the results), and a non-empty folder only with ``overwrite``."""
    real = os.path.realpath(out)
    for what, path in keep.items():
        if path and (os.path.realpath(path) == real or os.path.realpath(path).startswith(real.rstrip(os.sep) + os.sep)):
            raise ConfigError(f"--out {out} is or holds {what} ({path}), which exporting would replace: "
                              "choose another folder")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a folder: choose a folder")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise ConfigError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0]}): pass --overwrite "
                          "to replace it, or choose an empty or new folder")


def export_model(checkpoint: str, out: str, *, model: str | None = None, trust: bool = False) -> tuple[str, dict, dict, str]:
    """The checkpoint's weights as the ``local-dir:`` folder ``out`` (config, weights, tokenizer files),
    with the changes the run's ``--force-*``/``--image-*`` flags made, checked by loading it back with
    plain OpenCLIP. Returns ``("local-dir:OUT", checkpoint entries, run params, model)``."""
    import open_clip
    import torch

    from open_clip_starft.eval.models import checkpoint_state, save_local_dir
    if not os.path.isfile(checkpoint):
        raise StarftError(f"--checkpoint {checkpoint!r} does not exist: give a training checkpoint (LOGS/NAME/checkpoints/epoch_N.pt)")
    params, _ = run_params(checkpoint)
    model = model or params.get("model")
    if not model:
        raise StarftError(f"--checkpoint {checkpoint!r} has no params.txt beside its run folder: pass --model "
                          "(the OpenCLIP name or local-dir:DIR it was trained with)")
    state, meta = checkpoint_state(checkpoint, trust)
    updates, preprocess = model_changes(params)
    saved = save_local_dir(state, model, out, preprocess_cfg=preprocess, model_cfg_updates=updates)
    loaded = open_clip.create_model(saved).state_dict()  # the check: plain OpenCLIP loads exactly these weights
    differ = [k for k, v in loaded.items() if k not in state or not torch.equal(v, state[k].to(v.dtype))]
    if differ or len(loaded) != len(state):
        raise StarftError(f"the folder {out!r} does not load back as the checkpoint (first differing weight: "
                          f"{(differ or ['a missing key'])[0]}): report this with the checkpoint's --model")
    return saved, meta, params, model


def export(checkpoint: str, out: str, *, model: str | None = None, results: str | None = None,
           license_id: str = "other", overwrite: bool = False, trust: bool = False, base_model: str | None = None,
           data_name: str | None = None, log=print) -> str:
    """Export ``checkpoint`` to the folder ``out`` with its model card (see the module docstring);
    returns ``"local-dir:OUT"``. ``out`` is written whole beside itself (``OUT.partial-PID``) and swapped
    in at the end: a non-empty ``out`` is replaced only with ``overwrite``, and never when it is or
    holds the source model, the checkpoint or the results."""
    from open_clip_starft.eval.models import model_config
    if results is not None:
        if not os.path.isfile(results):
            raise StarftError(f"--results {results!r} does not exist: give the results.jsonl of open-clip-starft eval")
        results_of(read_jsonl(results), checkpoint, results)  # a wrong results file fails before anything is written
    source = model or run_params(checkpoint)[0].get("model")
    check_out(out, overwrite, {"the source model": str(source).removeprefix("local-dir:") if str(source).startswith("local-dir:") else "",
                               "the checkpoint": checkpoint, "the results": results or ""})
    name = os.path.basename(os.path.abspath(out))
    with files.atomic_dir(out) as partial:
        _, meta, params, model = export_model(checkpoint, partial, model=model, trust=trust)
        card = model_card(name=name, model=model, checkpoint=checkpoint, meta=meta, params=params,
                          params_path=run_params(checkpoint)[1], results=results, license_id=license_id,
                          base_model=base_model, data_name=data_name,
                          model_cfg=model_config(f"local-dir:{partial}")["model_cfg"])
        check_public(card, "the model card", [os.path.expanduser("~"), os.getcwd(),
                                              os.path.dirname(os.path.abspath(checkpoint))])
        files.write_text(os.path.join(partial, "README.md"), card)
    saved = f"local-dir:{out}"
    log(f"exported {checkpoint} as {saved} (model card {os.path.join(out, 'README.md')})")
    log(f"load: open_clip.create_model_and_transforms({saved!r}); share: huggingface-cli upload ORG/NAME {out}")
    return saved


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft export", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a training checkpoint (epoch_N.pt)")
    parser.add_argument("--model", metavar="NAME|local-dir:DIR",
                        help="the OpenCLIP model it was trained with (default: the run's params.txt)")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="the model folder to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (written beside it, then "
                        "swapped in; never the source model's folder)")
    parser.add_argument("--trust-checkpoint", action="store_true", help="load a checkpoint that holds objects "
                        "besides weights (unpickling can run code: only for files you made yourself)")
    parser.add_argument("--results", metavar="results.jsonl", help="open-clip-starft eval results of this checkpoint, "
                        "for the card's robustness table and model-index")
    parser.add_argument("--license", dest="license_id", default="other", metavar="ID",
                        help="the card's license (a Hugging Face license id; default 'other': the base weights' and "
                             "data's terms apply)")
    parser.add_argument("--base-model", metavar="NAME", help="the card's base_model, e.g. the Hub id of the weights "
                        "fine-tuned (default: the model's name or folder name)")
    parser.add_argument("--card-data-name", metavar="NAME", help="the card's training data name, e.g. a Hub dataset "
                        "id (default: the training data's folder name)")
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with trust_flag():
        export(args.checkpoint, args.out, model=args.model, results=args.results, license_id=args.license_id,
               overwrite=args.overwrite, trust=args.trust_checkpoint, base_model=args.base_model,
               data_name=args.card_data_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
