"""Every ```bash block of README.md and of the pages under docs/ runs, as typed, at toy size.

The command blocks take their paths and sizes from shell variables that one README block, marked
``<!-- readme-test: variables -->``, shows with the real values. Here that block is replaced by
:data:`TOY` (pixparse-style shards written with webdataset, a small CSV of JPEGs that the README's first
block turns into ``$DATA``, tmp paths, two CPU processes, ``micro-rn``). Every other bash block runs exactly as
written with
``bash -c 'set -euo pipefail; BLOCK'``, ``HF_HUB_OFFLINE=1`` and the toy variables exported, in a fresh
shell whose PATH does not hold ``.venv/bin``: the README's set-up block activates the environment
(``. .venv/bin/activate``) and every later block starts with that same activation, as a reader's shell
would have it. Blocks that name the torchrun script ``dissect_fast/train.py``, run a benchmark module
(``python -m benchmarks.NAME``) or hold the activation run from the repository root (the block says so); all
others from a temporary working directory.

Blocks run page by page (:data:`PAGE_ORDER`: the README first, then the docs in the order a reader follows
their links, then any other page), each page top to bottom, sharing one toy environment (so run names must not
collide, and a later block may use what an earlier one wrote, e.g. the README's checkpoint). A block
that cannot run here carries ``<!-- readme-test: skip (REASON) -->`` right before it; the skipped
blocks are listed, counted and must each give a reason.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: trains, or runs commands in subprocesses

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: pages whose blocks build on each other run in this order; any other page under docs/ follows, by name
PAGE_ORDER = (
    "README.md",
    "docs/data.md",
    "docs/training.md",
    "docs/checkpoints.md",
    "docs/multi-gpu.md",
    "docs/reliability.md",
    "docs/offline-selection.md",
    "docs/clipcov-notebook.md",  # uses the embeddings and class names docs/offline-selection.md writes
    "docs/speed.md",
    "docs/findings.md",
)
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->$")
SKIP = re.compile(r"^skip\s*\((.+)\)$")
TORCHRUN_SCRIPT = "dissect_fast/train.py"
BENCH_MODULE = re.compile(r"python -m benchmarks\.([A-Za-z_]+)")  #: a benchmark module, run from the repository root
ACTIVATE = ". .venv/bin/activate"  #: the README's activation of the environment, run from the repository root
VENV_ACTIVATE = ROOT / ".venv" / "bin" / "activate"
MAX_SKIPPED = 3  #: the set-up block (make demo / make test), the SLURM script and the GPU check
BLOCK_TIMEOUT_S = 300

#: The toy values of the README's variables block; "{root}" is the shared toy environment's folder.
TOY = {
    "DATA": "{root}/data",
    "WDS": "{root}/cc3m-wds",
    "WDS_TRAIN": "{root}/cc3m-wds/cc3m-train-{{0000..0003}}.tar",
    "WDS_VAL": "{root}/cc3m-wds/cc3m-validation-*.tar",
    "CSV": "{root}/csv/train.tsv",
    "IMAGES": "{root}/csv/images",
    "LOGS": "{root}/logs",
    "G": "2",
    "MODEL": "micro-rn",
    "BATCH": "16",
    "EPOCHS": "2",
    "WARMUP_POINT": "1",
    "LR_WARMUP": "10",
    "WORKERS": "0",
    "NUM_SAMPLES": "96",
}
#: rows of the toy CSV: the README's `dissect-fast shards ... --val-fraction 0.05 --world-size 2 --workers 0` makes 4
#: training shards of it (2 for each of 2 ranks) and a validation split of 7 pairs
TOY_CSV_ROWS = 136


@dataclass(frozen=True)
class Block:
    index: int  #: position among all covered pages' bash blocks, in running order
    page: str  #: the page, relative to the repository root
    line: int  #: 1-based line of the opening fence
    text: str
    marker: str | None  #: the readme-test directive right before the block, if any

    @property
    def first_line(self) -> str:
        """The first command of the block (comments skipped), for ids and messages."""
        lines = [ln.strip() for ln in self.text.splitlines() if ln.strip()]
        return next((ln for ln in lines if not ln.startswith("#")), lines[0] if lines else "")

    @property
    def skip_reason(self) -> str | None:
        m = SKIP.match(self.marker or "")
        return m.group(1).strip() if m else None

    @property
    def id(self) -> str:
        words = re.sub(r"[^A-Za-z0-9_.$/ -]", "", self.first_line)[:48].strip()
        return f"{self.index:02d}-{Path(self.page).stem}-L{self.line}-{words}"

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[str]:
    """README.md and every page under docs/, in running order."""
    found = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
    return sorted(found, key=lambda p: (PAGE_ORDER.index(p) if p in PAGE_ORDER else len(PAGE_ORDER), p))


def fences(text: str, page: str = "README.md") -> list[tuple[int, str, str, str | None]]:
    """(opening line, info string, body, marker) of every fenced code block of a markdown text."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, info = i, m.group(1).strip()
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"{page}:{start + 1}: code fence never closed"
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mk = MARKER.match(lines[k].strip()) if k >= 0 else None
        out.append((start + 1, info, "\n".join(lines[start + 1 : j]) + "\n", mk.group(1) if mk else None))
        i = j + 1
    return out


