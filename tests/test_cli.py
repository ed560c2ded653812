"""The `tune` command: ls, cp, run (in-process and the torchrun command), validate, cat, download.

Most tests call `main([...])` in-process against a fixture package tree (recipes/ and configs/)
so they do not depend on what is shipped yet; the console script itself is run in subprocesses
where start-up, exit status or environment matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunewright.tune_cli import catalog
from tunewright.tune_cli.main import main
from tunewright.tune_cli.run import parse_run_args, torchrun_argv

MODULE = "tunewright.tune_cli.main"
TUNE_SCRIPT = Path(sys.executable).parent / "tune"
TUNE = [str(TUNE_SCRIPT)] if TUNE_SCRIPT.exists() else [sys.executable, "-m", MODULE]

# A recipe as small as the contract allows: a `Config` dataclass and a `main(cfg)` that records
# the config it was given, so a test can see what the overrides did.
RECIPE_SRC = textwrap.dedent(
    '''
    import json
    from dataclasses import asdict, dataclass
    from pathlib import Path
    from typing import Any

    from tunewright.training.schema import component


    @dataclass
    class Config:
        recipe: str
        output_dir: str
        optimizer: dict[str, Any] = component(supplied=("params",), required=True)
        steps: int = 1
        note: str | None = "default note"


    def main(cfg: Config) -> None:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "seen.json").write_text(json.dumps(asdict(cfg)))


    if __name__ == "__main__":
        from tunewright.training.entry import recipe_main

        recipe_main(__file__)
    '''
)


def config_text(recipe: str, output_dir: Path) -> str:
    return textwrap.dedent(
        f"""\
        # tiny test config
        recipe: {recipe}
        output_dir: {output_dir}
        steps: 3
        note: from yaml
        optimizer:
          _component_: torch.optim.SGD
          lr: 0.1
        """
    )


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("TUNEWRIGHT_DEBUG", raising=False)


@pytest.fixture
def local(tmp_path):
    """A recipe and its config as plain files, the way a user's copies look."""
    (tmp_path / "my_recipe.py").write_text(RECIPE_SRC)
    (tmp_path / "my.yaml").write_text(config_text("my_recipe.py", tmp_path / "out"))
    return tmp_path


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A fake installed package: two recipes, a helper module, configs with and without recipe."""
    root = tmp_path / "pkg"
    (root / "recipes").mkdir(parents=True)
    (root / "recipes" / "full_finetune_single_device.py").write_text(RECIPE_SRC)
    (root / "recipes" / "lora_finetune_single_device.py").write_text(RECIPE_SRC)
    (root / "recipes" / "ppo_single_device.py").write_text(RECIPE_SRC)  # no config yet
    (root / "recipes" / "_common.py").write_text("")
    (root / "recipes" / "__init__.py").write_text("")
    llama = root / "configs" / "llama"
    llama.mkdir(parents=True)
    out = tmp_path / "out"
    (llama / "tiny_full.yaml").write_text(config_text("full_finetune_single_device", out))
    (llama / "tiny_full_low_memory.yaml").write_text(
        config_text('"full_finetune_single_device"  # quoted', out)
    )
    (llama / "tiny_lora.yaml").write_text(config_text("lora_finetune_single_device", out))
    (root / "configs" / "notes.yaml").write_text("x: 1\n")
    monkeypatch.setattr(catalog, "ROOT", root)
    return tmp_path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def tune(*argv: str, env: dict | None = None, cwd: Path | None = None):
    full_env = {k: v for k, v in os.environ.items() if k != "TUNEWRIGHT_DEBUG"}
    full_env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [*TUNE, *argv], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


# ---------------------------------------------------------------- help, start-up


def test_help_lists_every_command(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for command in ("ls", "cp", "run", "validate", "cat", "download"):
        assert f"    {command}" in out
    code, out, _ = run_main(capsys)
    assert code == 0 and "usage: tune" in out


def test_unknown_command_suggests_the_close_one(capsys):
    code, _, err = run_main(capsys, "lss")
    assert_one_error(code, err, "unknown command 'lss'", "did you mean 'ls'?")


def test_argparse_errors_are_one_line(capsys):
    code, _, err = run_main(capsys, "cp", "llama/tiny_full")
    assert_one_error(code, err, "required: DEST", "tune cp --help")


def test_help_and_ls_import_nothing_heavy():
    # The behaviour behind "tune ls answers at once": none of the heavy libraries gets imported.
    probe = (
        "import sys\n"
        "from tunewright.tune_cli.main import main\n"
        "assert main(['ls']) == 0 and main(['--help']) == 0\n"
        "heavy = ('torch', 'omegaconf', 'datasets', 'transformers', 'numpy', 'huggingface_hub')\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_console_script_ls_lists_the_shipped_recipes():
    result = tune("ls")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("RECIPE")
    for name in catalog.recipes():
        assert name in result.stdout


@pytest.mark.parametrize("name", sorted(catalog.configs()))
def test_every_shipped_config_names_a_shipped_recipe(name):
    assert catalog.recipe_of(catalog.configs()[name]) in catalog.recipes()


# ---------------------------------------------------------------- ls


def test_ls_groups_configs_under_their_recipe(shipped, capsys):
    code, out, _ = run_main(capsys, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIG"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["full_finetune_single_device", "llama/tiny_full"],
        ["llama/tiny_full_low_memory"],
        ["lora_finetune_single_device", "llama/tiny_lora"],
        ["ppo_single_device"],  # a recipe without a config is listed too
        ["(no", "recipe:", "key)", "notes"],
    ]


def test_recipe_of_reads_only_the_top_level_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  recipe: nested\n# recipe: commented\nrecipe: 'lora'  # why\n")
    assert catalog.recipe_of(path) == "lora"
    path.write_text("model:\n  recipe: nested\n")
    assert catalog.recipe_of(path) is None


# ---------------------------------------------------------------- cp


def test_cp_recipe_into_a_directory_and_config_to_a_name_without_suffix(shipped, capsys):
    dest = shipped / "work"
    dest.mkdir()
    code, out, _ = run_main(capsys, "cp", "full_finetune_single_device", str(dest))
    assert code == 0 and "Copied full_finetune_single_device" in out
    assert (dest / "full_finetune_single_device.py").read_text() == RECIPE_SRC

    code, _, _ = run_main(capsys, "cp", "llama/tiny_full", str(dest / "mine"))
    assert code == 0
    assert (dest / "mine.yaml").read_text().startswith("# tiny test config")


def test_cp_refuses_to_overwrite_unless_forced(shipped, capsys):
    dest = shipped / "my.yaml"
    dest.write_text("precious: true\n")
    code, _, err = run_main(capsys, "cp", "llama/tiny_full", str(dest))
    assert_one_error(code, err, "already exists", "--force")
    assert dest.read_text() == "precious: true\n"

    code, _, _ = run_main(capsys, "cp", "llama/tiny_full", str(dest), "--force")
    assert code == 0 and "recipe: full_finetune_single_device" in dest.read_text()


def test_cp_unknown_name_suggests(shipped, capsys):
    code, _, err = run_main(capsys, "cp", "llama/tiny_ful", str(shipped / "x.yaml"))
    assert_one_error(code, err, "unknown recipe or config 'llama/tiny_ful'", "'llama/tiny_full'")
    assert not (shipped / "x.yaml").exists()


def test_cp_missing_parent_needs_make_parents(shipped, capsys):
    dest = shipped / "a" / "b" / "c.yaml"
    code, _, err = run_main(capsys, "cp", "llama/tiny_lora", str(dest))
    assert_one_error(code, err, "does not exist", "--make-parents")
    code, _, _ = run_main(capsys, "cp", "llama/tiny_lora", str(dest), "--make-parents")
    assert code == 0 and dest.is_file()


# ---------------------------------------------------------------- cat, validate


def test_cat_prints_the_file_as_written(local, capsys):
    code, out, _ = run_main(capsys, "cat", str(local / "my.yaml"))
    assert code == 0 and out == (local / "my.yaml").read_text()


def test_cat_with_overrides_prints_the_merged_config(local, capsys):
    (local / "i.yaml").write_text("a: 1\nb: ${a}\nc: {d: 2}\n")
    code, out, _ = run_main(capsys, "cat", str(local / "i.yaml"), "a=5", "~c", "e.f=x")
    assert code == 0
    assert out == "a: 5\nb: ${a}\ne:\n  f: x\n"  # interpolations kept: the output is a config
    code, out, _ = run_main(capsys, "cat", str(local / "i.yaml"), "a=5", "--resolve")
    assert code == 0 and "b: 5\n" in out


def test_cat_bad_override_and_missing_file(local, capsys):
    code, _, err = run_main(capsys, "cat", str(local / "my.yaml"), "steps")
    assert_one_error(code, err, "override 'steps' must look like key=value or ~key")
    code, _, err = run_main(capsys, "cat", str(local / "nope.yaml"))
    assert_one_error(code, err, "config file not found: ")


def test_validate_checks_against_the_recipe_file_the_user_names(local, capsys):
    cfg, recipe = str(local / "my.yaml"), str(local / "my_recipe.py")
    code, out, _ = run_main(capsys, "validate", cfg, "steps=4", "--recipe", recipe)
    assert code == 0 and out.startswith("Config is well-formed!")
    code, _, err = run_main(capsys, "validate", cfg, "stepz=4", "--recipe", recipe)
    assert_one_error(code, err, "unknown key 'stepz' (did you mean 'steps'?)", "my.yaml")
    code, _, err = run_main(capsys, "validate", cfg, "optimizer.lrr=1", "--recipe", recipe)
    assert_one_error(code, err, "unknown key 'optimizer.lrr'", "(did you mean 'lr'?)")


def test_validate_never_imports_a_recipe_file_the_config_names(local, capsys):
    # The config sits next to a .py file it names: importing it would run it.
    (local / "my_recipe.py").write_text(RECIPE_SRC + "\nopen(__file__ + '.ran', 'w').close()\n")
    code, out, _ = run_main(capsys, "validate", str(local / "my.yaml"))
    assert code == 0 and "not checked" in out and "--recipe" in out
    assert not (local / "my_recipe.py.ran").exists()


def test_validate_shipped_config_by_name(shipped, capsys):
    code, out, _ = run_main(capsys, "validate", "llama/tiny_lora")
    assert code == 0
    assert "well-formed" in out and "lora_finetune_single_device" in out
    code, _, err = run_main(capsys, "validate", "llama/tiny_lor")
    assert_one_error(code, err, "unknown config 'llama/tiny_lor'", "'llama/tiny_lora'")


def test_validate_without_recipe_key_only_loads(local, capsys):
    (local / "plain.yaml").write_text("a: 1\nb: ${a}\n")
    code, out, _ = run_main(capsys, "validate", str(local / "plain.yaml"))
    assert code == 0 and "no 'recipe:' key" in out and "not checked" in out
    code, _, err = run_main(capsys, "validate", str(local / "plain.yaml"), "b=${nope}")
    assert_one_error(code, err, "key 'b': cannot resolve")


def test_validate_unknown_recipe_in_config(shipped, capsys):
    (shipped / "c.yaml").write_text("recipe: full_finetune_single_devic\n")
    code, _, err = run_main(capsys, "validate", str(shipped / "c.yaml"))
    assert_one_error(code, err, "unknown recipe", "'full_finetune_single_device'")


# ---------------------------------------------------------------- download


def test_download_offline_says_so_fast(tmp_path):
    result = tune("download", "HuggingFaceTB/SmolLM2-135M", "--output-dir", str(tmp_path / "m"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "offline" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_download_needs_an_output_dir(capsys):
    code, _, err = run_main(capsys, "download", "HuggingFaceTB/SmolLM2-135M")
    assert_one_error(code, err, "--output-dir")


# ---------------------------------------------------------------- run, in-process


def seen(path: Path) -> dict:
    return json.loads((path / "out" / "seen.json").read_text())


def test_run_recipe_path_with_overrides(local, capsys):
    code, _, err = run_main(
        capsys, "run", str(local / "my_recipe.py"), "--config", str(local / "my.yaml"),
        "steps=5", "~note", "optimizer.lr=1e-4",
    )  # fmt: skip
    assert code == 0, err
    cfg = seen(local)
    assert cfg["steps"] == 5
    assert cfg["note"] == "default note"  # `~note` removed the YAML value: the default applies
    assert cfg["optimizer"] == {"_component_": "torch.optim.SGD", "lr": 1e-4}


def test_run_shipped_recipe_and_config_by_name(shipped, capsys):
    argv = ["run", "full_finetune_single_device", "--config", "llama/tiny_full"]
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    assert seen(shipped)["recipe"] == "full_finetune_single_device"


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=2", "unknown key 'stepz' (did you mean 'steps'?)"),
        ("steps=abc", "key 'steps' must be int, got 'abc'"),
        ("~output_dir", "missing required key 'output_dir'"),
        ("optimizer.lrr=1", "unknown key 'optimizer.lrr': torch.optim.SGD takes no argument 'lrr'"),
        ("optimizer.params=1", "key 'optimizer.params' is set by the recipe"),
        ("steps", "override 'steps' must look like key=value or ~key"),
        ("~nope", "cannot delete 'nope': no such key"),
        ("optimizer._component_=torch.optim.Nope", "cannot import torch.optim.Nope"),
    ],
)
def test_run_bad_config_fails_before_main(local, capsys, override, message):
    code, _, err = run_main(
        capsys, "run", str(local / "my_recipe.py"), "--config", str(local / "my.yaml"), override
    )
    assert_one_error(code, err, message)
    assert not (local / "out").exists()  # main never ran


@pytest.mark.parametrize(
    "recipe, config, message",
    [
        ("{d}/my_recipe.py", "{d}/nope.yaml", "config file not found: "),
        ("{d}/nope.py", "{d}/my.yaml", "recipe file not found: "),
        ("full_finetune_single_devce", "{d}/my.yaml", "did you mean 'full_finetune_single_device'"),
        ("{d}/my_recipe.py", "llama/tiny_fulll", "(did you mean 'llama/tiny_full'"),
        ("{d}/my_recipe", "{d}/my.yaml", "did you mean the file '{d}/my_recipe.py'"),
        ("{d}/my_recipe.py", "{d}/my", "did you mean the file '{d}/my.yaml'"),
    ],
)
def test_run_unknown_recipe_or_config(shipped, local, capsys, recipe, config, message):
    argv = ["run", recipe.format(d=local), "--config", config.format(d=local)]
    code, _, err = run_main(capsys, *argv)
    assert_one_error(code, err, message.format(d=local))


def test_run_recipe_mismatch_is_one_line(shipped, capsys):
    argv = ["run", "full_finetune_single_device", "--config", "llama/tiny_lora"]
    code, _, err = run_main(capsys, *argv)
    assert_one_error(
        code, err, "config llama/tiny_lora is for recipe 'lora_finetune_single_device', "
        "not 'full_finetune_single_device'",
    )  # fmt: skip
    assert not (shipped / "out").exists()
    code, _, err = run_main(capsys, *argv, "recipe=full_finetune_single_device")
    assert code == 0, err


def test_run_help(capsys):
    code, out, _ = run_main(capsys, "run", "--help")
    assert code == 0 and "usage: tune run [TORCHRUN FLAGS] RECIPE --config CONFIG" in out


# ---------------------------------------------------------------- run, torchrun pass-through


def test_parse_run_args_splits_torchrun_flags_recipe_config_and_overrides():
    args = parse_run_args(
        ["--nproc_per_node", "2", "--nnodes=1", "--standalone", "--master-port", "29501",
         "full_finetune_distributed", "a=1", "--config", "llama/tiny_full", "~b"]
    )  # fmt: skip
    assert args.launcher == [
        "--nproc_per_node", "2", "--nnodes=1", "--standalone", "--master-port", "29501",
    ]  # fmt: skip
    assert args.recipe == "full_finetune_distributed"
    assert args.config == "llama/tiny_full"
    assert args.overrides == ["a=1", "~b"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc_pernode", "2", "r", "--config", "c"], "did you mean '--nproc_per_node'"),
        (["r", "--config", "c", "--nproc_per_node", "2"], "torchrun flags go before RECIPE"),
        (["r"], "missing --config"),
        (["--config", "c"], "missing RECIPE"),
        (["r", "--config"], "--config needs a value"),
        (["--standalone=1", "r", "--config", "c"], "--standalone takes no value"),
    ],
)
def test_run_argument_errors(capsys, argv, message):
    code, _, err = run_main(capsys, "run", *argv)
    assert_one_error(code, err, message)


def test_torchrun_argv():
    cmd = torchrun_argv(
        ["--nproc_per_node", "2"], Path("/r/full.py"), Path("/c/tiny.yaml"), ["a=1", "~b"]
    )
    assert cmd == [
        sys.executable, "-m", "tunewright.tune_cli.launch", "--nproc_per_node", "2",
        "/r/full.py", "--config", "/c/tiny.yaml", "a=1", "~b",
    ]  # fmt: skip


def test_distributed_run_checks_the_config_then_launches_torchrun(shipped, monkeypatch, capsys):
    from tunewright.tune_cli import run

    calls = []
    monkeypatch.setattr(run, "launch", lambda cmd: calls.append(cmd) or 0)
    argv = ["run", "--nproc_per_node", "2", "full_finetune_single_device", "--config"]
    code, _, err = run_main(capsys, *argv, "llama/tiny_full", "stepz=1")
    assert_one_error(code, err, "unknown key 'stepz'")
    assert calls == []  # a typo fails here once, not in every worker

    code, _, err = run_main(capsys, *argv, "llama/tiny_full", "steps=2")
    assert code == 0, err
    root = catalog.ROOT
    assert calls == [
        [sys.executable, "-m", "tunewright.tune_cli.launch", "--nproc_per_node", "2",
         str(root / "recipes" / "full_finetune_single_device.py"), "--config",
         str(root / "configs" / "llama" / "tiny_full.yaml"), "steps=2"]
    ]  # fmt: skip
    assert not (shipped / "out").exists()  # the workers run main, not this process


def test_launch_passes_the_exit_status_through():
    from tunewright.tune_cli.run import launch

    assert launch([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    assert launch([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]) == 137


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--nproc_per_node", "abc", "a number of processes per node >= 1, or auto"),
        ("--nproc_per_node", "0", "a number of processes per node >= 1"),
        ("--nnodes", "2:1", "a number of nodes >= 1, or MIN:MAX"),
        ("--node_rank", "-1", "this node's index, >= 0"),
        ("--master_port", "70000", "a port number, 1 to 65535"),
        ("--max_restarts", "x", "a number >= 0"),
        ("--monitor_interval", "0", "a number of seconds > 0"),
        ("--start_method", "thread", "spawn, fork or forkserver"),
        ("--redirects", "9", "0-3, or LOCAL_RANK:0-3 pairs"),
        ("--local_ranks_filter", "a", "local ranks such as 0 or 0,1"),
    ],
)
def test_torchrun_flag_values_are_checked_before_anything_starts(capsys, flag, value, message):
    for argv in ([flag, value], [f"{flag}={value}"]):
        code, _, err = run_main(capsys, "run", *argv, "sft", "--config", "llama/tiny_lora")
        assert_one_error(code, err, f"{flag} '{value}': must be {message}")


def test_good_torchrun_flag_values_pass():
    good = ["--nproc_per_node", "auto", "--nnodes", "1:2", "--node_rank=0", "--master_port", "29500",
            "--monitor_interval", "0.5", "--redirects", "0:3,1:0", "--tee", "3", "--local_ranks_filter=0,1"]
    assert parse_run_args([*good, "sft", "--config", "c"]).launcher == good


def test_allow_components_is_tunes_flag_not_torchruns():
    args = parse_run_args(["--allow-components", "mypkg,other.", "--nproc_per_node", "2", "sft",
                           "--config", "c", "--allow-components=third", "a=1"])
    assert args.allow_components == ["mypkg", "other.", "third"]
    assert args.launcher == ["--nproc_per_node", "2"] and args.overrides == ["a=1"]


# ---------------------------------------------------------------- the console script


def test_console_script_run_and_errors(local):
    ok = tune("run", "my_recipe.py", "--config", "my.yaml", "steps=9", cwd=local)
    assert ok.returncode == 0, ok.stderr
    assert seen(local)["steps"] == 9

    bad = tune("run", "my_recipe.py", "--config", "my.yaml", "stepz=9", cwd=local)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {local / 'my.yaml'}: unknown key 'stepz' (did you mean 'steps'?)"
    ]

    debug = tune("validate", "my.yaml", "stepz=9", "--recipe", "my_recipe.py", cwd=local,
                 env={"TUNEWRIGHT_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", MODULE, "cp", "nope", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown recipe or config 'nope'")


# ---------------------------------------------------------------- components outside the allow-list


def test_a_users_package_runs_only_when_the_user_allows_it(local, capsys, monkeypatch):
    (local / "mypkg").mkdir()
    (local / "mypkg" / "__init__.py").write_text(
        "import torch\n\ndef make_sgd(params, lr: float = 0.1):\n    return torch.optim.SGD(params, lr=lr)\n")
    monkeypatch.syspath_prepend(str(local))
    monkeypatch.delenv("TUNEWRIGHT_ALLOW_COMPONENTS", raising=False)
    argv = ["run", str(local / "my_recipe.py"), "--config", str(local / "my.yaml"),
            "optimizer._component_=mypkg.make_sgd"]
    code, _, err = run_main(capsys, *argv)
    assert_one_error(code, err, "key 'optimizer._component_': mypkg.make_sgd is outside the packages",
                     "--allow-components mypkg")
    assert not (local / "out").exists()
    code, _, err = run_main(capsys, *argv[:1], "--allow-components", "mypkg", *argv[1:])
    assert code == 0, err
    assert seen(local)["optimizer"]["_component_"] == "mypkg.make_sgd"
    assert "TUNEWRIGHT_ALLOW_COMPONENTS" not in os.environ  # allowed for that command only


def test_python_recipe_takes_allow_components_too(local):
    (local / "mypkg").mkdir()
    (local / "mypkg" / "__init__.py").write_text("import torch\nmake_sgd = torch.optim.SGD\n")
    cmd = [sys.executable, str(local / "my_recipe.py"), "--config", str(local / "my.yaml"),
           "optimizer._component_=mypkg.make_sgd"]
    env = {**os.environ, "PYTHONPATH": str(local)}
    env.pop("TUNEWRIGHT_ALLOW_COMPONENTS", None)
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--allow-components mypkg" in refused.stderr
    allowed = subprocess.run([*cmd[:2], "--allow-components", "mypkg", *cmd[2:]], capture_output=True, text=True, env=env)
    assert allowed.returncode == 0, allowed.stderr


# ---------------------------------------------------------------- the quickstart's "try it" line


def test_try_it_names_a_tune_that_runs_when_tune_is_not_on_path(tmp_path, monkeypatch):
    from tunewright.tune_cli.quickstart import tune_command

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as after `make quickstart`, venv not activated
    monkeypatch.chdir(TUNE_SCRIPT.parent.parent.parent)  # the repo, where `make` runs
    tune, activate = tune_command()
    assert "/" in tune and activate is not None  # a path the shell runs, not a bare name
    done = subprocess.run([tune, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("tune ")
    assert Path(activate).is_file()
    monkeypatch.setenv("PATH", f"{TUNE_SCRIPT.parent}:/usr/bin:/bin")
    assert tune_command() == ("tune", None)
