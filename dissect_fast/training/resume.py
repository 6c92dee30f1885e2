"""What ``--resume`` keeps and what it may change: a resumed run is the run its checkpoint describes.

The checkpoint holds the resolved config (``config``, a dict); ``RUN/config.json`` holds the one the run first
started with. On ``--resume`` (:func:`fill_resume_values`, called while the flags are parsed):

* a flag NOT given on the command line takes the checkpoint's value, not the parser's default: ``--resume latest
  --epochs 5`` of a ``dissect-warmup`` run keeps its selection, rate, warm-up, validation data, zero-shot sets and
  LR schedule;
* a flag given with the checkpoint's value changes nothing;
* a flag given with another value is either in :data:`RESUME_MAY_CHANGE` (it changes how the run is executed,
  logged, evaluated or how long it lasts, not what each step trains on: allowed and recorded) or it changes the
  training itself, and is refused, with one line naming every such flag (old -> new), unless
  ``--resume-override`` is given (then it is applied and recorded as an override).

:func:`resume_changes` makes that comparison (the Trainer calls it with the checkpoint it resumes from, or with
RUN/config.json when the run has no checkpoint yet); ``run_folder.write_run_start`` appends its result to
``RUN/resumes.jsonl`` (``config.json`` itself is never rewritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from dissect_fast.config import ConfigError, TrainConfig, _dest, _flags, _sections, build_parser

#: Config fields (``section.field``) a resume may change without ``--resume-override``: epochs (extend or
#: shorten the run), where the run folder is, loader workers and the bad-data policy, the device and compilation,
#: the selection op's backend (same result, other kernel), the multi-GPU sync check and timeout, logging, progress,
#: reporting, profiling, checkpoint policy, validation and zero-shot data and frequency. Every other field (model,
#: model config, pretrained weights, precision, scoring options, training data, subset, batch size, data backend,
#: LR, schedule, warm-up, weight decay, betas, eps, clipping, accumulation, strategy, rate, warm-up point, momentum,
#: history dtype, seed, loss options, fields added later) changes what is trained: refused unless
#: --resume-override.
RESUME_MAY_CHANGE: frozenset[str] = frozenset(
    {
        "optim.epochs",
        "data.val_data",
        "data.workers",
        "data.max_bad_fraction",
        "data.imagenet_val",
        "data.imagenet_v2",
        "data.zeroshot_data",
        "data.zeroshot_classnames",
        "model.device",
        "model.compile",
        "model.score_cudagraphs",
        "select.backend",
        "dist.check_sync_every",
        "dist.dist_timeout",
        "run.logs",
        "run.name",
        "run.resume",
        "run.resume_override",
        "run.log_every_n_steps",
        "run.val_every",
        "run.zeroshot_frequency",
        "run.record",
        "run.plots",
        "run.tensorboard",
        "run.report_to",
        "run.wandb_project_name",
        "run.wandb_notes",
        "run.save_frequency",
        "run.save_most_recent",
        "run.delete_previous_checkpoint",
        "run.progress",
        "run.max_nonfinite_steps",
        "run.profile_steps",
    }
)

#: fields that differ on every resume by construction: not worth a line in the record
_NOT_RECORDED = frozenset({"run.resume", "run.resume_override"})
#: options never taken from the checkpoint: where the run is found (the command line's --logs/--name, even when the
#: run folder was moved), the resume itself, and --resume-override (an override holds for the start that gives it)
_NEVER_FILLED = frozenset({"run.logs", "run.name", "run.resume", "run.resume_override"})


def given_dests(argv: list[str]) -> set[str]:
    """The argparse destinations given on the command line ``argv`` (parsed again with every default
    suppressed, so a flag given with its default value counts as given)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    known, _ = parser.parse_known_args(argv)
    return set(vars(known))


