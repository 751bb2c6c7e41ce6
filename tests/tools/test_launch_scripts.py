"""Launch scripts under examples/: lint, and what the Slurm recipes would run.

* every script is ``bash -n`` clean, and ``shellcheck -x`` clean where shellcheck is installed;
* ``DRY_RUN=1`` of each Slurm recipe, for a fake 4-node allocation, both launchers and both
  precisions, prints one srun line that runs one torchrun per node with the recipe's layout;
* the m2-pretrain arguments it prints parse and pass m2-pretrain's own validation
  (:func:`megatron_m2.training.validation.validate_args`) at world size nodes x 8.

Torch-free apart from the FP8 validation; each dry run is one bash process (plus a Python one that
expands the node list where Slurm's ``scontrol`` is absent).
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_m2.training.arguments import build_parser
from megatron_m2.training.validation import validate_args

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "examples").rglob("*")
                 if p.suffix in {".sh", ".sbatch"} and p.is_file())
SLURM = ROOT / "examples" / "slurm"
GPUS_PER_NODE = 8
NODES = 4

# recipe -> (TP, PP); DP and the ITC group (one node's DP ranks) follow for 4 x 8 GPUs.
LAYOUTS = {"m2_0.4b.sbatch": (1, 1), "m2_1b.sbatch": (1, 1), "m2_10b.sbatch": (4, 1)}
FLAVORS = {"m2_0.4b.sbatch": "0.4b", "m2_1b.sbatch": "1b", "m2_10b.sbatch": "10b"}
FP8_FLAGS = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--transformer-impl", "te"]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_recipes_present():
    assert {p.name for p in SLURM.glob("*.sbatch")} == set(LAYOUTS)
    assert (ROOT / "examples" / "local" / "single_gpu.sh").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck); "
                           "test_bash_syntax still checks every script")
@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_shellcheck(script):
    res = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """What validate_args checks: a dataset (the bundled demo validation split, with its card)
    and the tokenizer that made it."""
    root = tmp_path_factory.mktemp("m2data")
    demo = ROOT / "data" / "emoji_demo"
    for src, dst in (("validation.bin", "train.bin"), ("validation.idx", "train.idx"),
                     ("validation.meta.json", "train.meta.json"),
                     ("tokenizer.model", "tokenizer.model")):
        shutil.copyfile(demo / src, root / dst)
    return root


def _env(**extra) -> dict:
    """A clean environment: no Slurm variables of the machine running the tests."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in {"MASTER_ADDR", "MASTER_PORT"}}
    env.update(PYTHON=sys.executable, DRY_RUN="1")
    env.update(extra)
    return env


@functools.lru_cache(maxsize=None)
def _dry_run(recipe: str, launcher: str, precision: str, data: str):
    env = _env(SLURM_JOB_NODELIST=f"node[01-0{NODES}]", SLURM_NNODES=str(NODES),
               SLURM_JOB_ID="4242", LAUNCHER=launcher, PRECISION=precision,
               DATA_ROOT=data, OUT_ROOT=os.path.join(data, "runs"))
    res = subprocess.run(["bash", str(SLURM / recipe)], capture_output=True, text=True,
                         env=env, timeout=60)
    return res.returncode, res.stdout, res.stderr


def _split(line: str):
    """srun options, torchrun options, m2-pretrain arguments of a printed srun line."""
    tokens = shlex.split(line)
    assert tokens[0] == "srun", line
    t = tokens.index("torchrun")
    m = tokens.index("-m", t)
    assert tokens[m + 1] == "megatron_m2.pretrain"
    return tokens[1:t], tokens[t + 1:m], tokens[m + 2:]


def _value(args, flag):
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times in {args}"
    return args[args.index(flag) + 1]


def _srun_line(stdout: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("srun ")]
    assert len(lines) == 1, stdout
    return lines[0]


COMBOS = [(r, launcher, precision) for r in LAYOUTS for launcher in ("pyxis", "module")
          for precision in ("bf16", "fp8")]


