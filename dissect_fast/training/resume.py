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

:func:`resume_changes` makes that comparison (:func:`find_resume` calls it with the checkpoint a run resumes from, or
with RUN/config.json when the run has no checkpoint yet); ``run_folder.write_run_start`` appends its result to
``RUN/resumes.jsonl`` (``config.json`` itself is never rewritten).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from dissect_fast.config import TrainConfig, _flags, _sections

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


@dataclasses.dataclass
class ResumeChanges:
    """What a resume changed against the config it continues (``flag -> [old, new]``)."""

    source: str  #: the checkpoint (or RUN/config.json) compared with
    allowed: dict[str, list] = dataclasses.field(default_factory=dict)  #: fields in RESUME_MAY_CHANGE
    overrides: dict[str, list] = dataclasses.field(default_factory=dict)  #: others, applied by --resume-override

    def record(self) -> dict:
        """The part of a RUN/resumes.jsonl line that names the changes."""
        return {"allowed": self.allowed, "overrides": self.overrides}


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


@dataclasses.dataclass
class ResumePoint:
    """What this start of a run continues: the checkpoint (path and state; None: a fresh start) and the record
    of what it resumed and changed (a line of RUN/resumes.jsonl; None: a fresh run)."""

    path: str | None = None
    state: dict | None = None
    record: dict | None = None


def find_resume(cfg: TrainConfig, checkpointer, run_dir: str, model_name: str, num_ids: int) -> ResumePoint:
    """The checkpoint this run resumes from (``Checkpointer.load_resume``), checked against this run before any
    model is built: the same model, id range and config (:func:`resume_changes`: flags that change the training
    are refused unless --resume-override). A resume with no checkpoint yet is checked against RUN/config.json."""
    from dissect_fast.training.checkpoint import check_model_name
    from dissect_fast.training.distributed import elastic_restart_count

    restarted = elastic_restart_count() > 0
    found = checkpointer.load_resume(cfg.run.resume, restarted)
    if found is None:
        config_json = os.path.join(run_dir, "config.json")
        if (cfg.run.resume is None and not restarted) or not os.path.isfile(config_json):
            return ResumePoint()
        with open(config_json) as f:
            changes = resume_changes(json.load(f), cfg, config_json)
        return ResumePoint(record={"resumed_from": None, **changes.record()})
    path, state = found
    check_model_name(state, model_name, f"--resume {path}")
    h = (state.get("strategy") or {}).get("history")
    if h is not None and h["values"].numel() != num_ids:
        raise ValueError(
            f"--resume {path}: its history buffer has {h['values'].numel()} entries but --train-data has an id "
            f"range of {num_ids}: resume with the training data the checkpoint was trained on"
        )
    if isinstance(state.get("config"), dict):
        record = {"resumed_from": path, **resume_changes(state["config"], cfg, path).record()}
    else:  # an open_clip checkpoint, say: nothing to compare with
        record = {"resumed_from": path, "note": "the checkpoint holds no config: the flags given apply"}
    record.update(epoch=state.get("epoch"), step=state.get("step"))
    return ResumePoint(path, state, record)
