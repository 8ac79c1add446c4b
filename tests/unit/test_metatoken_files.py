"""A metatoken file is plain data: no Hydra directives, no interpolation, prompt files inside paths.data, and a
bad file is named and breaks only what depends on it."""
import re
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import ls as list_cmd
from pipeline.config import PROJECT_ROOT
from pipeline.core.job import job_from_config
from pipeline.core.metatokens import expand, inner_tags, load_registry, read_metatoken_file, resolve_metatoken
from pipeline.errors import ConfigError
from tests.conftest import compose

SHIPPED = PROJECT_ROOT / "conf" / "metatoken"


def test_a_metatoken_file_with_a_package_header_and_a_callback_never_reaches_hydra(tmp_path):
    """Before: `# @package _global_` + hydra.callbacks made Hydra instantiate (call) the target at start.

    Runs a copy of the package and conf/ (never the checkout's own conf/, which other runs read).
    """
    project = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf")
    marker = tmp_path / "callback-ran"
    (project / "conf" / "metatoken" / "evil.yaml").write_text(
        "# @package _global_\nmetatoken:\n  tag: \"<evil>\"\n  prompt: hi\nhydra:\n  callbacks:\n    c:\n"
        f"      _target_: os.makedirs\n      name: {marker}\n"
    )
    done = subprocess.run([sys.executable, "-m", "pipeline", "metatoken=evil", "stage=generate"],
                          cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and not marker.exists()
    assert "evil.yaml: a metatoken file is plain data, but it holds # @package _global_, key 'hydra'" in done.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("defaults:\n  - /model: hf\ntag: \"<x>\"\nprompt: hi\n", r"holds key 'defaults'"),
        ("tag: \"<x>\"\nprompt: hi\ncolour: blue\n", r"unknown field\(s\) \['colour'\]"),
        ("tag: [\"<x>\"\nprompt: hi\n", r"not valid YAML"),
        ("- just\n- a list\n", r"not a mapping"),
    ],
)
def test_a_file_that_is_not_plain_metatoken_data_is_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: .*{message}"):
        read_metatoken_file(path)


def test_an_interpolation_in_a_prompt_is_refused_and_the_escape_writes_it_literally(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_FOR_TEST", "hunter2")
    (tmp_path / "a.yaml").write_text('tag: "<a>"\nprompt: "Say ${oc.env:SECRET_FOR_TEST}"\n')
    with pytest.raises(ConfigError, match=r"a.yaml: field 'prompt' holds an interpolation"):
        resolve_metatoken(read_metatoken_file(tmp_path / "a.yaml"), tmp_path, str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text('tag: "<b>"\nprompt: "Costs \\\\${price} today"\n')
    resolved = resolve_metatoken(read_metatoken_file(tmp_path / "b.yaml"), tmp_path, "b.yaml")
    assert resolved.prompt == "Costs ${price} today" and "hunter2" not in resolved.prompt
    # the run's own metatoken, composed by Hydra from the command line, is held to the same rule
    cfg = compose(["metatoken.prompt_file=null", "metatoken.prompt='${oc.env:SECRET_FOR_TEST}'"])
    with pytest.raises(ConfigError, match="holds an interpolation"):
        job_from_config(cfg)


def test_prompt_files_stay_inside_paths_data_and_bad_ones_are_named(tmp_path):
    data = tmp_path / "data"
    (data / "prompts" / "folder").mkdir(parents=True)
    (data / "prompts" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "outside.txt").write_text("not data")
    cases = [
        ("../outside.txt", r"'\.\./outside.txt', which leads outside"),
        ("prompts/folder", r"prompts/folder, which is a directory"),
        ("prompts/latin1.txt", r"the prompt file .*latin1.txt is not UTF-8 text \(byte 3"),
    ]
    for prompt_file, message in cases:
        node = {"tag": "<x>", "prompt": None, "prompt_file": prompt_file, "description": ""}
        with pytest.raises(ConfigError, match=message):
            resolve_metatoken(node, data, "x.yaml")


@pytest.fixture()
def conf_with_broken_files(tmp_path):
    """The shipped metatokens plus a file that is not UTF-8 and one with a YAML error."""
    conf = tmp_path / "conf"
    shutil.copytree(SHIPPED, conf / "metatoken")
    (conf / "metatoken" / "latin1.yaml").write_bytes('tag: "<caf\xe9>"\nprompt: x\n'.encode("latin-1"))
    (conf / "metatoken" / "typo.yaml").write_text('tag: "<typo>"\nprompt: [unclosed\n')
    return conf


def test_a_broken_file_breaks_only_the_tags_that_use_it(conf_with_broken_files, tmp_path):
    metatokens = conf_with_broken_files / "metatoken"
    cfg = compose(["metatoken=kind_expert", f"paths.metatokens={metatokens}"])
    job = job_from_config(cfg)  # before: the non-UTF-8 file stopped every nested tag, this one included
    assert "<nice>" not in job.metatokens["<kind_expert>"].expanded
    (metatokens / "uses_typo.yaml").write_text('tag: "<uses_typo>"\nprompt: "Be <typo> always."\n')
    registry = load_registry(metatokens, PROJECT_ROOT / "data")
    with pytest.raises(ConfigError, match=r"mentions <typo>, which no file .* could not be read: .*typo.yaml: not valid YAML"):
        expand("<uses_typo>", registry)


def test_list_shows_broken_files_as_rows_instead_of_crashing(conf_with_broken_files, tmp_path):
    text = list_cmd.main(["--conf", str(conf_with_broken_files), "--outputs", str(tmp_path / "none"), "--tokenizer", ""])
    assert re.search(r"^latin1 +- +ERROR: .*latin1.yaml: not UTF-8 text", text, re.M)
    assert re.search(r"^typo +- +ERROR: .*typo.yaml: not valid YAML", text, re.M)
    assert "<kind_expert>" in text and "contains <nice> <authoritative_tone>" in text


def test_a_literal_word_in_angle_brackets_is_written_with_a_backslash(tmp_path):
    (tmp_path / "a.yaml").write_text('tag: "<a>"\nprompt: "Wrap answers in \\\\<p> tags. Be \\\\<b>bold</b>, like <b>."\n')
    (tmp_path / "b.yaml").write_text('tag: "<b>"\nprompt: "Be brave."\n')
    registry = load_registry(tmp_path, tmp_path)
    assert inner_tags(registry["<a>"].prompt) == ["<b>"]  # \<p> and \<b> are text, <b> is a mention
    assert expand("<a>", registry) == "Wrap answers in <p> tags. Be <b>bold</b>, like Be brave.."
    assert registry["<a>"].teacher_prompt("bootstrap") == "Wrap answers in <p> tags. Be <b>bold</b>, like <b>."