def doc_blocks() -> list[Block]:
    """The bash blocks of every page, in running order."""
    bash = [(page, *f) for page in pages() for f in fences((ROOT / page).read_text(), page) if f[1] == "bash"]
    return [Block(n, page, line, body, marker) for n, (page, line, _, body, marker) in enumerate(bash)]


BLOCKS = doc_blocks()
VARIABLE_BLOCKS = [b for b in BLOCKS if b.marker == "variables"]
RUNNABLE = [b for b in BLOCKS if b.marker is None]
ACTIVATION_BLOCKS = [b for b in RUNNABLE if any(ln.strip() == ACTIVATE for ln in b.text.splitlines())]


def test_first_commands_activate_the_environment():
    """The README's first runnable block activates .venv (from the repository root), so that `dissect-fast` and
    `python -m dissect_fast...` in every later block work in a fresh shell as typed."""
    assert ACTIVATION_BLOCKS, (
        f"no README block runs `{ACTIVATE}`: after `make install` a fresh shell has no dissect-fast"
    )
    first = ACTIVATION_BLOCKS[0]
    assert first is RUNNABLE[0], f"{first.where}: activate the environment before any other command"
    assert first.page == "README.md", f"{first.where}: the README must activate the environment first"
    assert "repository root" in first.text, f"{first.where}: say `from the repository root` in the block"


# ----------------------------------------------------------------------------- the pages' structure
def test_markers_are_known_and_fences_are_labelled():
    """Only `variables` and `skip (REASON)` markers, each right before a bash block; no unlabelled or
    sh/shell/console fences (a command in one of those would escape this test: output goes in ```text)."""
    for page in pages():
        text = (ROOT / page).read_text()
        for line, info, _, marker in fences(text, page):
            assert info, f"{page}:{line}: unlabelled code fence (use ```bash for commands, ```text for output)"
            assert info not in ("sh", "shell", "console", "zsh"), f"{page}:{line}: ```{info}: use ```bash"
            if marker is not None:
                assert info == "bash", f"{page}:{line}: readme-test marker before a ```{info} block"
                assert marker == "variables" or SKIP.match(marker), f"{page}:{line}: unknown marker {marker!r}"
        n_markers = sum(1 for ln in text.splitlines() if MARKER.match(ln.strip()))
        n_blocks = sum(1 for b in BLOCKS if b.marker and b.page == page)
        assert n_markers == n_blocks, f"{page}: a readme-test marker that is not right before a block"


def test_skipped_blocks_are_few_and_explained():
    skipped = [b for b in BLOCKS if b.marker and b.marker != "variables"]
    listing = "\n".join(f"  {b.where} {b.first_line!r}: {b.skip_reason}" for b in skipped)
    print(f"{len(skipped)} of {len(BLOCKS)} bash blocks skipped:\n{listing}")
    assert all(b.skip_reason for b in skipped), f"a skip marker without a reason:\n{listing}"
    assert len(skipped) <= MAX_SKIPPED, f"too many skipped blocks ({len(skipped)} > {MAX_SKIPPED}):\n{listing}"
    for b in BLOCKS:  # `make demo` / `make test` would recurse or take minutes
        if re.search(r"^\s*make\s+(demo|test)\b", b.text, re.M):
            assert b.skip_reason, f"{b.where}: a `make demo`/`make test` block must be marked skip"


