"""Bad inputs across loaders, data, CLI flags, generation arguments and trees: one clear line each.

`CASES` is the table of what was tried. Each case must fail with a `MedusaError` (a CLI: exit status != 0 and
exactly one `error: ...` line on stderr, no traceback) whose message matches the case's pattern, and leave no
output behind where it names one. The README's "Bad inputs" table is generated from these cases:

    PYTHONPATH=. python -m tests.test_bad_inputs            # print the markdown table
    PYTHONPATH=. python -m tests.test_bad_inputs --readme   # rewrite README.md's "## Bad inputs" section

and `test_readme_table_is_current` fails when the README and the cases drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import medusa_jax  # noqa: E402
from medusa_jax import HeadsConfig, MedusaError, model  # noqa: E402
from medusa_jax.errors import cli_errors  # noqa: E402


@dataclasses.dataclass
class Ctx:
    """What a case works with: a fresh folder and copies of a good model, heads and run folder in it."""

    tmp: Path
    bundle: medusa_jax.Bundle  # the tiny model with 2 shared-projection heads

    @property
    def hf(self) -> Path:
        return self.tmp / "model"

    @property
    def heads(self) -> Path:
        return self.tmp / "heads"

    @property
    def run(self) -> Path:
        return self.tmp / "run"


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: `call(ctx)` must fail with a message matching `match`.

    cli: the call runs a CLI's main (exit status and stderr are checked); absent: paths relative to the case folder
    that must not exist afterwards (no partial output).
    """

    area: str
    input: str
    call: Callable[[Ctx], object]
    match: str
    cli: bool = False
    absent: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------ helpers


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


def _heads_state(hidden: int, vocab: int | None, num_heads: int = 2) -> dict[str, np.ndarray]:
    """An original-format Medusa state dict (`own` projection when `vocab`)."""
    rng = np.random.default_rng(0)
    state = {}
    for i in range(num_heads):
        state[f"{i}.0.linear.weight"] = rng.standard_normal((hidden, hidden)).astype(np.float32)
        state[f"{i}.0.linear.bias"] = np.zeros(hidden, np.float32)
        if vocab:
            state[f"{i}.1.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32)
    return state


def _save_state(path: Path, state: dict) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


class Payload:
    """Unpickling this runs `touch <marker>` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_pickle(path: Path, marker: Path) -> Path:
    """A PyTorch checkpoint (zip format) holding a pickle payload instead of tensors."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"0.0.linear.weight": Payload(marker)}, path)
    assert not marker.exists()
    return path


def _load(source, **kw):
    return medusa_jax.load(source, **kw)


def _gen(ctx: Ctx, prompt=(5, 6, 7), **kw):
    from infer.api import generate_ids

    return generate_ids(ctx.bundle, list(prompt) if isinstance(prompt, tuple) else prompt, **kw)


def _conversations(ctx: Ctx, name: str, text: str | bytes):
    from train import data

    return data.load_conversations(str(_write(ctx.tmp / name, text)))


def _stage1(*argv):
    from train import stage1

    return stage1.main([*argv, "--no-progress", "--accept-prompts", "0"])


def _distill(*argv):
    from train import distill

    return distill.main([*argv, "--no-progress"])


def _chat(*argv):
    from infer import chat

    return chat.main(list(argv))


def _tune(*argv):
    from infer import tune_tree

    return tune_tree.main(list(argv))


def _heads_eval(*argv):
    from infer import heads_eval

    return heads_eval.main(list(argv))


def _resume_torn(ctx: Ctx):
    (ctx.run / "ckpt" / "20.orbax-checkpoint-tmp").mkdir(parents=True)
    return _stage1("--resume", str(ctx.run))


def _checkpoint(ctx: Ctx, step: int = 4) -> Path:
    """A real orbax checkpoint of a small state in ctx.run."""
    from train.checkpoint import Checkpoints

    Checkpoints(str(ctx.run)).save(step, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"args": {}})
    return ctx.run / "ckpt" / str(step)


