"""The README and docs/*.md are tested: every command of their bash/sh/console blocks and every Python block
runs, in order, one document at a time, each in its own scratch folder that links the repository's src/,
configs/, docs/, ... (so relative paths work and nothing is written into the repository). The Python
blocks of a document share one namespace, as in one session.

What a snippet needs and CI has not (the official weights, a GPU, a second machine, a download, hours) is
replaced by a documented substitution (SUBSTITUTIONS: README text -> test text, applied to every block),
or built here (PREPARED). Set-up steps (SETUP) are not run here: .ci/run runs the README's test command,
which this file checks. A README block the test cannot run must carry ``<!-- readme-test: skip (reason) -->``;
the run lists and counts them (and every set-up step and data block), nothing is left out silently.
``pytest -s tests/test_readme.py`` prints that list. docs/*.md may not skip a block: what a doc's block
needs and CI has not goes through the same SUBSTITUTIONS.

Beyond running the blocks: the README stays a short guide (MAX_README_LINES, the set-up commands first),
its vocabulary listing is ``omnigen vocab --short``'s output, its code map and docs/architecture.md's
module table name every module, that page's import table allows every import between wings, and every
relative link of README.md and docs/*.md resolves (file and heading).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from readme_blocks import DATA_LANGUAGES, RUN_LANGUAGES, Block, chain, read_blocks, shell_commands

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 350
COMMAND_TIMEOUT_S = 300
SERVER_START_S = 180


@dataclass(frozen=True)
class Substitution:
    readme: str
    test: str  # {name} fields are filled from the run's values (tiny folders, free ports)
    why: str


SUBSTITUTIONS = (
    Substitution(
        "/models/OmniGen-v1", "{model}", "the official weights: a tiny random model in the official layout"
    ),
    Substitution("/models/sdxl-vae", "{vae}", "the SDXL VAE: that folder's tiny AutoencoderKL (vae/)"),
    Substitution('device="cuda"', 'device="cpu"', "no GPU in CI"),
    Substitution("--device cuda", "--device cpu", "no GPU in CI"),
    Substitution('["cuda:0", "cuda:1"]', '["cpu", "cpu"]', "two GPUs: the CPU twice"),
    Substitution(
        "python -m pytest -q\n", "python -m pytest -q --collect-only\n", "the suite itself: collected only"
    ),
    Substitution("--n 200000", "--n 16", "the training set's size"),
    Substitution(
        "bench_shards.py --samples 3000 --size 64 --rounds 3",
        "bench_shards.py --smoke",
        "minutes of shard writing: the seconds-long smoke mode",
    ),
    Substitution("--n 512", "--n 4", "the validation set's size"),
    Substitution("--n 600", "--n 4", "the evaluation's sample count"),
    Substitution("--n 560", "--n 4", "the evaluation's sample count"),
    Substitution(
        "--json docs/guidance_interval.json",
        "--json guidance_interval.json",
        "the committed results stay as they are",
    ),
    Substitution(
        "omnigen train --config configs/miniworld_v2.yaml ",
        "omnigen train --config configs/miniworld_v2.yaml "
        "'stages=[{{resolution: 16, steps: 2, batch_size: 4, lr: 5.0e-4}}]' val_samples=4 ",
        "the shipped model's 9,000-step stage: 2 steps",
    ),
    Substitution(
        "resolution: 512, steps: 2000, batch_size: 4",
        "resolution: 32, steps: 2, batch_size: 2",
        "a fine-tuning run: 2 steps at the tiny model's size",
    ),
    Substitution(
        "--nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400",
        "--nnodes 1 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:{rdzv_port}",
        "a second machine and a rendezvous host: one process, a local rendezvous on a free port",
    ),
    Substitution("--nproc_per_node 8", "--nproc_per_node 1", "8 GPUs: one CPU process"),
    Substitution(
        "--nnodes 2 --node_rank 0 --master_addr HOST",
        "--nnodes 1 --node_rank 0 --master_addr 127.0.0.1",
        "a second machine: none",
    ),
    Substitution(
        "--jsonl x2i/text_to_image.jsonl --jsonl x2i/editing.jsonl --images x2i/images.tar.gz.aa --out /shared/x2i",
        "--jsonl data/world/train.jsonl --images data/world --out data/shards/x2i",
        "the X2I download (hundreds of GB of split archives): the miniature world's rows",
    ),
    Substitution("/models/clip-vit-large-patch14", "{clip}", "CLIP ViT-L/14: a tiny random CLIP"),
    Substitution("/models/dino-vits16", "{dino}", "DINO ViT-S/16: a tiny random ViT"),
    Substitution("--resolution 512", "--resolution 16", "the shipped model draws 16x16 images"),
    Substitution("--port 7860", "--port {demo_port}", "a free port"),
    Substitution("--port 8000", "--port {serve_port}", "a free port"),
    Substitution("localhost:8000", "localhost:{serve_port}", "the same free port"),
    Substitution("127.0.0.1:8000", "127.0.0.1:{serve_port}", "the same free port"),
    Substitution("curl -s ", "curl -s --fail-with-body ", "an HTTP error fails the command"),
)

# Set-up steps of a command chain: not run here (they install into the interpreter running this test).
SETUP = (
    (re.compile(r"^python3? -m venv \S+$"), "creates a virtual environment"),
    (re.compile(r"^\. \S+/bin/activate$"), "activates it"),
    (re.compile(r"^pip install "), "installs into it"),
)
SETUP_NOTE = (
    "CI's .ci/run runs these steps of the README's test command, the dev extras included "
    "(test_ci_runs_the_readme_test_command)"
)

# Commands that serve until stopped: started, waited for (this path answers 200), stopped after the block.
SERVERS = {"omnigen demo": "/", "omnigen serve": "/health"}

PREPARED = {
    "evaluation_metadata.jsonl": "GenEval's prompt file: two rows",
    "emu_edit/": "facebook/emu_edit_test_set's parquet layout: one test row",
    "dreambooth/dataset/": "google/dreambooth's dataset/ folder: one subject, one photo",
    "multigen/": "the MultiGen-20M validation parquet layout: one row",
    "images of a JSONL file the README writes": "a random 32x32 image for every path its rows name",
}


def _name(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def _blocks(doc: Path):
    return read_blocks(doc.read_text(), _name(doc))


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_readme_blocks_run(doc, tmp_path, model_folder, monkeypatch):
    import torch._dynamo

    scratch = tmp_path / "readme"
    scratch.mkdir()
    for name in ("src", "configs", "docs", "scripts", "benchmarks", "tests", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            (scratch / name).symlink_to(ROOT / name)
    values = _values(tmp_path, model_folder)
    _prepare(scratch)
    env = _environment()
    monkeypatch.chdir(scratch)
    namespace: dict = {"__name__": "readme"}
    report: list[str] = []
    servers: list[subprocess.Popen] = []  # a shell block's servers live through the next block (its client)
    try:
        # pipe.compile() is called, but compiling takes minutes on a CPU: blocks run eagerly
        # (tests/test_performance.py checks compiled blocks against eager ones). config.patch, not
        # monkeypatch: undoing a monkeypatch on torch's config module removes the setting for the next doc
        with torch._dynamo.config.patch(disable=True):
            _run_blocks(_blocks(doc), scratch, values, env, namespace, report, servers)
    finally:
        for proc in servers:
            _stop(proc)
    skipped = [line for line in report if "SKIPPED" in line or "not run" in line]
    print(f"\n{_name(doc)} blocks ({len(skipped)} skipped or set-up parts):\n" + "\n".join(report))
    assert len(report) >= len(_blocks(doc))
    if doc == README:
        assert any(line.endswith("ran") for line in report)


def _run_blocks(
    blocks: list[Block], scratch: Path, values: dict, env: dict, namespace: dict, report: list, servers: list
) -> None:
    for block in blocks:
        started_before = list(servers)
        if block.marker == "skip":
            if block.source != "README.md":
                pytest.fail(f"{block.where}: docs/*.md may not skip a block; add a substitution instead")
            report.append(f"{block.where}: SKIPPED, marked in the README: {block.argument}")
            continue
        text = _substitute(block.text, values)
        if block.marker == "file":
            _write_file(scratch / block.argument, text)
            report.append(f"{block.where}: written to {block.argument}")
        elif block.language == "python":
            _run_python(block, text, namespace)
            report.append(f"{block.where}: ran")
        elif block.language in RUN_LANGUAGES:
            _run_shell(block, text, scratch, env, report, servers)
        elif block.language in DATA_LANGUAGES:
            report.append(f"{block.where}: data, not a command")
        else:
            pytest.fail(
                f"{block.where}: a block in {block.language or 'no language'}: label it {RUN_LANGUAGES}"
            )
        for proc in started_before:
            _stop(proc)
            servers.remove(proc)


# ------------------------------------------------------------------------------------------- runners
def _run_python(block: Block, text: str, namespace: dict) -> None:
    try:
        exec(compile(text, block.where, "exec"), namespace)
    except Exception:
        pytest.fail(f"{block.where} failed:\n{text}\n{traceback.format_exc(limit=-3)}")


def _run_shell(
    block: Block, text: str, scratch: Path, env: dict, report: list[str], servers: list[subprocess.Popen]
) -> None:
    """Runs a shell block's commands; servers it starts join `servers` (stopped after the next block)."""
    for command in shell_commands(Block(block.line, block.language, text, source=block.source)):
        where = f"{block.source}:{command.line}"
        parts = chain(command.text)
        for part in parts:
            reason = _setup_reason(part)
            if reason:
                report.append(f"{where}: not run, set-up ({reason}; {SETUP_NOTE}): {part}")
        rest = " && ".join(part for part in parts if not _setup_reason(part))
        if not rest:
            continue
        server = next((path for prefix, path in SERVERS.items() if rest.startswith(prefix)), None)
        if server is not None:
            servers.append(_start_server(where, rest, server, scratch, env)[0])
            report.append(f"{where}: started and answered {server}, stopped after the next block: {rest}")
            continue
        proc = subprocess.run(
            ["bash", "-c", rest],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        if proc.returncode != 0:
            pytest.fail(f"{where} exited {proc.returncode}: {rest}\n{_tail(proc.stdout + proc.stderr)}")
        report.append(f"{where}: ran: {rest}")


def _start_server(where: str, command: str, path: str, scratch: Path, env: dict):
    port = re.search(r"--port (\d+)", command)
    if port is None:
        pytest.fail(f"{where}: a server command without --port: {command}")
    log = scratch / f"server_{port.group(1)}.log"
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + command],
        cwd=scratch,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{where} exited {proc.returncode}: {command}\n{_tail(log.read_text())}")
        try:
            with opener.open(f"http://127.0.0.1:{port.group(1)}{path}", timeout=5) as answer:
                if answer.status == 200:
                    return proc, log
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    pytest.fail(
        f"{where} did not answer {path} within {SERVER_START_S} s: {command}\n{_tail(log.read_text())}"
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _setup_reason(part: str) -> str | None:
    return next((reason for pattern, reason in SETUP if pattern.match(part)), None)


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


# ----------------------------------------------------------------------------------- inputs and values
def _substitute(text: str, values: dict) -> str:
    for sub in SUBSTITUTIONS:
        text = text.replace(sub.readme, sub.test.format(**values))
    return text


def _values(tmp_path: Path, model_folder: Path) -> dict:
    from conftest import tiny_clip_dino_folders  # transformers: a dev dependency, so no skip

    folder = tmp_path / "scorers"
    folder.mkdir()
    clip, dino = tiny_clip_dino_folders(folder)
    return {
        "model": str(model_folder),
        "vae": str(model_folder / "vae"),
        "clip": str(clip),
        "dino": str(dino),
        "demo_port": _free_port(),
        "serve_port": _free_port(),
        "rdzv_port": _free_port(),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        no_proxy="localhost,127.0.0.1",
        NO_PROXY="localhost,127.0.0.1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    return env


def _png(seed: int) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(seed))


def _write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if path.suffix == ".jsonl":  # X2I rows: draw the images they name
        for k, line in enumerate(text.splitlines()):
            row = json.loads(line)
            for sample in (row, row.get("few_shot") or {}):
                for name in [*sample.get("input_images", []), sample.get("output_image")]:
                    if name and not (path.parent / name).exists():
                        _image(path.parent / name, seed=k)


def _prepare(scratch: Path) -> None:
    """The data the README tells the reader to download (PREPARED), in tiny versions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"},
    ]
    (scratch / "evaluation_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    emu = {
        "instruction": ["make it red"],
        "image": pa.array([{"bytes": _png(1), "path": None}], type=image_type),
        "task": ["color"],
        "split": ["test"],
        "idx": [0],
        "hash": ["h"],
        "input_caption": ["a cat"],
        "output_caption": ["a red cat"],
    }
    (scratch / "emu_edit" / "data").mkdir(parents=True)
    pq.write_table(pa.table(emu), scratch / "emu_edit" / "data" / "test-00000-of-00001.parquet")

    dataset = scratch / "dreambooth" / "dataset"
    _image(dataset / "dog" / "00.png", seed=2)
    (dataset / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\ndog,dog\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\n\n"
        "prompt_list = [\n'a {0} {1} wearing a red hat'.format(unique_token, class_token)\n]\n"
    )

    control = {
        "image": pa.array([{"bytes": _png(3), "path": None}], type=image_type),
        "text": ["a white square"],
    }
    (scratch / "multigen").mkdir()
    pq.write_table(pa.table(control), scratch / "multigen" / "validation-00000-of-00001.parquet")


# ------------------------------------------------------------------- checks of the README and docs
def _runnable_text() -> str:
    return "".join(b.text for doc in DOCS for b in _blocks(doc) if b.marker != "skip")


@pytest.mark.parametrize("sub", SUBSTITUTIONS, ids=lambda s: s.readme.strip())
def test_every_substitution_is_used(sub):
    assert sub.readme in _runnable_text(), f"stale substitution (no document has {sub.readme!r} any more)"


def test_every_block_is_run_or_data():
    assert len(DOCS) > 1, "docs/*.md not found"
    for doc in DOCS:
        for block in _blocks(doc):
            assert block.language in RUN_LANGUAGES + DATA_LANGUAGES, f"{block.where}: unknown language"


def test_docs_skip_no_block():
    marked = [b.where for doc in DOCS[1:] for b in _blocks(doc) if b.marker == "skip"]
    assert not marked, f"docs/*.md may not skip a block (use a substitution): {marked}"


def _setup_commands() -> list[str]:
    first = read_blocks(README.read_text())[0]
    return [c.text.split("  #")[0].strip() for c in shell_commands(first)]


def test_readme_opens_with_two_setup_commands_in_their_own_venvs():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    venvs = [re.search(r"python3 -m venv (\S+)", c).group(1) for c in commands]
    assert venvs[0] != venvs[1], f"both set-up commands create {venvs[0]}: the second reuses the first's"
    ignored = (ROOT / ".gitignore").read_text().split()
    assert all(f"{venv}/" in ignored for venv in venvs), (venvs, ignored)
    assert "omnigen generate" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")
    ci_parts = {part for line in ci.splitlines() for part in chain(" ".join(line.split()))}
    missing = [part for part in chain(_setup_commands()[1]) if part not in ci_parts]
    assert not missing, f".ci/run does not run these parts of the README's test command: {missing}"


# ------------------------------------------------------------------------------------ the block reader
MARKDOWN = """# t

<!-- readme-test: skip (needs a GPU) -->
```bash
omnigen generate x --device cuda
```

```sh
# a comment
omnigen a \\
   --b c   # trailing
omnigen d && omnigen e
```

<!-- readme-test: file my.yaml -->

```yaml
a: 1
```

```console
$ omnigen --help
usage: omnigen
```
"""


def test_block_reader_markers_commands_and_errors():
    blocks = read_blocks(MARKDOWN)
    assert [(b.language, b.marker, b.argument) for b in blocks] == [
        ("bash", "skip", "needs a GPU"),
        ("sh", None, ""),
        ("yaml", "file", "my.yaml"),
        ("console", None, ""),
    ]
    assert [(c.line, c.text) for c in shell_commands(blocks[1])] == [
        (10, "omnigen a --b c   # trailing"),
        (12, "omnigen d && omnigen e"),
    ]
    assert chain(shell_commands(blocks[1])[1].text) == ["omnigen d", "omnigen e"]
    assert [c.text for c in shell_commands(blocks[3])] == ["omnigen --help"]
    with pytest.raises(ValueError, match="never closed"):
        read_blocks("```bash\nls\n")
    with pytest.raises(ValueError, match="without a reason"):
        read_blocks("<!-- readme-test: skip -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="malformed"):
        read_blocks("<!-- readme-test: sikp (x) -->\n```bash\nls\n```\n")


# ------------------------------------------------------------------------- what a new user ran into
def test_the_load_log_names_the_folder_and_its_layout(model_folder, caplog):
    from omnigen.weights.checkpoint import load_model

    with caplog.at_level("INFO", logger="omnigen.weights.checkpoint"):
        load_model(model_folder)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "omnigen.weights.checkpoint"]
    assert str(model_folder) in message and "official layout; 2 layers, hidden 32" in message, message


def test_demo_without_gradio_says_so_before_loading_a_model(monkeypatch, caplog):
    from omnigen.cli.main import main
    from omnigen.pipeline import OmniGenPipeline

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio fails, find_spec finds nothing

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the gradio check")

    monkeypatch.setattr(OmniGenPipeline, "from_pretrained", no_loading)
    assert main(["demo"]) == 2
    assert "the demo needs gradio: pip install 'omnigen-unified[demo]'" in caplog.text


def _section(text: str, heading: str) -> str:
    return text[text.index(heading) :].split("\n## ")[0]


def _unnamed_modules(table: str, folders: bool) -> list[str]:
    """Modules of src/omnigen/ the table does not name (by path; by their wing's folder where `folders`)."""
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", table))
    package = ROOT / "src" / "omnigen"
    missing = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        folder = relative.split("/")[0] + "/"
        if path.name != "__init__.py" and relative not in named and not (folders and folder in named):
            missing.append(relative)
    return missing


def test_the_code_map_names_every_module():
    missing = _unnamed_modules(_section(README.read_text(), "## Code map"), folders=True)
    assert not missing, f"README's code map lacks {missing}"


def test_the_architecture_page_names_every_module():
    table = _section((ROOT / "docs" / "architecture.md").read_text(), "## The modules")
    missing = _unnamed_modules(table, folders=False)
    assert not missing, f"docs/architecture.md's module table lacks {missing}"


def _wing(module: str) -> str:
    """omnigen.text.processor -> text; omnigen.pipeline -> pipeline."""
    return module.split(".")[1]


def test_the_architecture_page_allows_every_import_between_wings():
    from test_architecture import import_graph

    section = _section((ROOT / "docs" / "architecture.md").read_text(), "## Which layer may import which")
    allowed: dict[str, set[str]] = {}
    for row in re.findall(r"^\| (`.*?) \| (.*?) \|$", section, flags=re.M):
        for wing in re.findall(r"`(\w+)`", row[0]):
            allowed[wing] = set(re.findall(r"`(\w+)`", row[1]))
    assert {"text", "model", "sampling", "pipeline", "cli"} <= set(allowed), allowed
    found = sorted(
        (a, b)
        for a, targets in import_graph().items()
        for b in targets
        if a != "omnigen" and b != "omnigen" and _wing(a) != _wing(b)
    )
    stray = [f"{a} -> {b}" for a, b in found if _wing(b) not in allowed.get(_wing(a), set())]
    assert not stray, (
        f"imports docs/architecture.md does not allow (add them to its table, or remove): {stray}"
    )
    unused = [
        f"{wing} -> {target}"
        for wing, targets in allowed.items()
        for target in targets
        if not any(_wing(a) == wing and _wing(b) == target for a, b in found)
    ]
    assert not unused, f"docs/architecture.md allows imports the code does not make: {unused}"


def test_the_readme_is_a_short_guide_that_opens_with_the_setup_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"
    first = _blocks(README)[0]
    headings = [k + 1 for k, line in enumerate(lines) if line.startswith("## ")]
    assert first.language == "bash" and first.line < headings[0], "the README must open with the set-up block"
    assert [c.split(" && ")[-1] for c in _setup_commands()] == [
        'omnigen generate "a red circle in the top left on a white background" -o out.png',
        "python -m pytest -q",
    ]


def test_the_readme_vocabulary_is_the_vocab_commands_output():
    from omnigen.cli.vocab import render

    listings = [
        b for b in _blocks(README) if b.language == "console" and b.text.startswith("$ omnigen vocab")
    ]
    assert len(listings) == 1, "README.md should show `omnigen vocab --short` once"
    command, *output = listings[0].text.rstrip("\n").split("\n")
    assert command == "$ omnigen vocab --short"
    assert "\n".join(output) == render(short=True), (
        "README's vocabulary is stale: paste `omnigen vocab --short`"
    )


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{_name(doc)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{_name(doc)}: {target} (no such heading)")
    assert not broken, broken