def test_variables_block_is_assignments_of_the_toy_variables():
    assert len(VARIABLE_BLOCKS) == 1, "exactly one block must be marked <!-- readme-test: variables -->"
    assert VARIABLE_BLOCKS[0].page == "README.md", f"{VARIABLE_BLOCKS[0].where}: the variables block is the README's"
    names = []
    for ln in VARIABLE_BLOCKS[0].text.splitlines():
        code = ln.split("#", 1)[0].strip() if not ln.lstrip().startswith("#") else ""
        if code:
            m = re.match(r"^([A-Z_][A-Z0-9_]*)=\S", code)
            assert m, f"the variables block holds a line that is not a plain assignment: {ln!r}"
            names.append(m.group(1))
    assert sorted(names) == sorted(TOY), f"README variables {sorted(names)} != the toy set {sorted(TOY)}"
    later = [b.index for b in RUNNABLE if b not in ACTIVATION_BLOCKS]  # the activation uses no variables
    assert VARIABLE_BLOCKS[0].index < min(later), "the variables block must come before the commands that use them"
    used = set()
    for b in RUNNABLE:
        used |= set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", b.text))
    assert used <= set(TOY) | {"SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_ID"}, (
        f"blocks use variables the variables block does not set: {sorted(used - set(TOY))}"
    )


def test_root_blocks_say_repository_root():
    """Blocks that run from the repository root (the torchrun script's path, benchmark modules) say so."""
    for b in BLOCKS:
        if (TORCHRUN_SCRIPT in b.text or BENCH_MODULE.search(b.text)) and not b.skip_reason:
            assert "repository root" in b.text, f"{b.where}: say `from the repository root` in the block"
        if TORCHRUN_SCRIPT in b.text and not b.skip_reason:
            assert not re.search(r"\s--logs\s", b.text), (
                f"{b.where}: torchrun rejects --logs after the script; use --logs-dir"
            )


def test_bench_blocks_name_existing_benchmarks():
    for b in BLOCKS:
        for name in BENCH_MODULE.findall(b.text):
            assert (ROOT / "benchmarks" / f"{name}.py").is_file(), f"{b.where}: runs a missing benchmark {name!r}"


# ----------------------------------------------------------------------------- the toy environment
def _write_pixparse_shards(directory: Path) -> None:
    """Shards like Hugging Face pixparse/cc3m-wds, written with webdataset: jpg + txt, no id, 9-digit keys."""
    import numpy as np
    import webdataset as wds
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40)}
    key = 0

    def shard(name: str, n: int) -> None:
        nonlocal key
        with wds.TarWriter(str(directory / name)) as w:
            for _ in range(n):
                colour = list(colours)[rng.integers(len(colours))]
                im = Image.new("RGB", (48, 36), (int(rng.integers(60, 200)),) * 3)
                x, y = int(rng.integers(0, 24)), int(rng.integers(0, 12))
                ImageDraw.Draw(im).ellipse((x, y, x + 20, y + 20), fill=colours[colour])
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=90)
                w.write({"__key__": f"{key:09d}", "jpg": buf.getvalue(), "txt": f"a {colour} circle on grey"})
                key += 1

    for i in range(4):
        shard(f"cc3m-train-{i:04d}.tar", 24)
    shard("cc3m-validation-0000.tar", 16)


