"""``python -m open_clip_starft.main``: StarFT fine-tuning through OpenCLIP's own ``main``.

The StarFT flags (``--starft-*``) are split off here; everything else goes to
``open_clip_train``'s parser and keeps its upstream meaning. Run it as upstream's module::

    torchrun --nproc-per-node 8 -m open_clip_starft.main --starft-lambda 0.5 \\
        --train-data '/data/imagenet/train-{0000..1023}.tar' --dataset-type webdataset \\
        --model ViT-B-16 --pretrained /path/to/weights.pt ...
"""
from __future__ import annotations

import errno
import logging
import sys

from open_clip_train.params import parse_args as host_parse_args

from open_clip_starft.errors import ConfigError, StarftError
from open_clip_starft.host.params import build_parser, check
from open_clip_starft.host.preemption import FLAG, Preempted

# Both parsers (ours and upstream's ``open_clip_train.params``) and the StarFT checks import neither torch nor
# open_clip, so a refused flag answers at once; the preflight, the hooks (upstream's ``main``) and
# ``--starft-val``'s evaluation are imported once the command line has been read.


# an OSError from upstream's own writes that is about the disk or folder, not a bug: reported in one line
STORAGE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def quiet_torch_loggers() -> None:
    """Upstream's setup_logging sets every logger to INFO, so torch's compile statistics would be
    dumped at exit; put torch's own loggers back to WARNING."""
    for name in list(logging.root.manager.loggerDict):
        if name == "torch" or name.startswith("torch."):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nopen_clip_train options (upstream):")
        host_parse_args(["--help"])  # prints upstream's help and exits
    starft, rest = parser.parse_known_args(argv)
    try:
        check(starft)
        host_parse_args(rest)  # upstream's flags, refused here in one line before anything is imported or started
        from open_clip_starft.eval.training_validation import TrainingValidation, parse_select, parse_val_sets
        from open_clip_starft.host.hooks import StarftHooks
        from open_clip_starft.host.preflight import RunFolderGuard, finished, preflight
        validation = None
        if starft.starft_val:  # the sets are checked when the model exists, before the first step
            names = [name for name, _ in parse_val_sets(starft.starft_val)]
            parse_select(starft.starft_select, names)
            validation = TrainingValidation
        elif starft.starft_select:
            raise ConfigError(f"--starft-select {starft.starft_select} needs --starft-val NAME=ROOT: the set it names")
        args = preflight(starft, rest)  # nothing is written before every flag that can be checked is
        done = finished(args)
        if done:
            print(f"open-clip-starft: {done}", file=sys.stderr)
            return 0
        FLAG.install()
        with StarftHooks(starft, validation=validation) as hooks, RunFolderGuard(args, hooks) as guard:
            status = hooks.main(rest)
            if status == -1:
                guard.refused()
    except StarftError as e:
        print(f"open-clip-starft: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk or the folder refused a write upstream made (e.g. a read-only --logs)
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"open-clip-starft: error: cannot write {e.filename or 'a file'}: {e.strerror}: choose a --logs "
              "folder you can write to, with free space", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"open-clip-starft: stopped by a signal; saved {stop}; continue with --resume latest", file=sys.stderr)
        return 0
    finally:
        FLAG.uninstall()
        quiet_torch_loggers()
    if status == -1:  # upstream returns -1 (no exception) when it refuses to start, e.g. the run name exists
        print("open-clip-starft: error: OpenCLIP refused to start the run (see above): pass a new --name, "
              "or --resume latest to continue it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
