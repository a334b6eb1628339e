"""Reports of eval records: JSON lines, a Markdown table with checkpoints side by side (the paper's
Tables 2 and 3: ID, each OOD set, OOD average; worst-group and average accuracy of group sets),
per-group accuracy bar plots and the WiSE-FT curve (PNG, matplotlib's Agg backend)."""
from __future__ import annotations

import json
import os

from open_clip_starft.data.files import atomic_open, atomic_path, json_line, write_json, write_text
from open_clip_starft.errors import StarftError


def write_jsonl(records: list[dict], path: str) -> None:
    """``records`` as JSON lines at ``path``, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as f:
        for r in records:
            f.write(json_line(r))


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_group_set(records: list[dict], name: str) -> bool:
    """A set with more than one group (Waterbirds, PACS, CIFAR-10.02) is reported by worst-group
    and average accuracy."""
    return any(len(r["groups"]) > 1 for r in records if r["dataset"] == name)


def layout(records: list[dict], id_set: str | None = None) -> tuple[str | None, list[str], list[str]]:
    """``(ID set, OOD sets, group sets)`` in the order the sets first appear. The ID set is
    ``id_set``, else ``imagenet`` when present, else the first set without groups."""
    names = list(dict.fromkeys(r["dataset"] for r in records))
    if id_set is not None and id_set not in names:
        raise StarftError(f"--id {id_set!r} is not one of the evaluated sets ({', '.join(names)}): name one of them")
    group_sets = [n for n in names if is_group_set(records, n) and n != id_set]
    plain = [n for n in names if n not in group_sets]
    if id_set is None:
        id_set = "imagenet" if "imagenet" in plain else (plain[0] if plain else None)
    return id_set, [n for n in plain if n != id_set], group_sets


def summary(records: list[dict], id_set: str | None = None) -> dict:
    """Per checkpoint: ``id`` (top-1 of the ID set), ``ood`` {set: top-1}, ``ood_avg``, and for
    group sets ``{set: {"wg": worst-group, "avg": top-1}}``."""
    id_name, ood, groups = layout(records, id_set)
    out = {}
    for r in records:
        row = out.setdefault(r["checkpoint"], {"id": None, "ood": {}, "group": {}})
        if r["dataset"] == id_name:
            row["id"] = r["top1"]
        elif r["dataset"] in ood:
            row["ood"][r["dataset"]] = r["top1"]
        else:
            row["group"][r["dataset"]] = {"wg": r["worst_group"], "avg": r["top1"]}
    for row in out.values():
        row["ood_avg"] = sum(row["ood"].values()) / len(row["ood"]) if row["ood"] else None
    return out


def markdown_table(records: list[dict], id_set: str | None = None) -> str:
    """Checkpoints as rows, sets as columns, accuracies in %: ``ID``, each OOD set, ``OOD avg``;
    ``WG`` and ``Avg`` (overall top-1) of each group set."""
    id_name, ood, group_sets = layout(records, id_set)
    rows = summary(records, id_set)
    head = ["checkpoint"]
    if id_name:
        head.append(f"{id_name} (ID)")
    head += ood
    if ood:
        head.append("OOD avg")
    for g in group_sets:
        head += [f"{g} WG", f"{g} Avg"]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, row in rows.items():
        cells = [name.replace("|", "\\|")]
        if id_name:
            cells.append(pct(row["id"]))
        cells += [pct(row["ood"].get(n)) for n in ood]
        if ood:
            cells.append(pct(row["ood_avg"]))
        for g in group_sets:
            v = row["group"].get(g)
            cells += [pct(v and v["wg"]), pct(v and v["avg"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(records: list[dict], path: str, id_set: str | None = None) -> str:
    """Write ``markdown_table`` of ``records`` to ``path`` (under a temporary name first); returns it."""
    table = markdown_table(records, id_set)
    write_text(path, table)
    return table


REPORT_TARGETS = ("tensorboard", "wandb")


class ScalarReporter:
    """Scalars to tensorboard and/or wandb, as OpenCLIP's ``--report-to`` names them (``tensorboard``,
    ``wandb``, a comma list, or ``all``): the one writer of ``eval``, ``wise``, ``sweep`` and ``--starft-val``.

    Args:
        report_to: the ``--report-to`` value ("" or None: report nothing).
        tensorboard_dir: the folder of the event files (created on the first scalar).
        wandb_init: keyword arguments of ``wandb.init`` when this process starts the wandb run (None: log to
            the run already started, as training does).
    """

    def __init__(self, report_to: str | None, tensorboard_dir: str | None = None, wandb_init: dict | None = None,
                 filename_suffix: str = ""):
        targets = {t.strip() for t in (report_to or "").split(",") if t.strip()}
        targets = set(REPORT_TARGETS) if "all" in targets else targets
        unknown = targets - set(REPORT_TARGETS)
        if unknown:
            raise StarftError(f"--report-to {report_to!r}: use tensorboard, wandb, both comma-separated, or all")
        self.tensorboard_dir = tensorboard_dir if "tensorboard" in targets else None
        self.wandb = None
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise StarftError("--report-to wandb needs wandb: pip install wandb") from None
            self.wandb = wandb
            if wandb_init is not None:
                wandb.init(**wandb_init)
        self.filename_suffix, self._writer = filename_suffix, None

    def log(self, scalars: dict, step: int, extra: dict | None = None) -> None:
        """``scalars`` {name: value} at ``step``; ``extra`` goes to wandb only (e.g. the epoch)."""
        if self.tensorboard_dir is not None:
            if self._writer is None:
                try:
                    from torch.utils import tensorboard
                except ImportError:
                    raise StarftError("--report-to tensorboard needs tensorboard: pip install tensorboard") from None
                self._writer = tensorboard.SummaryWriter(self.tensorboard_dir, filename_suffix=self.filename_suffix)
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self.wandb is not None:
            self.wandb.log({**scalars, **(extra or {})}, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def record_scalars(record: dict, prefix: str, metrics=("top1", "top5", "worst_group", "avg_group", "per_class_mean", "ece")) -> dict:
    """``{PREFIX/SET/METRIC: value}`` of one eval record (metrics without a value left out)."""
    return {f"{prefix}/{record['dataset']}/{m}": record[m] for m in metrics if record.get(m) is not None}


CLIP_BENCHMARK_TASK = "zeroshot_classification"


def clip_benchmark_result(record: dict, model: str, pretrained: str) -> dict:
    """One eval record as CLIP_benchmark's result JSON (what its ``clip_benchmark build`` aggregates):
    ``dataset``, ``model``, ``pretrained``, ``task``, ``language`` and ``metrics`` with its ``acc1``, ``acc5``
    (None with fewer than 5 classes: CLIP_benchmark writes a NaN there, which strict JSON parsers reject) and ``mean_per_class_recall`` (balanced
    accuracy over the classes present), plus our ``worst_group_acc``, ``avg_group_acc``, ``ece`` and ``n``."""
    return {
        "dataset": record["dataset"], "model": model, "pretrained": pretrained, "task": CLIP_BENCHMARK_TASK,
        "language": "en",
        "metrics": {"acc1": record["top1"], "acc5": record["top5"],
                    "mean_per_class_recall": record["per_class_mean"], "worst_group_acc": record["worst_group"],
                    "avg_group_acc": record["avg_group"], "ece": record["ece"], "n": record["n"]},
    }


def clip_benchmark_model(model: str | None) -> str:
    """The ``model`` of a CLIP_benchmark result: the architecture's name (a ``local-dir:`` folder's base name)."""
    return os.path.basename(str(model or "model").rstrip("/"))


def clip_benchmark_file(dataset: str, pretrained: str, model: str) -> str:
    """The file name CLIP_benchmark gives a result: ``{dataset}_{pretrained}_{model}_{language}_{task}.json``,
    each part with characters other than letters, digits, ``-``, ``_`` and ``.`` written as ``_``."""
    return "_".join(_safe(part) for part in (dataset, pretrained, model, "en", CLIP_BENCHMARK_TASK)) + ".json"


def check_clip_benchmark_files(results: list[tuple[str, str, str]]) -> None:
    """Refuse (one line, naming both) two results ``(dataset, checkpoint label, model)`` that CLIP_benchmark's
    naming maps to one file (``val x`` and ``val_x``): the second would overwrite the first."""
    seen: dict[str, tuple[str, str, str]] = {}
    for dataset, label, model in results:
        name = clip_benchmark_file(dataset, label, clip_benchmark_model(model))
        if name in seen and seen[name] != (dataset, label, model):
            other = seen[name]
            raise StarftError(f"--results-format clip_benchmark: set {other[0]!r} × checkpoint {other[1]!r} and set "
                              f"{dataset!r} × checkpoint {label!r} would both be written to {name}: rename a set (NAME=ROOT) "
                              "or a checkpoint (LABEL=FILE) so that they differ in letters, digits, '-', '_' or '.'")
        seen[name] = (dataset, label, model)


def write_clip_benchmark(records: list[dict], out_dir: str) -> list[str]:
    """One CLIP_benchmark result file per record (checkpoint × set) in ``out_dir``, named as CLIP_benchmark
    names them (``clip_benchmark_file``); ``model`` is the record's architecture and ``pretrained`` its
    checkpoint label. Names that collide are refused before anything is written. Returns the paths."""
    check_clip_benchmark_files([(r["dataset"], r["checkpoint"], r["settings"].get("model")) for r in records])
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for r in records:
        result = clip_benchmark_result(r, clip_benchmark_model(r["settings"].get("model")), r["checkpoint"])
        paths.append(os.path.join(out_dir, clip_benchmark_file(r["dataset"], r["checkpoint"], result["model"])))
        write_json(paths[-1], result, indent=None)
    return paths


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise StarftError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: str, dpi: int) -> None:
    """A matplotlib figure as a PNG at ``path``, atomically."""
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=dpi, format="png")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plot_groups(records: list[dict], out_dir: str) -> list[str]:
    """One PNG per set with more than one group: per-group accuracy bars, one bar per checkpoint,
    worst group marked in the legend. Returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in dict.fromkeys(r["dataset"] for r in records):
        if not is_group_set(records, name):
            continue
        rs = [r for r in records if r["dataset"] == name]
        groups = list(dict.fromkeys(g for r in rs for g in r["groups"]))
        width = 0.8 / len(rs)
        fig, ax = plt.subplots(figsize=(min(14.0, max(5.0, 0.6 * len(groups) * max(1, len(rs)) ** 0.5 + 2)), 3.8))
        for i, r in enumerate(rs):
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(groups))]
            ax.bar(xs, [100 * r["groups"].get(g, float("nan")) for g in groups], width,
                   label=f"{r['checkpoint']} (WG {100 * r['worst_group']:.1f})")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30 if max(map(len, groups)) > 8 else 0, ha="right" if max(map(len, groups)) > 8 else "center")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{name}: accuracy per group")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{_safe(name)}_groups.png")
        save_png(fig, path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_wise(points: list[dict], path: str, x_label: str, y_label: str) -> str:
    """The WiSE-FT curve: one point per α (``x``, ``y``), labelled with α; α = 0 and 1 marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys = [100 * p["x"] for p in points], [100 * p["y"] for p in points]
    ax.plot(xs, ys, "-o", color="tab:blue", markersize=4, label="WiSE-FT θ(α)")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for p, x, y in zip(points, xs, ys):
        if p["alpha"] == 0:
            ax.plot([x], [y], "*", color="tab:green", markersize=12, label="zero-shot (α=0)")
        elif p["alpha"] == 1:
            ax.plot([x], [y], "s", color="tab:red", markersize=8, label="fine-tuned (α=1)")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(fig, path, dpi=120)
    plt.close(fig)
    return path