def _write_csv(directory: Path, n: int = TOY_CSV_ROWS) -> None:
    """An open_clip CSV (tab separated, columns filepath and title) over a folder of JPEGs: a coloured disc on a
    grey ground, captioned with its colour and side."""
    from PIL import Image, ImageDraw

    images = directory / "images"
    images.mkdir(parents=True)
    colours = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40)}
    rows = ["filepath\ttitle"]
    for i in range(n):
        colour, side = list(colours)[i % 4], ("left", "right")[i // 4 % 2]
        im = Image.new("RGB", (40, 30), ((i * 37) % 120 + 60,) * 3)
        x = 2 if side == "left" else 20
        ImageDraw.Draw(im).ellipse((x, 6, x + 16, 22), fill=colours[colour])
        im.save(images / f"{i:05d}.jpg", quality=90)
        rows.append(f"{i:05d}.jpg\ta {colour} disc on the {side}, picture {i}")
    (directory / "train.tsv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    """The toy data every block shares, the environment blocks run in, and a working directory. `$DATA` is not
    made here: the README's first block writes it from the CSV."""
    root = tmp_path_factory.mktemp("readme")
    values = {k: v.format(root=root) for k, v in TOY.items()}
    _write_pixparse_shards(Path(values["WDS"]))
    _write_csv(Path(values["CSV"]).parent)
    work = root / "work"
    work.mkdir()
    venv_bin = ROOT / ".venv" / "bin"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TORCHELASTIC_", "DISSECT_FAST_TEST_", "PET_"))
        and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        and k != "VIRTUAL_ENV"
    }
    env.update(values)
    # a fresh shell: no .venv/bin on PATH, the README's activation puts it there
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != venv_bin.resolve()]
    if not VENV_ACTIVATE.is_file():  # an install without .venv (e.g. a bare GPU machine): this interpreter's bin
        path.insert(0, str(Path(sys.executable).parent))
    env["PATH"] = os.pathsep.join(path)
    env["HF_HUB_OFFLINE"] = "1"
    # one intra-op thread per process, as torchrun sets for its workers: at toy size on a shared 2-core CPU,
    # torch's default thread pool spins against the other processes and makes a run several times slower
    env.setdefault("OMP_NUM_THREADS", "1")
    return {"env": env, "work": work, "values": values}


# ----------------------------------------------------------------------------- running the blocks
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block_runs(block: Block, toy_env):
    activates = block in ACTIVATION_BLOCKS
    cwd = ROOT if TORCHRUN_SCRIPT in block.text or BENCH_MODULE.search(block.text) or activates else toy_env["work"]
    root_logs_before = (ROOT / "logs").exists()
    prefix = ""
    if VENV_ACTIVATE.is_file():  # the shell of a reader who ran the README's activation first
        if ACTIVATION_BLOCKS and block.index > ACTIVATION_BLOCKS[0].index:
            prefix = f". {VENV_ACTIVATE}\n"
    elif activates:
        pytest.skip("no .venv here (an install without make install): nothing to activate")
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + prefix + block.text],
            cwd=cwd,
            env=toy_env["env"],
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"{block.where} ({block.first_line!r}) ran past {BLOCK_TIMEOUT_S} s; "
            f"output tail:\n{(e.stdout or b'')[-3000:]!r}"
        )
    elapsed = time.monotonic() - t0
    print(f"{block.where} {block.first_line!r}: exit {r.returncode} in {elapsed:.1f} s (cwd {cwd})")
    if r.returncode != 0:
        out = (r.stdout + r.stderr)[-4000:]
        pytest.fail(f"{block.where} exited {r.returncode} ({block.first_line!r}), cwd {cwd}:\n{out}")
    if cwd == ROOT:
        assert root_logs_before or not (ROOT / "logs").exists(), "a block wrote logs/ into the repository root"


def test_blocks_left_their_run_folders(toy_env, request):
    """After the blocks ran: every `--name` a block trains has its folder with metrics, and `--record` runs their
    per-epoch selection records (the README's output-files promises, at toy size)."""
    ran = [i for i in request.session.items if i.originalname == "test_readme_block_runs"]
    failed = getattr(request.session, "testsfailed", 0)
    if len(ran) != len(RUNNABLE) or failed:
        pytest.skip("needs every README block to have run and passed in this session")
    logs = Path(toy_env["values"]["LOGS"])
    for b in RUNNABLE:
        for cmd in re.split(r"\n(?=\S)", b.text):  # one command with its continuation lines
            m = re.search(r"--name\s+(\S+)", cmd)
            if not m or cmd.lstrip().startswith("#"):
                continue
            run = logs / m.group(1)
            assert (run / "metrics.jsonl").is_file(), f"{b.where}: no {run}/metrics.jsonl"
            assert (run / "checkpoints" / "latest.pt").is_file(), f"{b.where}: no checkpoint in {run}"
            if "--record" in cmd:
                assert sorted(p.name for p in (run / "select_record").glob("record_*.npz")), (
                    f"{b.where}: --record wrote no select_record/record_N.npz in {run}"
                )