def resume_source(resume: str | None, logs: str, name: str | None) -> tuple[str, dict] | None:
    """(where, resolved config dict) that ``--resume`` continues: the checkpoint's ``config`` (the one the Trainer
    will resume from: ``latest`` = the run's newest intact checkpoint, kept loaded for it), else, for ``latest`` in
    a run that has no checkpoint yet, its RUN/config.json. None: nothing to continue (no --resume, no --name to
    find the run by, a missing file, a checkpoint without a config such as open_clip's)."""
    from dissect_fast.training import checkpoint as ckpt_io

    if resume is None:
        return None
    if resume == "latest":
        if name is None:
            return None
        run_dir = os.path.join(logs, name)
        found = ckpt_io.find_resumable(
            os.path.join(run_dir, "checkpoints"), keep=True, report=False
        )  # the Trainer logs
        if found is None:
            path = os.path.join(run_dir, "config.json")
            return (path, _read_json(path)) if os.path.isfile(path) else None
        path, state = found
    else:
        if not os.path.isfile(resume):
            return None  # RunConfig says so, naming --resume
        path, state = resume, ckpt_io.load_checkpoint(resume, keep=True)
    cfg = state.get("config")
    return (path, cfg) if isinstance(cfg, dict) else None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume latest: {path} cannot be read ({e}): restore it, or start a new --name") from e


def fill_resume_values(values: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """The parsed options ``values`` with every option not given in ``argv`` set to the resumed run's value (see
    the module's docstring); ``values`` unchanged without --resume or without a config to resume."""
    from dissect_fast.training.checkpoint import CheckpointError
    from dissect_fast.training.distributed import elastic_restart_count

    if values.get("resume_override") and values.get("resume") is None:
        raise ConfigError("--resume-override applies to a resumed run: add --resume latest (or a checkpoint path)")
    if elastic_restart_count() > 0 and values.get("resume") is None:
        return values  # a torchelastic restart runs the first attempt's command line again: nothing to fill
    try:
        found = resume_source(values.get("resume"), values["logs"], values.get("name"))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if found is None:
        return values
    old = found[1]
    given = given_dests(argv)
    out = dict(values)
    for section_name, section in _sections().items():
        old_section = old.get(section_name) or {}
        for f in dataclasses.fields(section):
            dest = _dest(f)
            if dest in given or f.name not in old_section or f"{section_name}.{f.name}" in _NEVER_FILLED:
                continue
            value = old_section[f.name]
            out[dest] = (not value) if f.metadata["negate"] else value
    # the reference's --select switch and --select-strategy: the checkpoint's strategy unless either is given
    if "select" in given and "select_strategy" not in given:
        out["select_strategy"] = values["select_strategy"]  # --select alone: dissect-warmup, as on a first start
    # --no-tensorboard is derived from --report-to in the config: a --report-to given now decides alone
    if "report_to" in given and "no_tensorboard" not in given:
        out["no_tensorboard"] = values["no_tensorboard"]
    return out


@dataclasses.dataclass
class ResumeChanges:
    """What a resume changed against the config it continues (``flag -> [old, new]``)."""

    source: str  #: the checkpoint (or RUN/config.json) compared with
    allowed: dict[str, list] = dataclasses.field(default_factory=dict)  #: fields in RESUME_MAY_CHANGE
    overrides: dict[str, list] = dataclasses.field(default_factory=dict)  #: others, applied by --resume-override


def resume_changes(old: dict, cfg: TrainConfig, source: str) -> ResumeChanges:
    """Compare the resumed run's config ``cfg`` with the ``old`` one (a checkpoint's ``config`` or config.json).
    ValueError naming every flag that changes the training (old -> new) unless cfg.run.resume_override."""
    new = cfg.to_dict()
    out = ResumeChanges(source)
    for section_name, section in _sections().items():
        old_section = old.get(section_name) or {}
        for f in dataclasses.fields(section):
            key = f"{section_name}.{f.name}"
            if f.name not in old_section or key in _NOT_RECORDED:
                continue  # a field the old config did not have yet: nothing to compare
            a, b = old_section[f.name], new[section_name][f.name]
            if _same(a, b):
                continue
            (out.allowed if key in RESUME_MAY_CHANGE else out.overrides)[_flags(f)[0]] = [a, b]
    if out.overrides and not cfg.run.resume_override:
        diffs = ", ".join(f"{flag} {_show(a)} -> {_show(b)}" for flag, (a, b) in out.overrides.items())
        raise ValueError(
            f"--resume {cfg.run.resume}: these flags change what {source} was trained with: {diffs}; leave them out "
            f"to continue the run as it was, or add --resume-override to train on with the new values"
        )
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal values; two spellings of one existing file or folder (``data/train`` and ``./data/train/``) too."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b):  # NaN == NaN here
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return False


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)