def _restore(ctx: Ctx, target=None):
    from train.checkpoint import Checkpoints

    target = {"w": np.zeros((2, 3), np.float32)} if target is None else target
    return Checkpoints(str(ctx.run), create=False).restore(target)


def _corrupt_checkpoint_files(ctx: Ctx):
    ckpt = _checkpoint(ctx)
    for f in (ckpt / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
            f.write_bytes(b"\x00garbage" * 4)
    return _restore(ctx)


def _corrupt_checkpoint_meta(ctx: Ctx):
    from train.checkpoint import Checkpoints

    ckpt = _checkpoint(ctx)
    for f in (ckpt / "meta").rglob("*"):
        if f.is_file():
            f.write_text("{not json")
    return Checkpoints(str(ctx.run), create=False).read_meta()


# ------------------------------------------------------------------------------------------------ the cases

V = 256  # the tiny model's vocabulary; hidden size 64, context 512

CASES: list[Case] = [
    # --- loaders
    Case("loader", "model name that is neither a path nor `tiny`",
         lambda c: _load("llama-7b"), r"llama-7b: file or directory not found; pass a Hugging Face model directory"),
    Case("loader", "empty (0-byte) model.safetensors",
         lambda c: (_write(c.hf / "model.safetensors", b""), _load(c.hf)),
         r"model\.safetensors: not a readable safetensors file"),
    Case("loader", "model.safetensors with a corrupted header",
         lambda c: (_corrupt_header(c.hf / "model.safetensors"), _load(c.hf)),
         r"model\.safetensors: not a readable safetensors file"),
    Case("loader", "sharded checkpoint whose index names a missing shard",
         lambda c: ((c.hf / "model.safetensors").rename(c.hf / "model-00001-of-00002.safetensors"),
                    _write(c.hf / "model.safetensors.index.json", json.dumps({"weight_map": {
                        "model.norm.weight": "model-00002-of-00002.safetensors"}})), _load(c.hf)),
         r"model-00002-of-00002\.safetensors"),
    Case("loader", "config.json whose num_attention_heads is not a multiple of num_key_value_heads",
         lambda c: (_edit_json(c.hf / "config.json", num_attention_heads=5, head_dim=None), _load(c.hf)),
         r"num_heads=5 is not a multiple of num_kv_heads=2; fix the checkpoint's config\.json"),
    Case("loader", "config.json whose hidden_size disagrees with the tensors",
         lambda c: (_edit_json(c.hf / "config.json", hidden_size=128), _load(c.hf)),
         r"has shape \[\d+, 64\] but the config implies"),
    Case("loader", "empty (0-byte) .gguf file",
         lambda c: _load(_write(c.tmp / "empty.gguf", b"")), r"empty\.gguf: not a readable GGUF file"),
    Case("loader", ".gguf file cut inside its header",
         lambda c: _load(_write(c.tmp / "cut.gguf", b"GGUF\x03\x00\x00\x00" + b"\x05" * 9)),
         r"cut\.gguf: not a readable GGUF file"),
    Case("loader", "heads whose hidden size does not match the base",
         lambda c: _load("tiny", heads=_save_state(c.tmp / "h" / "medusa_lm_head.safetensors", _heads_state(32, None))),
         r"heads have hidden size 32 .* base model has hidden size 64"),
    Case("loader", "heads whose vocabulary does not match the base",
         lambda c: _load("tiny", heads=_save_state(c.tmp / "h" / "medusa_lm_head.safetensors",
                                                   _heads_state(64, 100))),
         r"vocabulary does not match: '0\.1\.weight' is \[100, 64\] but the base model has vocabulary 256"),
    Case("loader", "truncated medusa_lm_head.safetensors",
         lambda c: (_truncate(c.heads / "medusa_lm_head.safetensors", 0.5), _load("tiny", heads=c.heads)),
         r"medusa_lm_head\.safetensors: not a readable safetensors file"),
    Case("loader", "medusa_lm_head.pt whose pickle would run a shell command",
         lambda c: _load("tiny", heads=_evil_pickle(c.tmp / "h" / "medusa_lm_head.pt", c.tmp / "pwned")),
         r"medusa_lm_head\.pt: cannot read PyTorch weights \(UnpicklingError", absent=("pwned",)),
    Case("loader", "tokenizer_config.json whose auto_map asks for custom Python code",
         lambda c: (_write(c.hf / "tokenizer_config.json", json.dumps({"tokenizer_class": "MyTok", "auto_map": {
             "AutoTokenizer": ["my_tok.MyTok", None]}})), _write(c.hf / "my_tok.py", "raise SystemExit(9)\n"),
                    _load(c.hf)), r"custom Python code from the folder \(auto_map\), which medusa-jax never does"),
    Case("loader", "`--resume` of a run whose only checkpoint is a torn (uncommitted) save",
         _resume_torn, r"no complete checkpoint in .*; start the run without --resume", cli=True),
    Case("loader", "orbax checkpoint with corrupted array files",
         _corrupt_checkpoint_files, r"checkpoint .*ckpt/4 cannot be restored into this run .*delete that folder"),
    Case("loader", "orbax checkpoint whose meta JSON is corrupted",
         _corrupt_checkpoint_meta, r"checkpoint .*ckpt/4"),
    Case("loader", "orbax checkpoint of differently shaped parameters",
         lambda c: (_checkpoint(c), _restore(c, {"w": np.zeros((3, 3), np.float32)})),
         r"differently shaped parameters than this run builds"),
    # --- data
    Case("data", "JSONL file with a broken line",
         lambda c: _conversations(c, "d.jsonl", '{"conversations": []}\n{"conversations": [\n'),
         r"d\.jsonl"),
    Case("data", "JSON file that is a single object, not a list of conversations",
         lambda c: _conversations(c, "d.json", '{"role": "user", "content": "hi"}'),
         r"d\.json: no usable conversation in 1 record \(1 missing fields\); give chat data"),
    Case("data", "empty data file",
         lambda c: _conversations(c, "d.jsonl", ""), r"d\.jsonl: no usable conversation in 0 records"),
    Case("data", "records with the wrong schema (no messages/conversations)",
         lambda c: _conversations(c, "d.jsonl", '{"text": "hello"}\n{"question": "why?"}\n'),
         r"d\.jsonl: no usable conversation in 2 records"),
    Case("data", "data file that is not UTF-8",
         lambda c: _conversations(c, "d.jsonl", b"\xff\xfe\x00bad"), r"d\.jsonl is not UTF-8 text"),
    Case("data", "`--seq-len` longer than the model's context (512)",
         lambda c: _stage1("--model", "tiny", "--seq-len", "1024", "--steps", "1", "--out", str(c.tmp / "out")),
         r"--seq-len 1024", cli=True, absent=("out",)),
    Case("data", "prompt (conversation) longer than the model's context",
         lambda c: _gen(c, [7] * 600), r"prompt of 600 tokens does not fit the model's context of 512 tokens"),
    # --- CLI flags
    Case("cli", "`train.stage1 --lr 0`",
         lambda c: _stage1("--model", "tiny", "--lr", "0"), r"--lr must be positive", cli=True),
    Case("cli", "`train.stage1 --holdout 1.5`",
         lambda c: _stage1("--model", "tiny", "--holdout", "1.5", "--out", str(c.tmp / "out")), r"--holdout",
         cli=True, absent=("out",)),
    Case("cli", "`train.stage1 --warmup 1`",
         lambda c: _stage1("--model", "tiny", "--steps", "2", "--warmup", "1", "--out", str(c.tmp / "out")),
         r"warmup", cli=True, absent=("out",)),
    Case("cli", "`train.stage1 --head-targets teacher --teacher-temperature -1`",
         lambda c: _stage1("--model", "tiny", "--head-targets", "teacher", "--teacher-temperature", "-1",
                           "--out", str(c.tmp / "out")), r"--teacher-temperature", cli=True, absent=("out",)),
    Case("cli", "`train.stage1 --steps 5 --stop-at 10` (stop after the end)",
         lambda c: _stage1("--model", "tiny", "--steps", "5", "--stop-at", "10", "--out", str(c.tmp / "out")),
         r"--stop-at 10", cli=True, absent=("out",)),
    Case("cli", "`train.stage1 --model llama-7b` (unknown model name)",
         lambda c: _stage1("--model", "llama-7b", "--out", str(c.tmp / "out")),
         r"llama-7b: file or directory not found", cli=True, absent=("out",)),
    Case("cli", "`train.stage1 --heads-init` with heads of another shape",
         lambda c: _stage1("--model", "tiny", "--heads-init", str(c.heads), "--num-heads", "3", "--steps", "1",
                           "--out", str(c.tmp / "out")), r"--heads-init .* pass matching --num-heads", cli=True,
         absent=("out",)),
    Case("cli", "`train.distill --temperature -1`",
         lambda c: _distill("--model", "tiny", "--temperature", "-1", "--out", str(c.tmp / "d.jsonl")),
         r"temperature", cli=True, absent=("d.jsonl",)),
    Case("cli", "`train.distill --prompts` pointing to an empty file",
         lambda c: _distill("--prompts", str(_write(c.tmp / "p.txt", "\n\n")), "--out", str(c.tmp / "d.jsonl")),
         r"p\.txt: no prompts found", cli=True, absent=("d.jsonl",)),
    Case("cli", "`infer.chat --model llama-7b`",
         lambda c: _chat("--model", "llama-7b", "--prompt", "hi"), r"llama-7b: file or directory not found", cli=True),
    Case("cli", "`infer.chat --top-p 0`",
         lambda c: _chat("--model", "llama-7b", "--top-p", "0", "--prompt", "hi"), r"--top-p", cli=True),
    Case("cli", "`infer.chat --mode greedy --temperature 0.7` (contradictory)",
         lambda c: _chat("--model", "llama-7b", "--mode", "greedy", "--temperature", "0.7", "--prompt", "hi"),
         r"greedy", cli=True),
    Case("cli", "`infer.chat --tree '[[0], [0, 0'` (bad JSON)",
         lambda c: _chat("--model", "llama-7b", "--tree", "[[0], [0, 0", "--prompt", "hi"), r"--tree: .* not valid JSON",
         cli=True),
    Case("cli", "`infer.chat --lookup 99` (longer than MAX_LOOKUP)",
         lambda c: _chat("--model", "llama-7b", "--lookup", "99", "--prompt", "hi"),
         r"--lookup must be an integer from 0 to 16 .*got 99",
         cli=True),
    Case("cli", "`infer.tune_tree --sizes 1,two`",
         lambda c: _tune("--model", "llama-7b", "--sizes", "1,two", "--out", str(c.tmp / "tree.json")), r"--sizes",
         cli=True, absent=("tree.json",)),
    Case("cli", "`infer.heads_eval --grow 0,16`",
         lambda c: _heads_eval("--model", "llama-7b", "--grow", "0,16"), r"--grow values must be >= 1", cli=True),
    Case("cli", "`infer.tune_tree --model tiny` (no tokenizer)",
         lambda c: _tune("--model", "tiny", "--heads", str(c.heads), "--out", str(c.tmp / "tree.json")),
         r"tokenizer", cli=True, absent=("tree.json",)),
    # --- generation arguments
    Case("generate", "`generate_ids(..., mode='beam')`", lambda c: _gen(c, mode="beam"), r"unknown mode 'beam'"),
    Case("generate", "`temperature=nan`", lambda c: _gen(c, temperature=float("nan")), r"temperature must be >= 0"),
    Case("generate", "`top_p=nan`", lambda c: _gen(c, top_p=float("nan"), temperature=1.0, mode="sample"),
         r"top_p must be in \(0, 1\]"),
    Case("generate", "`max_new_tokens=2.5`", lambda c: _gen(c, max_new_tokens=2.5),
         r"max_new_tokens must be a positive integer"),
    Case("generate", "a text string passed to `generate_ids`", lambda c: _gen(c, "hello"), r"token ids"),
    Case("generate", "token id -1 in the prompt", lambda c: _gen(c, [5, -1]), r"token id -1 is outside the vocabulary"),
    Case("generate", "token id equal to the vocabulary size", lambda c: _gen(c, [[5], [V]]),
         r"token id 256 is outside the vocabulary of 256"),
    Case("generate", "`stop_ids` outside the vocabulary", lambda c: _gen(c, stop_ids=(V + 5,)), r"stop"),
    # --- trees
    Case("tree", "`tree='chain:-1'`", lambda c: _gen(c, tree="chain:-1"), r"chain"),
    Case("tree", "`tree='dense:3,0'`", lambda c: _gen(c, tree="dense:3,0"), r"dense tree widths must all be >= 1"),
    Case("tree", "path without its prefix: `[[0, 1]]`", lambda c: _gen(c, tree=[[0, 1]]),
         r"path \[0, 1\] needs its prefix \[0\], which is not in the tree; add it"),
    Case("tree", "negative rank: `[[0], [-1]]`", lambda c: _gen(c, tree=[[0], [-1]]), r"negative rank in path \[-1\]"),
    Case("tree", "duplicate path: `[[0], [0]]`", lambda c: _gen(c, tree=[[0], [0]]), r"duplicate path \[0\]"),
    Case("tree", "path deeper than the heads: `chain:3` with 2 heads", lambda c: _gen(c, tree="chain:3"),
         r"needs at least 3 Medusa heads"),
    Case("tree", "path of strings: `[['a']]`", lambda c: _gen(c, tree=[["a"]]), r"bad tree path"),
]


# ------------------------------------------------------------------------------------------------ running them


def make_bundle() -> medusa_jax.Bundle:
    import jax

    tiny = medusa_jax.load("tiny")
    hc = HeadsConfig(num_heads=2, num_layers=1, projection="shared")
    heads = model.init_heads(hc, tiny.config, tiny.base, jax.random.PRNGKey(1))
    return tiny.with_heads(heads, hc)


def prepare(tmp: Path, bundle: medusa_jax.Bundle, good: Path) -> Ctx:
    """A case folder with copies of the good model and heads."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("model", "heads"):
        shutil.copytree(good / name, tmp / name)
    return Ctx(tmp=tmp, bundle=bundle)


def write_good_files(good: Path, bundle: medusa_jax.Bundle) -> Path:
    from medusa_jax.loading import save_heads, save_hf

    save_hf(bundle, good / "model")
    save_heads(bundle, out_dir=good / "heads")
    return good


def outcome(case: Case, ctx: Ctx) -> tuple[str, int | None, str]:
    """(the one-line message the user sees, CLI exit status or None, full stderr) of running `case`."""
    if not case.cli:
        try:
            case.call(ctx)
        except MedusaError as e:
            return str(e), None, ""
        raise AssertionError(f"{case.input}: no error")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            with cli_errors():  # as the modules' __main__ blocks do
                case.call(ctx)
        except SystemExit as e:
            code = e.code
        else:
            raise AssertionError(f"{case.input}: no error")
    lines = [line for line in err.getvalue().splitlines() if "error:" in line]
    return (lines[0] if lines else ""), code, err.getvalue()


def _shown(message: str, ctx: Ctx, limit: int = 150) -> str:
    text = message.replace(str(ctx.tmp) + os.sep, "").replace(str(ctx.tmp), ".")
    text = re.sub(r"python -m \S+: error:", "error:", text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def markdown_table(messages: list[str]) -> str:
    rows = ["| area | input | what the user sees |", "|---|---|---|"]
    for case, message in zip(CASES, messages):
        cell = message.replace("|", "\\|").replace("`", "'")
        what = case.input.replace("|", "\\|")
        rows.append(f"| {case.area} | {what} | `{cell}` |")
    return "\n".join(rows)


def generate_messages(root: Path) -> list[str]:
    bundle = make_bundle()
    good = write_good_files(root / "good", bundle)
    out = []
    for i, case in enumerate(CASES):
        ctx = prepare(root / f"case{i}", bundle, good)
        out.append(_shown(outcome(case, ctx)[0], ctx))
    return out


README_START = "## Bad inputs"


def readme_section(table: str) -> str:
    return (f"{README_START}\n\nEvery input below is tried by `tests/test_bad_inputs.py`; each fails with this one "
            "line, no traceback\n(CLIs print it on stderr and exit with status 2, leaving no partial output). "
            "Regenerate the table with\n`PYTHONPATH=. python -m tests.test_bad_inputs --readme`.\n\n" + table + "\n")


def replace_readme_section(readme: str, section: str) -> str:
    """README text with its "## Bad inputs" section (up to the next "## " heading) replaced or appended."""
    start = readme.find(f"\n{README_START}\n")
    if start < 0:
        return readme.rstrip("\n") + "\n\n" + section
    end = readme.find("\n## ", start + 1)
    return readme[: start + 1] + section + (readme[end:] if end >= 0 else "")


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    bundle = make_bundle()
    return bundle, write_good_files(tmp_path_factory.mktemp("good"), bundle)


@pytest.fixture(scope="module")
def messages():
    return {}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_gives_one_clear_line(case, env, messages, tmp_path):
    ctx = prepare(tmp_path / "case", *env)
    message, code, stderr = outcome(case, ctx)
    assert "Traceback" not in stderr
    assert re.search(case.match, message), f"{case.input}: {message!r} does not match {case.match!r}"
    assert "\n" not in message and len(message) > 20
    if case.cli:
        assert code not in (0, None), stderr
        assert len([line for line in stderr.splitlines() if "error:" in line]) == 1, stderr
        assert message.startswith("error:") or ": error: " in message, stderr
    for name in case.absent:
        assert not (ctx.tmp / name).exists(), f"{case.input}: left {name} behind"
    messages[CASES.index(case)] = _shown(message, ctx)


def test_enough_cases():
    assert len(CASES) >= 25
    assert {c.area for c in CASES} == {"loader", "data", "cli", "generate", "tree"}


def test_readme_table_is_current(messages):
    if len(messages) != len(CASES):
        pytest.skip("needs every case's message (run the whole module)")
    readme = (ROOT / "README.md").read_text()
    section = readme_section(markdown_table([messages[i] for i in range(len(CASES))]))
    assert section in readme, ("README.md's Bad inputs table is out of date; run "
                               "PYTHONPATH=. python -m tests.test_bad_inputs --readme")


@pytest.mark.parametrize("module, argv, needle", [
    ("infer.chat", ["--model", "llama-7b", "--prompt", "hi"], "llama-7b: file or directory not found"),
    ("train.distill", ["--model", "tiny", "--top-p", "2"], "top_p"),
])
def test_real_process_exit_status(module, argv, needle):
    """The in-process checks above mirror the real entry points: status 2, one line, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        table = markdown_table(generate_messages(Path(d)))
    if "--readme" in sys.argv:
        path = ROOT / "README.md"
        path.write_text(replace_readme_section(path.read_text(), readme_section(table)))
        print(f"updated {path}")
    else:
        print(table)
