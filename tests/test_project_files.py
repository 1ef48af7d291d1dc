"""The files users expect beside the code: LICENSE, CITATION.cff, CHANGELOG.md, one version everywhere."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import luab_sk
from luab_sk.cli import main

REPO = Path(__file__).resolve().parents[1]

# MD5 of https://www.apache.org/licenses/LICENSE-2.0.txt (the canonical text, byte for byte).
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"


def _pyproject():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return None, text
    return tomllib.loads(text), text


def test_license_is_the_full_apache_2_text():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert hashlib.md5((REPO / "LICENSE").read_bytes()).hexdigest() == APACHE_2_MD5
    config, raw = _pyproject()
    license_ = config["project"]["license"] if config else re.search(r'^license = "(.*)"', raw, re.M)[1]
    assert license_ == "Apache-2.0"


def test_the_version_lives_in_one_place(capsys):
    config, raw = _pyproject()
    if config is not None:
        assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
        assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "luab_sk.__version__"}
    else:
        assert not re.search(r"^version\s*=", raw, re.M) and 'attr = "luab_sk.__version__"' in raw
    init = (REPO / "luab_sk" / "__init__.py").read_text(encoding="utf-8")
    assert len(re.findall(r"^__version__ = ", init, re.M)) == 1
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d*)?", luab_sk.__version__)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"luab {luab_sk.__version__}"


@pytest.mark.slow
def test_setuptools_reads_the_version_from_the_package(monkeypatch):
    from setuptools.config.pyprojecttoml import read_configuration

    monkeypatch.chdir(REPO)
    config = read_configuration(REPO / "pyproject.toml", expand=True)
    assert config["project"]["version"] == luab_sk.__version__


def test_the_version_is_readable_without_heavy_imports():
    code = "import sys, luab_sk; print(luab_sk.__version__, 'torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == [luab_sk.__version__, "False", "False"]


def test_changelog_names_this_version_and_the_unreleased_section():
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[?([^\]\s]+)\]?", text, re.M)
    assert headings[0] == "Unreleased" and luab_sk.__version__ in headings


def test_citation_cff_is_valid_yaml_with_the_paper_and_datasets():
    text = (REPO / "CITATION.cff").read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:  # check the required keys by text
        keys = ("cff-version: 1.2.0", "message:", "title:", "authors:", "preferred-citation:", "references:")
        for key in keys:
            assert re.search(rf"^{re.escape(key)}", text, re.M), key
        assert "2303.17595" in text and "ImageNet-AB" in text and "COCO-AB" in text
        return
    cff = yaml.safe_load(text)  # no anchors or aliases either: GitHub's parser refuses them
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert cff[key]
    assert cff["license"] == "Apache-2.0" and cff["type"] == "software"
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("Neglected Free Lunch") and paper["year"] == 2023
    assert "ICCV" in paper["conference"]["name"]
    assert any("2303.17595" in i["value"] for i in paper["identifiers"])
    names = [(a["given-names"], a["family-names"]) for a in paper["authors"]]
    assert names[0] == ("Dongyoon", "Han") and names[-1] == ("Seong Joon", "Oh") and len(names) == 8
    datasets = [ref["title"] for ref in cff["references"] if ref["type"] == "data"]
    assert any("ImageNet-AB" in t for t in datasets) and any("COCO-AB" in t for t in datasets)
    for entry in (paper, *cff["references"]):
        assert entry["type"] and entry["title"] and entry["authors"]
    assert not re.search(r":\s+[&*][\w-]+\s*$", text, re.M)  # no YAML anchors or aliases