@pytest.mark.parametrize("recipe,launcher,precision", COMBOS)
def test_dry_run_commands(recipe, launcher, precision, data_root):
    rc, out, err = _dry_run(recipe, launcher, precision, str(data_root))
    assert rc == 0, err
    srun, torchrun, m2 = _split(_srun_line(out))
    tp, pp = LAYOUTS[recipe]
    dp = NODES * GPUS_PER_NODE // (tp * pp)

    assert f"--nodes={NODES}" in srun and "--ntasks-per-node=1" in srun
    container = [a for a in srun if a.startswith("--container-")]
    if launcher == "pyxis":
        assert any(a.startswith("--container-image=") for a in container), srun
    else:
        assert container == [] and f"--chdir={ROOT}" in srun

    assert _value(torchrun, "--nnodes") == str(NODES)
    assert _value(torchrun, "--nproc-per-node") == str(GPUS_PER_NODE)
    assert _value(torchrun, "--rdzv-endpoint") == f"node01:{20000 + 4242}"

    assert _value(m2, "--flavor") == FLAVORS[recipe]
    assert _value(m2, "--tensor-model-parallel-size") == str(tp)
    assert _value(m2, "--pipeline-model-parallel-size") == str(pp)
    assert _value(m2, "--itc-group-size") == str(min(GPUS_PER_NODE // tp, dp))
    assert "--bf16" in m2
    fp8 = [a for a in m2 if a.startswith("--fp8")]
    if precision == "fp8":
        i = m2.index("--fp8-format")
        assert m2[i:i + len(FP8_FLAGS)] == FP8_FLAGS
    else:
        assert fp8 == [] and "--transformer-impl" not in m2


@pytest.mark.parametrize("recipe", sorted(LAYOUTS))
def test_dry_run_creates_the_save_folder_first(recipe, data_root):
    """A first run into a fresh folder: the recipe creates SAVE (which holds --log-json) before
    srun starts any rank, and m2-pretrain's validation then finds it writable."""
    rc, out, err = _dry_run(recipe, "module", "bf16", str(data_root))
    assert rc == 0, err
    lines = out.splitlines()
    srun = lines.index(_srun_line(out))
    _, _, m2 = _split(lines[srun])
    save = _value(m2, "--save")
    assert os.path.dirname(_value(m2, "--log-json")) == save
    assert f"mkdir -p {shlex.quote(save)}" in lines[:srun]


@pytest.mark.parametrize("recipe,launcher,precision", COMBOS)
def test_dry_run_args_validate(recipe, launcher, precision, data_root, monkeypatch):
    rc, out, err = _dry_run(recipe, launcher, precision, str(data_root))
    assert rc == 0, err
    _, _, m2 = _split(_srun_line(out))
    parser = build_parser()
    if precision == "fp8":
        # Transformer Engine is a GPU-image dependency; what is checked here is the arguments.
        from megatron_m2.training import validation

        monkeypatch.setattr(validation, "have_transformer_engine", lambda: True)
    args = parser.parse_args(m2)
    validate_args(args, NODES * GPUS_PER_NODE)


def test_dry_run_fake_allocation_without_slurm():
    res = subprocess.run(["bash", str(SLURM / "m2_1b.sbatch")], capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    _, torchrun, _ = _split(_srun_line(res.stdout))
    assert _value(torchrun, "--nnodes") == "2"
    assert _value(torchrun, "--rdzv-endpoint").startswith("node001:")
    assert "fake allocation" in res.stderr


def test_dry_run_compressed_nodelist_and_overrides(data_root):
    (data_root / "ckpt").mkdir(exist_ok=True)
    (data_root / "ckpt" / "latest_checkpointed_iteration.txt").write_text("10\n")
    res = subprocess.run(
        ["bash", str(SLURM / "m2_10b.sbatch"), "--eval-max-samples", "7"],
        capture_output=True, text=True, timeout=60,
        env=_env(SLURM_JOB_NODELIST="gpu[07-08,10],gpu12", SLURM_NNODES="4", TP="8",
                 ITC_AGGREGATE_NODES="2", MBS="4", SAVE=str(data_root / "ckpt")))
    assert res.returncode == 0, res.stderr
    _, torchrun, m2 = _split(_srun_line(res.stdout))
    assert _value(torchrun, "--rdzv-endpoint").startswith("gpu07:")
    assert _value(m2, "--tensor-model-parallel-size") == "8"
    assert _value(m2, "--itc-aggregate-nodes") == "2" and "--itc-group-size" not in m2
    assert _value(m2, "--global-batch-size") == str(4 * NODES)  # MBS x DP (DP = 4)
    assert _value(m2, "--load") == str(data_root / "ckpt")  # resumes from SAVE's checkpoint
    assert m2[-2:] == ["--eval-max-samples", "7"]  # extra arguments come last


@pytest.mark.parametrize("env,message", [
    ({"TP": "3"}, "TP=3 must divide GPUS_PER_NODE=8"),
    ({"LAUNCHER": "docker"}, "LAUNCHER=docker"),
    ({"PRECISION": "fp16"}, "PRECISION=fp16"),
    ({"DRY_RUN": "0"}, "SLURM_JOB_NODELIST is not set"),
])
def test_bad_settings_fail_before_running_anything(env, message):
    res = subprocess.run(["bash", str(SLURM / "m2_0.4b.sbatch")], capture_output=True,
                         text=True, env=_env(**env), timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "srun" not in res.stdout


def test_single_gpu_dry_run_validates(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "examples" / "local" / "single_gpu.sh")],
                         capture_output=True, text=True, timeout=60,
                         env=_env(FLAVOR="0.4b", OUT=str(tmp_path / "out")))
    assert res.returncode == 0, res.stderr
    tokens = shlex.split(res.stdout.strip())
    assert tokens[:2] == ["env", "CUDA_VISIBLE_DEVICES=0"]
    m = tokens.index("megatron_m2.pretrain")
    assert tokens[m - 1] == "-m" and _value(tokens[:m], "--nproc-per-node") == "1"
    m2 = tokens[m + 1:]
    assert _value(m2, "--flavor") == "0.4b" and "--bf16" in m2
    cwd = os.getcwd()
    os.chdir(ROOT)  # the script's data paths are relative to the repository root
    try:
        validate_args(build_parser().parse_args(m2), 1)
    finally:
        os.chdir(cwd)


def test_resubmission_resumes_even_without_a_tracker(data_root):
    """A resubmitted job loads SAVE when it holds a complete checkpoint, also when the tracker
    was lost (m2-pretrain then takes the newest complete iter_N)."""
    save = data_root / "lost_tracker"
    (save / "iter_0000005").mkdir(parents=True)
    (save / "iter_0000005" / "meta.json").write_text("{}")
    res = subprocess.run(["bash", str(SLURM / "m2_0.4b.sbatch")], capture_output=True,
                         text=True, timeout=60, env=_env(SAVE=str(save)))
    assert res.returncode == 0, res.stderr
    _, _, m2 = _split(_srun_line(res.stdout))
    assert _value(m2, "--load") == str(save)


@pytest.mark.parametrize("recipe", sorted(LAYOUTS))
def test_recipes_save_and_exit_on_slurms_warning_signal(recipe, data_root):
    """Before its time limit (or a preemption) Slurm sends SIGTERM (#SBATCH --signal); the
    recipe gives m2-pretrain --exit-signal-handler (finish the step, save, exit 0) and torchrun
    the time to let it (TORCH_ELASTIC_SHUTDOWN_TIMEOUT below the signal's lead time)."""
    text = (SLURM / recipe).read_text()
    lead = int(text.split("#SBATCH --signal=TERM@", 1)[1].split()[0])
    rc, out, err = _dry_run(recipe, "pyxis", "bf16", str(data_root))
    assert rc == 0, err
    _, _, m2 = _split(_srun_line(out))
    assert "--exit-signal-handler" in m2
    exports = [ln for ln in out.splitlines() if ln.startswith("export TORCH_ELASTIC_SHUTDOWN_")]
    assert len(exports) == 1 and 0 < int(exports[0].split("=")[1]) < lead


@pytest.mark.slow
def test_demo_script_end_to_end(tmp_path):
    """The README's main job, shortened to 4 steps: training on the bundled set (2 gloo ranks),
    then the test split's table, JSON (recalls, cross-lingual agreement) and top-5 picture."""
    import json

    from PIL import Image

    out = tmp_path / "demo"
    env = dict(os.environ, ITERS="4", OUT=str(out), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "examples" / "local" / "demo_cpu.sh"),
                          "--eval-interval", "4", "--log-interval", "2"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    record = json.loads((out / "test_retrieval.json").read_text())
    assert record["data"].endswith("emoji_demo/test")
    assert {lang: m["images"] for lang, m in record["results"].items()} == {"en": 174, "zh": 174}
    assert record["cross_lingual"]["samples"] == 174
    assert "chance " in res.stdout and "mean recall / chance" in res.stdout
    with Image.open(out / "test_retrieval_examples.png") as im:
        assert (im.width, im.height) == (record["retrieval_examples"]["width"],
                                         record["retrieval_examples"]["height"])
    assert record["retrieval_examples"]["samples"]["en"] == \
        record["retrieval_examples"]["samples"]["zh"]
    assert len(record["retrieval_examples"]["samples"]["en"]) == 5
